"""`livt bench`: training-step throughput of both stages, each figure a ratio to an in-process reference.

    livt bench                                            # ViT-B/16 224 px, batch 256, both stages (GPU, ~2 min)
    livt bench --compile --jpeg-root /tmp/jpeg_lt --jpeg-classes 100 --workers 14 --out results/
    livt bench --tiny                                     # 2-block ViT at 32 px on the CPU, seconds (the tests)

Per stage, in one process, on the same model and loss:
- `reference`: the step as research code writes it: eager, fp16 autocast + GradScaler on a GPU (fp32 on
  the CPU), torch's AdamW unfused, `loss.item()` and a device sync every step;
- `livt`: `livt.engine.Trainer`'s own step (fused AdamW, bf16 on a GPU, finite / stop flags left on the
  device and read one step late), eager, then with `--compile` its regional compilation;
- each again fed by a real input path: `on_device` (a synthetic uint8 set held on the device,
  `data.on_device`) and, with `--jpeg-root` (a `benchmarks/jpeg_tree.py` tree), the DataLoader over
  JPEG files with `--workers` workers, running the stage's PIL transforms (`jpeg`) or the same transforms
  as data.pipeline fast + data.uint8_batches run them (`jpeg fast`: uint8 batches normalised and erased on
  the device, by either step); plus each input path alone (uint8 batches finished on the device).
MFU is against a dense matmul peak measured in the same run (bf16 on a GPU, fp32 on the CPU), FLOPs
counted once with torch's FlopCounterMode (forward + backward). Timings are wall-clock over `--steps`
steps after `--warmup`, with one device sync at each end; peak memory is CUDA's allocator peak.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from livt import config as config_lib
from livt import engine
from livt.data import build_dataset
from livt.data.device import OnDevice
from livt.data.loading import Augmented, FinishUint8, TrainData, make_loader
from livt.data.samplers import TrainSampler
from livt.data.transforms import PRETRAIN_SCALE, finetune_transform, finish_batch, pretrain_transform
from livt.models import Adapter, build_classifier
from livt.models.mae import create_mae
from livt.pretrain import mae_forward
from livt.tuning import classifier_forward

STAGES = ("pretrain", "finetune")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> float:
    """Dense matmul FLOP/s measured here: bf16 n x n on a GPU, fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def stage_config(stage: str, args: argparse.Namespace) -> Any:
    """The stage's config: the `tiny` preset (--tiny) or the ImageNet-LT recipe, at the bench's sizes."""
    preset = "tiny" if args.tiny else "imagenet_lt"
    keys = [("data.dataset", "synthetic"), ("data.imbalance", "1"), ("data.batch_size", str(args.batch)),
            ("optim.batch_size", str(args.batch)), ("data.img_size", str(args.img)),
            ("model.name", args.model), ("model.patch_size", str(args.patch)),
            ("data.num_classes", str(args.num_classes)),
            ("data.max_per_class", str(math.ceil(2 * args.batch / args.num_classes))),
            ("data.num_workers", str(args.workers)), ("optim.epochs", "1000")]
    return config_lib.resolve(stage, preset, overrides=keys)


def build_net(stage: str, cfg: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    if stage == "pretrain":
        return create_mae(cfg.model, cfg.mae, cfg.data.img_size)
    m = cfg.model
    return Adapter(build_classifier(m.name, cfg.data.img_size, m.patch_size, cfg.data.num_classes,
                                        m.drop_path_rate, m.head, m.head_scale))


def stage_forward(stage: str, cfg: Any) -> Callable[[torch.nn.Module, engine.Batch, float], torch.Tensor]:
    """`forward(model, batch, progress) -> loss`: the stage's own (`livt.pretrain`, `livt.tuning`)."""
    if stage == "pretrain":
        return mae_forward(cfg)
    counts = np.full(cfg.data.num_classes, 2 * cfg.data.batch_size // cfg.data.num_classes)
    counts = np.maximum(1, counts // np.arange(1, len(counts) + 1))  # a long-tailed prior for the loss
    return classifier_forward(cfg, counts, cfg.data.num_classes)


def flops_per_image(stage: str, cfg: Any, device: torch.device) -> float:
    net = build_net(stage, cfg).to(device)
    forward = stage_forward(stage, cfg)
    x = torch.randn(2, 3, cfg.data.img_size, cfg.data.img_size, device=device)
    y = torch.randint(0, cfg.data.num_classes, (2,), device=device)
    with FlopCounterMode(display=False) as counter:
        forward(net, engine.Batch(x, y, torch.arange(2), 0), 0.5).backward()
    return counter.get_total_flops() / 2


class ReferenceStep:
    """The reference: eager, fp16 + GradScaler on a GPU (fp32 on the CPU), unfused AdamW, a sync per step."""

    def __init__(self, stage: str, cfg: Any, device: torch.device) -> None:
        self.net = build_net(stage, cfg).to(device).train()
        self.forward, self.device, self.step = stage_forward(stage, cfg), device, 0
        self.opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=1e-4,
                                     betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay, fused=False)
        self.fp16 = device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.mean, self.std = cfg.data.mean, cfg.data.std

    def __call__(self, batches: Iterator[Batch]) -> None:
        images, labels, indices, _ = next(batches)
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:  # the `jpeg fast` input
            images = finish_batch(images, self.mean, self.std, self.step)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            loss = self.forward(self.net, engine.Batch(images, labels, indices, self.step), 0.5)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        sync(self.device)
        self.step += 1


def livt_step(stage: str, cfg: Any, accelerator: Any, run_dir: Path, compile_model: bool) -> engine.Trainer:
    cfg.compile = compile_model
    run_dir.mkdir(parents=True, exist_ok=True)
    net = build_net(stage, cfg)
    optimize = net.model if isinstance(net, Adapter) else None
    targets = np.arange(2 * cfg.data.batch_size) % cfg.data.num_classes
    # batches come from `input_paths`; the `jpeg fast` ones are uint8, finished as data.uint8_batches does
    data = TrainData(None, FinishUint8(cfg.data.mean, cfg.data.std, cfg.seed))
    return engine.Trainer(cfg, stage, accelerator, run_dir, net, data, targets, cfg.data.num_classes,
                          stage_forward(stage, cfg), optimize=optimize)


def measure(step: Callable[[Iterator[Batch]], Any], batches: Iterator[Batch], args: argparse.Namespace,
            device: torch.device, finish: Callable[[], None] = lambda: None) -> dict[str, float]:
    for _ in range(args.warmup):
        step(batches)
    finish()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(batches)
    finish()
    sync(device)
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"images_per_s": args.batch * args.steps / dt, "step_ms": 1000 * dt / args.steps, "peak_mem_gib": mem}


def input_paths(stage: str, cfg: Any, args: argparse.Namespace,
                device: torch.device) -> dict[str, Callable[[], Iterator[Batch]]]:
    """name -> a fresh endless iterator of training batches of that input path."""
    d = cfg.data
    paths: dict[str, Callable[[], Iterator[Batch]]] = {}

    def endless(data: Any, targets: np.ndarray, workers: int) -> Iterator[Batch]:
        sampler = TrainSampler(targets, d.num_classes, "instance", cfg.seed, d.batch_size)
        loader = make_loader(data, sampler, d.batch_size, workers)
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader

    train = build_dataset(d, "train")
    if stage == "pretrain":
        on_device = OnDevice(train, d.img_size, d.mean, d.std, cfg.seed, device, "rrc", PRETRAIN_SCALE)
    else:
        on_device = OnDevice(train, d.img_size, d.mean, d.std, cfg.seed, device, cfg.aug.crop, cfg.aug.crop_scale,
                             cfg.aug.pad)
    paths["on_device"] = lambda: endless(on_device, train.targets, 0)
    if args.jpeg_root:
        jcfg = config_lib.resolve(stage, "imagenet_lt", overrides=[
            ("data.root", str(args.jpeg_root)), ("data.num_classes", str(args.jpeg_classes)),
            ("data.img_size", str(d.img_size))])
        jpegs = build_dataset(jcfg.data, "train")
        transform = (pretrain_transform(d.img_size, d.mean, d.std) if stage == "pretrain" else
                     finetune_transform(d.img_size, d.mean, d.std, cfg.aug.rand_augment, cfg.aug.reprob,
                                        cfg.aug.color_jitter, cfg.aug.crop_scale))
        paths[f"jpeg x{args.workers} workers"] = lambda: endless(
            Augmented(jpegs, transform, cfg.seed), jpegs.targets, args.workers)
        paths[f"jpeg fast x{args.workers} workers"] = lambda: endless(
            Augmented(jpegs, transform, cfg.seed).with_pipeline("fast", uint8=True), jpegs.targets, args.workers)
    return paths


def loader_alone(batches: Iterator[Batch], args: argparse.Namespace, device: torch.device,
                 cfg: Any) -> dict[str, float]:
    def step(it: Iterator[Batch]) -> None:
        images = next(it)[0].to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            finish_batch(images, cfg.data.mean, cfg.data.std)
    return measure(step, batches, args, device)


def bench_stage(stage: str, args: argparse.Namespace, accelerator: Any, device: torch.device,
                peak: float, work: Path) -> list[dict[str, Any]]:
    cfg = stage_config(stage, args)
    fpi = flops_per_image(stage, cfg, device)
    rows: list[dict[str, Any]] = []

    def add(step_kind: str, source: str, r: dict[str, float]) -> None:
        r["mfu"] = r["images_per_s"] * fpi / peak if step_kind != "none" else None
        rows.append({"stage": stage, "step": step_kind, "input": source, **r})

    def constant() -> Iterator[Batch]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
        y = torch.randint(0, cfg.data.num_classes, (args.batch,), generator=g).to(device)
        return itertools.repeat((x, y, torch.arange(args.batch), 0))

    paths = input_paths(stage, cfg, args, device)
    ref = ReferenceStep(stage, cfg, device)
    add("reference", "model only", measure(ref, constant(), args, device))
    for name, make in paths.items():
        add("reference", name, measure(ref, make(), args, device))
    del ref
    for compiled in (False, True) if args.compile else (False,):
        trainer = livt_step(stage, cfg, accelerator, work / f"{stage}-{compiled}", compiled)
        kind = "livt + compile" if compiled else "livt"
        add(kind, "model only", measure(trainer._step, constant(), args, device, trainer.settle))
        for name, make in paths.items():
            add(kind, name, measure(trainer._step, make(), args, device, trainer.settle))
        del trainer
        gc.collect()
    for name, make in paths.items():
        add("none", f"{name} (input alone)", loader_alone(make(), args, device, cfg))
    base = rows[0]["images_per_s"]
    for r in rows:
        r["x_reference"] = r["images_per_s"] / base
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| step | input | images/s | step ms | MFU | peak mem GiB | x reference |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        lines.append(f"| {r['step']} | {r['input']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {mfu} | {mem} | "
                     f"{r['x_reference']:.2f} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="livt bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=[*STAGES, "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="CPU-sized: vit_micro/8 at 32 px, batch 16, 3 steps")
    p.add_argument("--model", default=None, help="backbone (default vit_base; --tiny: vit_micro)")
    p.add_argument("--img", type=int, default=None, help="resolution (default 224; --tiny: 32)")
    p.add_argument("--patch", type=int, default=None, help="patch size (default 16; --tiny: 8)")
    p.add_argument("--batch", type=int, default=None, help="batch (default 256; --tiny: 16)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default 1000; --tiny: 5)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20; --tiny: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny: 1)")
    p.add_argument("--compile", action="store_true", help="also time livt's step with regional torch.compile")
    p.add_argument("--jpeg-root", type=Path, default=None, help="a benchmarks/jpeg_tree.py tree for the JPEG rows")
    p.add_argument("--jpeg-classes", type=int, default=100, help="classes of the JPEG tree")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the JPEG rows (default 8; --tiny 1)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.md and bench.json")
    args = p.parse_args(argv)
    tiny = dict(model="vit_micro", img=32, patch=8, batch=16, num_classes=5, steps=3, warmup=1, workers=1)
    full = dict(model="vit_base", img=224, patch=16, batch=256, num_classes=1000, steps=20, warmup=5, workers=8)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import sys

    args = parse(sys.argv[1:] if argv is None else argv)
    accelerator = engine.make_accelerator("auto")
    device = accelerator.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(device, 512 if args.tiny else (8192 if device.type == "cuda" else 2048))
    prov = engine.provenance()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    head = (f"{name} | torch {torch.__version__} | commit {(prov['git_commit'] or 'n/a')[:10]}"
            f"{' (dirty)' if prov['git_dirty'] else ''} | {args.model}/{args.patch} {args.img}px | "
            f"batch {args.batch} | precision {accelerator.mixed_precision} | "
            f"measured matmul peak {peak / 1e12:.2f} TFLOP/s")
    print(head)
    out = [head]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as work:
        for stage in STAGES if args.stage == "both" else (args.stage,):
            stage_rows = bench_stage(stage, args, accelerator, device, peak, Path(work))
            rows += stage_rows
            text = f"\n{stage}\n\n{table(stage_rows)}"
            print(text)
            out.append(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.md").write_text("\n".join(out) + "\n")
        (args.out / "bench.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    return rows
