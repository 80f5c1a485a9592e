"""An image folder tree, `root/<split>/<class>/<image>`, optionally made long-tailed.

Split folders: train, val (optional: falls back to test) and test. Classes are the train class folders,
sorted by name; a val/test class folder that train lacks is an error. With `data.imbalance` > 1 the
training set is subsampled to the exponential profile: classes ranked by image count (descending, ties
by name), the class of rank r keeps min(n_r, floor(n_max * (1/imbalance)^(r/(C-1)))) images, a seeded
(`subset_seed`) draw. An already long-tailed tree should use imbalance 1 (keep all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from livt.config import DataConfig
from livt.data.cifar import long_tail_counts
from livt.data.errors import DataError, EmptyClassError, MissingDataError
from livt.data.splits import EncodedImage, LTDataset, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class FolderDataset(LTDataset):
    """Images of `root/<class>/*` for the given classes (the class folders of the training split)."""

    def __init__(self, root: str | Path, class_names: list[str], name: str = "", require_all: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise MissingDataError(f"image folder not found: {root}")
        extra = sorted({p.name for p in root.iterdir() if p.is_dir()} - set(class_names))
        if extra:
            raise DataError(f"{root}: class folder(s) {extra[:10]} are not among the {len(class_names)} "
                            f"training classes")
        paths, labels = [], []
        for c, cname in enumerate(class_names):
            folder = root / cname
            files = list_images(folder) if folder.is_dir() else []
            if require_all and not files:
                raise EmptyClassError(f"{folder}: class {c} ({cname}) has no training image")
            paths += files
            labels += [c] * len(files)
        self.root = root
        self.paths = paths
        self.targets = np.array(labels, dtype=np.int64)
        self.num_classes = len(class_names)
        self.class_names = list(class_names)
        self.name = name or root.name
        self.source = str(root.resolve())

    def keep(self, indices: np.ndarray) -> None:
        self.paths = [self.paths[i] for i in indices]
        self.targets = self.targets[indices]

    def load(self, index: int) -> tuple[Image.Image, int]:
        return open_image(self.paths[index]), int(self.targets[index])

    def open(self, index: int) -> tuple[EncodedImage, int]:
        return EncodedImage(self.paths[index]), int(self.targets[index])


def long_tail_subset(targets: np.ndarray, num_classes: int, imbalance: float, seed: int) -> np.ndarray:
    """Indices (sorted) of the exponential long-tail subset described in the module docstring."""
    counts = np.bincount(targets, minlength=num_classes)
    rank = np.argsort(-counts, kind="stable")  # rank r -> class
    target = long_tail_counts(int(counts.max()), num_classes, imbalance)
    rng = np.random.RandomState(seed)
    keep = []
    for r, c in enumerate(rank):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        keep.append(idx[: min(len(idx), target[r])])
    return np.sort(np.concatenate(keep))


def build_folder(cfg: DataConfig, split: str) -> FolderDataset:
    if not cfg.root:
        raise MissingDataError("folder: data.root is not set (a folder with train/ and test/ inside)")
    root = Path(cfg.root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise MissingDataError(f"folder: {train_dir} not found (expected root/train/<class>/<image>)")
    class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(class_names) != cfg.num_classes:
        raise DataError(f"{train_dir}: {len(class_names)} class folders, but data.num_classes is "
                        f"{cfg.num_classes}; set --data.num_classes {len(class_names)}")
    if split == "train":
        ds = FolderDataset(train_dir, class_names, "folder_train", require_all=True)
        if cfg.imbalance > 1:
            ds.keep(long_tail_subset(ds.targets, ds.num_classes, cfg.imbalance, cfg.subset_seed))
        return ds
    folder = root / split
    if split == "val" and not folder.is_dir():
        folder = root / "test"  # no val split: select on test, as CIFAR does
    return FolderDataset(folder, class_names, f"folder_{split}")
