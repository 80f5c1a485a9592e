"""Training-step throughput of both stages on generated tensors: images/s, MFU, peak memory.

    python benchmarks/throughput.py                                   # ViT-B/16 224, both stages, bf16
    python benchmarks/throughput.py --model vit_large --batch 128 --compile

Measures the model's optimizer step alone (forward, backward, fused AdamW) on a batch that already
sits on the GPU: the ceiling the input pipeline has to feed. FLOPs are counted once with torch's
FlopCounterMode (matmuls and attention, forward + backward); MFU = achieved FLOP/s / the GPU's dense
bf16 peak (H100 SXM 989 TFLOP/s, H200 the same chip; pass --peak-tflops for another GPU).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from livt.config import MAEConfig, ModelConfig
from livt.losses import build_loss
from livt.models.mae import create_mae
from livt.models.vit import create_vit


def build(stage: str, model: str, img: int, patch: int, num_classes: int) -> tuple[torch.nn.Module, callable]:
    """The network and `step(net, images, labels) -> loss` of a stage."""
    if stage == "pretrain":
        net = create_mae(ModelConfig(name=model, patch_size=patch), MAEConfig(), img)
        return net, lambda n, x, y: n(x)[0]
    net = create_vit(model, img, patch, num_classes=num_classes, drop_path_rate=0.1, global_pool="avg")
    counts = torch.logspace(3, 0.7, num_classes).round().long()  # a long-tailed prior
    loss = build_loss("bal_bce", counts)
    return net, lambda n, x, y: loss(n(x), y)


def flops_per_image(stage: str, model: str, img: int, patch: int, num_classes: int) -> float:
    net, step = build(stage, model, img, patch, num_classes)
    x, y = torch.randn(2, 3, img, img), torch.randint(0, num_classes, (2,))
    with FlopCounterMode(display=False) as counter:
        step(net, x, y).backward()
    return counter.get_total_flops() / 2


def bench(stage: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    net, step = build(stage, args.model, args.img, args.patch, args.num_classes)
    net.cuda().train()
    run = torch.compile(net) if args.compile else net
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    y = torch.randint(0, args.num_classes, (args.batch,), device="cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]

    def one_step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = step(run, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        one_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    ips = args.batch * args.steps / dt
    fpi = flops_per_image(stage, args.model, args.img, args.patch, args.num_classes)
    return dict(stage=stage, images_per_s=ips, step_ms=1000 * dt / args.steps,
                tflops=ips * fpi / 1e12, mfu=ips * fpi / (args.peak_tflops * 1e12),
                mem_gib=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "finetune", "both"], default="both")
    p.add_argument("--model", default="vit_base")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/throughput.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.model}/{args.patch} "
          f"{args.img}px | batch {args.batch} | {args.precision}{' | compile' if args.compile else ''}")
    print("| stage | images/s | step ms | TFLOP/s | MFU | peak mem GiB |")
    print("|---|---|---|---|---|---|")
    for stage in (["pretrain", "finetune"] if args.stage == "both" else [args.stage]):
        r = bench(stage, args)
        print(f"| {r['stage']} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} | {r['tflops']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['mem_gib']:.1f} |")


if __name__ == "__main__":
    main()
