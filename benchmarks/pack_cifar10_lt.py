"""Pack CIFAR-10-LT (imbalance 100) small enough to travel with a GPU call: the `cifar10_lt` preset's training
subset and the full test set, lossless uint8, as an ordinary npz set (`train.npz`, `test.npz`; LZMA-compressed
zip members, which numpy reads like any npz), about 48 MiB from the 170 MB of CIFAR-10.

    python benchmarks/pack_cifar10_lt.py                       # ../shared/data/cifar10 -> data_carry/cifar10_lt
    livt finetune --data cifar10_lt --data.root data_carry/cifar10_lt ...   # the same images, in the same order

The packed training set holds only the kept images, stored so that the preset's own selection (the seeded
per-class shuffle of livt.data.cifar.select_per_class), run again on it, returns the same images in the same
order as on the full set: every command reads either root alike, with no option changed.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from livt import config
from livt.data.cifar import CIFAR, load_cifar, long_tail_subset


def presorted(images: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept images (grouped by class, as select_per_class returns them) placed so that select_per_class
    with the same seed, on per-class counts equal to the class sizes, gives them back in this order: block c
    at the positions of the permutation that shuffle draws for it (each shuffle consumes the generator
    according to the class size, so the blocks are replayed in class order)."""
    rng = np.random.RandomState(seed)
    out_images, out_labels = np.empty_like(images), np.empty_like(labels)
    start = 0
    for c in range(int(labels.max()) + 1):
        n = int((labels == c).sum())
        block = slice(start, start + n)
        assert (labels[block] == c).all(), "the selection must be grouped by class"
        perm = np.arange(n)
        rng.shuffle(perm)
        out_images[start + perm] = images[block]
        out_labels[start + perm] = labels[block]
        start += n
    return out_images, out_labels


def write_npz(path: Path, **arrays: np.ndarray) -> int:
    """An npz file with LZMA-compressed members (zip method 14, read by np.load); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, array in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    tmp.replace(path)
    return path.stat().st_size


def pack(root: str | Path, out: str | Path, preset: str = "cifar10_lt") -> dict[str, int]:
    """Write out/train.npz (the preset's long-tailed subset) and out/test.npz; returns their sizes in bytes."""
    data = config.parse_args("finetune", ["--data", preset, "--data.root", str(root)]).data
    out = Path(out)
    images, labels, names = load_cifar(root, data.dataset, train=True)
    kept = long_tail_subset(images, labels, CIFAR[data.dataset][0], data)
    if data.imbalance == 1 and not data.balanced:
        raise SystemExit(f"{preset}: data.imbalance is 1, nothing to pack")
    train_images, train_labels = presorted(*kept, data.subset_seed)
    sizes = {"train.npz": write_npz(out / "train.npz", images=train_images, labels=train_labels,
                                    class_names=np.array(names))}
    test_images, test_labels, _ = load_cifar(root, data.dataset, train=False)
    sizes["test.npz"] = write_npz(out / "test.npz", images=test_images, labels=test_labels,
                                  class_names=np.array(names))
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="../shared/data/cifar10", help="the full CIFAR-10 folder")
    p.add_argument("--out", default="data_carry/cifar10_lt", help="folder for the packed train.npz / test.npz")
    p.add_argument("--preset", default="cifar10_lt", help="fine-tuning preset whose selection is packed")
    args = p.parse_args(argv)
    sizes = pack(args.root, args.out, args.preset)
    total = sum(sizes.values())
    print(", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()) + f"; {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
