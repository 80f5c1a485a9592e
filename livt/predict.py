"""Top-k predictions of a fine-tuned classifier for image files.

    python -m livt.predict checkpoints/demo-bft/classifier.safetensors img1.jpg img2.png --topk 5

Uses the preprocessing of evaluation (resize to size / eval_crop, centre crop, the eval crop and the
normalisation stored in the file's config: the full frame for CIFAR-sized images) and the raw logits (the
balanced losses' bias is a training device only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from livt.checkpoint import load_classifier
from livt.data.splits import open_image
from livt.data.transforms import eval_transform


@torch.no_grad()
def predict(checkpoint: str | Path, images: list[str | Path], topk: int = 5,
            device: str = "cpu") -> list[list[tuple[str, float]]]:
    """For each image, the `topk` (class name, probability) pairs, most likely first."""
    model, meta = load_classifier(checkpoint, device=device)
    data = meta.get("config", {}).get("data", {})
    arch = meta["arch"]
    transform = eval_transform(arch["img_size"], data.get("mean", (0.485, 0.456, 0.406)),
                               data.get("std", (0.229, 0.224, 0.225)), data.get("eval_crop", 0.875))
    names = meta.get("class_names") or [str(c) for c in range(arch["num_classes"])]
    batch = torch.stack([transform(open_image(p)) for p in images]).to(device)
    probs = model(batch).float().softmax(-1)
    top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    return [[(names[i], p) for p, i in zip(vals.tolist(), idx.tolist())] for vals, idx in zip(*top)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="fine-tuned classifier .safetensors")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for path, preds in zip(args.images, predict(args.checkpoint, args.images, args.topk, args.device)):
        print(f"{path}: " + ", ".join(f"{name} {100 * prob:.1f}%" for name, prob in preds))


if __name__ == "__main__":
    main()
