"""Per-core throughput of the training-image pipelines (data.pipeline x data.uint8_batches) against the
reference PIL pipeline, both stages, and the PSNR of each pipeline's output against the reference's.

    python benchmarks/jpeg_tree.py /tmp/jpeg_lt --classes 10 --max-per-class 40 --imbalance 1 --eval-per-class 1
    python benchmarks/input_pipeline.py /tmp/jpeg_lt                 # 224 px, ~1 minute on one free core
    python benchmarks/input_pipeline.py /tmp/jpeg_lt --img 112       # where reduced-DCT decoding applies

What one DataLoader worker does, in one process on one thread (torch.set_num_threads(1)): load and augment
`--images` training images (`livt.data.loading.Augmented`, seeded per sample) and collate them in batches
of 32. The transforms are the stages' own: MGP's `pretrain_transform` and BFT's `finetune_transform` with
the ImageNet-LT recipe (RandomResizedCrop 0.08-1, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing
0.25). The variants are timed in turns, `--rounds` times, each round a fresh epoch (fresh draws) over the
same images; `x reference` is the median over rounds of the reference's time / the variant's time in that
round, so load from other jobs on a shared machine weighs on both alike. The row `pre-decoded` feeds the
same images decoded beforehand (held in memory): what a packed, pre-decoded copy of the dataset would give
at most, as the decoding is all it skips.

PSNR (dB, peak 255, over every pixel of the first `--psnr-images` images at epoch 0, pixels erased by random
erasing left out as their values are noise): the variant's output, normalised as the device would
(`finish_batch`), against the reference's for the same samples, hence the same draws. The uint8 setting does
not change the pixels (tests/test_pipeline.py checks it), so each pipeline has one PSNR; `worst` is that of
the worst single image.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from livt.data.folder import FolderDataset
from livt.data.loading import Augmented, collate
from livt.data.splits import ArrayDataset, LTDataset, open_image
from livt.data.transforms import finetune_transform, finish_batch, pretrain_transform

MEAN, STD = (0.4797, 0.4577, 0.4077), (0.2790, 0.2712, 0.2861)  # the ImageNet-LT presets'
BATCH = 32
# (name, data.pipeline, data.uint8_batches, pre-decoded images)
VARIANTS = [
    ("reference", "pil", False, False),
    ("pil + uint8", "pil", True, False),
    ("fast", "fast", False, False),
    ("fast + uint8", "fast", True, False),
    ("draft + uint8", "draft", True, False),
    ("fast + uint8, pre-decoded", "fast", True, True),
]


def transforms(img_size: int) -> dict:
    return {"pretrain": pretrain_transform(img_size, MEAN, STD),
            "finetune": finetune_transform(img_size, MEAN, STD, crop_scale=(0.08, 1.0))}


def predecode(ds: LTDataset, n: int) -> ArrayDataset:
    images = np.stack([np.asarray(open_image(ds.paths[i])) for i in range(n)])  # (n, H, W, 3): one size
    return ArrayDataset(images, ds.targets[:n], ds.class_names, "pre-decoded")


def augmented(ds: LTDataset, decoded: ArrayDataset, reference, pipeline: str, uint8: bool,
              pre: bool) -> Augmented:
    return Augmented(decoded if pre else ds, reference).with_pipeline(pipeline, uint8)


def run_epoch(data: Augmented, epoch: int, n: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        collate([data[(epoch, i)] for i in range(start, min(n, start + BATCH))])
    return time.perf_counter() - t0


def psnr(reference: Augmented, variant: Augmented, n: int) -> tuple[float, float]:
    """(PSNR over all the compared pixels, PSNR of the worst image) of `variant` (uint8) against `reference`."""
    scale = torch.tensor(STD).view(3, 1, 1) * 255
    total, count, worst = 0.0, 0, math.inf
    for i in range(n):
        ref = reference[(0, i)][0]
        out = variant[(0, i)][0]  # uint8 (3 or 4, H, W)
        kept = out[3] == 0 if len(out) == 4 else torch.ones(out.shape[1:], dtype=torch.bool)
        err = ((finish_batch(out[None], MEAN, STD)[0] - ref) * scale)[:, kept].double().square()
        total, count = total + err.sum().item(), count + err.numel()
        if err.sum() > 0:
            worst = min(worst, 10 * math.log10(255**2 / err.mean().item()))
    return (10 * math.log10(255**2 / (total / count)) if total else math.inf), worst


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="a benchmarks/jpeg_tree.py tree (its train/ folder is read)")
    p.add_argument("--img", type=int, default=224, help="data.img_size")
    p.add_argument("--images", type=int, default=160, help="images per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--psnr-images", type=int, default=100)
    p.add_argument("--stage", choices=["pretrain", "finetune", "both"], default="both")
    p.add_argument("--out", type=Path, default=None, help="folder for input_pipeline_<img>px.md / .json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train = args.root / "train"
    ds = FolderDataset(train, sorted(d.name for d in train.iterdir() if d.is_dir()))
    n = min(args.images, len(ds))
    decoded = predecode(ds, max(n, min(args.psnr_images, len(ds))))
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") + (" (dirty)" if git("status", "--porcelain", "-uno") else "")
    head = (f"{platform.processor() or platform.machine()}, 1 thread | Python {platform.python_version()}, torch "
            f"{torch.__version__}, torchvision {version('torchvision')}, Pillow {version('pillow')}, timm "
            f"{version('timm')} | commit {commit or 'n/a'} | {n} images of {ds.paths[0].stat().st_size // 1024} "
            f"KB ({'x'.join(map(str, open_image(ds.paths[0]).size))}), {args.img} px, {args.rounds} rounds")
    print(head)
    rows = []
    for stage, reference in transforms(args.img).items():
        if args.stage not in (stage, "both"):
            continue
        data = {name: augmented(ds, decoded, reference, pipe, u8, pre) for name, pipe, u8, pre in VARIANTS}
        times: dict[str, list[float]] = {name: [] for name in data}
        for r in range(args.rounds):
            for name, d in data.items():
                times[name].append(run_epoch(d, r + 1, n))
        ref_psnr = {pipe: psnr(data["reference"], Augmented(ds, reference).with_pipeline(pipe, True),
                               min(args.psnr_images, len(ds)))
                    for pipe in ("pil", "fast", "draft")}
        for name, pipe, u8, pre in VARIANTS:
            ratio = statistics.median(a / b for a, b in zip(times["reference"], times[name]))
            per_image = statistics.median(times[name]) / n
            quality = ref_psnr[pipe] if not pre else (None, None)
            rows.append(dict(stage=stage, variant=name, pipeline=pipe, uint8_batches=u8, pre_decoded=pre,
                             ms_per_image=1000 * per_image, images_per_s=1 / per_image, x_reference=ratio,
                             psnr_db=quality[0], worst_psnr_db=quality[1]))
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"input_pipeline_{args.img}px"
        (args.out / f"{name}.md").write_text(f"{head}\n\n{text}\n")
        (args.out / f"{name}.json").write_text(json.dumps({"header": head, "rows": rows}, indent=1))
    return rows


def table(rows: list[dict]) -> str:
    def db(v: float | None) -> str:
        return "-" if v is None else "exact" if math.isinf(v) else f"{v:.1f}"
    lines = ["| stage | pipeline | ms / image | images/s per core | x reference | PSNR dB | worst image dB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['variant']} | {r['ms_per_image']:.2f} | {r['images_per_s']:.0f} | "
              f"{r['x_reference']:.2f} | {db(r['psnr_db'])} | {db(r['worst_psnr_db'])} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
