"""Write an ImageNet-LT-style image tree of JPEG files, to measure the real input pipeline.

    python benchmarks/jpeg_tree.py /tmp/jpeg_lt --classes 100 --max-per-class 640 --imbalance 64
    python pretrain_mgp.py --data imagenet_lt --data.root /tmp/jpeg_lt --data.num_classes 100 ...

Images are 500x375 (ImageNet's typical size) smooth random colour fields plus pixel noise, about 80 KB at
quality 90 like an average ImageNet JPEG (decode time follows the file's size and entropy, not its
content); the class sizes follow the exponential long-tailed profile. Split files ImageNet_LT_{train,val,test}.txt
are written at the root; val and test have 10 images per class.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(args: tuple[str, int, int, int, float]) -> None:
    path, seed, width, height, noise = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(field + rng.normal(0.0, noise, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--max-per-class", type=int, default=640)
    p.add_argument("--imbalance", type=float, default=64.0)
    p.add_argument("--eval-per-class", type=int, default=10)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--noise", type=float, default=12.0, help="pixel noise std (12: ~80 KB at 500x375)")
    args = p.parse_args(argv)
    c = args.classes
    counts = [int(args.max_per_class * args.imbalance ** (-i / (c - 1))) for i in range(c)]
    jobs, seed = [], 0
    for split, per_class in (("train", None), ("val", args.eval_per_class), ("test", args.eval_per_class)):
        lines = []
        for label in range(c):
            folder = args.root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class or counts[label]):
                rel = f"{split}/n{label:08d}/{i:05d}.JPEG"
                lines.append(f"{rel} {label}")
                jobs.append((str(args.root / rel), seed, args.width, args.height, args.noise))
                seed += 1
        (args.root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    with ProcessPoolExecutor() as pool:
        list(pool.map(write_image, jobs, chunksize=64))
    print(f"wrote {len(jobs):,} JPEG files under {args.root} ({sum(counts):,} train, {c} classes)")


if __name__ == "__main__":
    main()
