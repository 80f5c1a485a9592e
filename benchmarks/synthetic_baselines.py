"""How hard is the synthetic set? A linear probe on raw pixels vs a small CNN and a small ViT.

    python benchmarks/synthetic_baselines.py --device cuda --epochs 60     # H100: about 1.5 minutes
    python benchmarks/synthetic_baselines.py --epochs 3 --sets bal500      # CPU, 2 cores: about 5 minutes
    python benchmarks/synthetic_baselines.py --models linear --max_per_class 1000 --clutter 0   # the demo's set

Trains each model with plain cross-entropy on three training sets of the default synthetic config
(10 classes, 32 px): balanced 500/class ('bal500'), long-tailed (imbalance 100, 1,236 images, 'lt100')
and its balanced variant of the same size ('bal_same'), every set for the same number of steps, and
prints one table row per run: overall test accuracy (1,000 balanced test images; chance 10%) and the
mean per-class accuracy of the head (classes 0-2) and of the tail (classes 7-9).

Measured (H100, --epochs 60; ViT = timm ViT, patch 4, width 128, depth 4, 4 heads, avg pool):
    linear  bal500 14.6   lt100 12.0 (head 28.3, tail 2.7)    bal_same 11.7
    cnn     bal500 99.3   lt100 82.7 (head 98.7, tail 45.3)   bal_same 98.1
    vit     bal500 83.8   lt100 37.7 (head 76.3, tail 2.0)    bal_same 45.7    (bal500, 150 epochs: 95.7)
CPU, 2 cores, --epochs 3 on bal500 (2-3 minutes a model): linear 14.2, cnn 83.7, vit 14.1.
The demo's set (--max_per_class 1000 --clutter 0; 'bal500' is then 1,000 per class, 'lt100' the demo's 2,478
training images), linear, 30 epochs, 2-core VM, 2026-12-04: bal500 18.8, lt100 17.8 (head 39.3, tail 4.0),
bal_same 16.4.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from livt.config import DataConfig
from livt.data import build_dataset


def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float().div(255)
    return (x - 0.5) / 0.25, torch.from_numpy(ds.targets)  # (N, 3, H, W), (N,)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crop and horizontal flip, batched."""
    n, _, h, w = x.shape
    pad = F.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,), generator=g).tolist()
    x = pad[:, :, i:i + h, j:j + w]
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def small_cnn(num_classes: int) -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    return nn.Sequential(block(3, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def make_model(name: str, num_classes: int, size: int) -> nn.Module:
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, num_classes))
    if name == "cnn":
        return small_cnn(num_classes)
    if name == "vit":
        return VisionTransformer(img_size=size, patch_size=4, embed_dim=128, depth=4, num_heads=4,
                                 mlp_ratio=2.0, num_classes=num_classes, global_pool="avg", class_token=False)
    raise ValueError(f"unknown model {name!r}; choose linear, cnn or vit")


@torch.no_grad()
def per_class_accuracy(model, x, y, num_classes, device, bs=500) -> np.ndarray:
    model.eval()
    pred = torch.cat([model(x[i:i + bs].to(device)).argmax(1).cpu() for i in range(0, len(x), bs)])
    hit = (pred == y).float()
    return np.array([hit[y == c].mean().item() for c in range(num_classes)])


def train(name, train_ds, test, epochs, device, seed=0, bs=128):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = (t.to(device) for t in tensors(train_ds))
    model = make_model(name, train_ds.num_classes, x.shape[-1]).to(device)
    lr, wd = (1e-3, 1e-4) if name == "linear" else (2e-3 if name == "cnn" else 1e-3, 0.05)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * max(len(x) // bs, 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, step = time.time(), 0
    while step < steps:
        perm = torch.randperm(len(x), generator=g).to(device)
        for b in range(len(x) // bs or 1):
            idx = perm[b * bs:(b + 1) * bs]
            xb = x[idx] if name == "linear" else augment(x[idx], g)
            model.train()
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    acc = per_class_accuracy(model, *test, train_ds.num_classes, device)
    return acc, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="linear,cnn,vit")
    ap.add_argument("--epochs", type=int, default=30, help="epochs of the 500/class set; others get the "
                    "same number of steps")
    ap.add_argument("--sets", default="bal500,lt100,bal_same")
    ap.add_argument("--num_classes", type=int, default=10)
    ap.add_argument("--max_per_class", type=int, default=500)
    ap.add_argument("--imbalance", type=float, default=100.0)
    ap.add_argument("--clutter", type=float, default=1.0, help="data.clutter (the demo preset: 0)")
    args = ap.parse_args()

    base = DataConfig(dataset="synthetic", num_classes=args.num_classes, max_per_class=args.max_per_class,
                      imbalance=args.imbalance, clutter=args.clutter)
    t = time.time()
    sets = {
        "bal500": build_dataset(replace(base, imbalance=1.0), "train"),
        "lt100": build_dataset(base, "train"),
        "bal_same": build_dataset(replace(base, balanced=True), "train"),
    }
    test_ds = build_dataset(base, "test")
    test = tensors(test_ds)
    print(f"data: {time.time() - t:.1f}s; train sizes "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()) + f"; test {len(test_ds)}")
    full_steps = args.epochs * (len(sets["bal500"]) // 128)
    c = args.num_classes
    head, tail = slice(0, max(c * 3 // 10, 1)), slice(c - max(c * 3 // 10, 1), c)
    print("| model | train set | images | epochs | test acc | head acc | tail acc | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for key in args.sets.split(","):
            ds = sets[key]
            epochs = max(round(full_steps / max(len(ds) // 128, 1)), 1)
            acc, secs = train(name, ds, test, epochs, args.device)
            print(f"| {name} | {key} | {len(ds)} | {epochs} | {100 * acc.mean():.1f} | "
                  f"{100 * acc[head].mean():.1f} | {100 * acc[tail].mean():.1f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
