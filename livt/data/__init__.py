"""Datasets, samplers, transforms and loaders.

    ds = build_dataset(cfg.data, "train")        # an LTDataset: targets, num_classes, class_names, load(i)
    counts = train_class_counts(cfg.data)        # (C,) training images per class

Splits: 'train'; 'val' for model selection; 'test' for what is reported. CIFAR and iNat18 have no
separate val set in the field (val = test there, see their builders): `heldout_val` tells. With
`data.val_from_train` > 0, 'val' is a stratified split carved from train and 'train' is the rest
(`livt.data.splits.carve_val`), so the class counts, and everything computed from them, are those
of the remaining training images.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from livt.config import DataConfig, Normalize, update
from livt.data.cifar import build_cifar, build_npz
from livt.data.errors import DataError
from livt.data.folder import build_folder
from livt.data.splits import (
    ArrayDataset,
    LTDataset,
    SplitFileDataset,
    SubsetDataset,
    build_imagenet_bal,
    build_split_dataset,
    carve_val,
    check_no_empty_counts,
    class_counts,
    read_split_file,
    resolve,
    verify_images,
)
from livt.data.synthetic import SyntheticLT

SPLITS = ("train", "val", "test")
NORMALIZE = typing.get_args(Normalize)

BUILDERS: dict[str, Callable[[DataConfig, str], LTDataset]] = {
    "synthetic": SyntheticLT,
    "cifar10_lt": build_cifar,
    "cifar100_lt": build_cifar,
    "imagenet_lt": build_split_dataset,
    "imagenet_bal": build_imagenet_bal,
    "places_lt": build_split_dataset,
    "inat18": build_split_dataset,
    "folder": build_folder,
    "npz": build_npz,
}


def build_dataset(cfg: DataConfig, split: str) -> LTDataset:
    """The `split` ('train' | 'val' | 'test') of the dataset that `cfg.dataset` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.dataset not in BUILDERS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(BUILDERS)}")
    if cfg.val_from_train and split in ("train", "val"):
        full = _build(cfg, "train")
        train_idx, val_idx = carve_val(full.targets, full.num_classes, cfg.val_from_train, cfg.subset_seed)
        part = {"train": train_idx, "val": val_idx}[split]
        return SubsetDataset(full, part, f"{full.name} ({'val carved from train' if split == 'val' else 'rest'})")
    return _build(cfg, split)


def _build(cfg: DataConfig, split: str) -> LTDataset:
    ds = BUILDERS[cfg.dataset](cfg, split)
    return stored_at(ds, cfg.stored_size) if cfg.stored_size else ds


def stored_at(ds: LTDataset, size: int) -> ArrayDataset:
    """`data.stored_size`: the in-memory set `ds` with every image resized once to size x size (Pillow
    bicubic, antialiased), the same dataset at a lower resolution (e.g. CIFAR at 16 px for a CPU budget)."""
    if size < 0:
        raise DataError(f"{ds.name}: data.stored_size must be >= 0 (0 = as stored), got {size}")
    if not isinstance(ds, ArrayDataset):
        raise DataError(f"{ds.name}: data.stored_size resizes in-memory sets (CIFAR, npz, synthetic) only; "
                        f"set it to 0 for this dataset and use data.img_size")
    if ds.images.shape[1:3] == (size, size):
        return ds
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in ds.images])
    out = ArrayDataset(images, ds.targets, ds.class_names, ds.name)
    out.source = ds.source
    return out


def heldout_val(val: LTDataset, test: LTDataset) -> bool:
    """Whether the val split is held out from what is reported (not the test split's images)."""
    return val.source != test.source


def train_class_counts(cfg: DataConfig) -> np.ndarray:
    """Training images per class, (C,) int64: from `cfg.class_counts_file` when set (evaluation without
    the training list), else from the training split."""
    # imported here, not at the top: `python -m livt.data.stats` must find the module not yet imported
    from livt.data.stats import read_class_counts

    if not cfg.class_counts_file:
        ds = build_dataset(cfg, "train")
        return class_counts(ds.targets, ds.num_classes)
    path = resolve(cfg, cfg.class_counts_file) if (cfg.split_dir or cfg.root) else cfg.class_counts_file
    counts = read_class_counts(path)
    if len(counts) != cfg.num_classes:
        raise DataError(f"{path}: counts for {len(counts)} classes, but data.num_classes is "
                        f"{cfg.num_classes}")
    check_no_empty_counts(counts, str(path))
    return counts


def channel_stats(ds: LTDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of every pixel of `ds` in [0, 1], each image at its stored size."""
    total, sq, n = np.zeros(3), np.zeros(3), 0
    if isinstance(ds, ArrayDataset):
        chunks = (ds.images[i:i + 1024] for i in range(0, len(ds.images), 1024))  # (n, H, W, 3) uint8
    else:
        chunks = (np.asarray(ds.load(i)[0].convert("RGB"))[None] for i in range(len(ds)))
    for chunk in chunks:
        x = chunk.reshape(-1, 3).astype(np.float64) / 255.0
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    if n == 0:
        raise DataError(f"{ds.name}: no images to compute the normalisation from")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def resolve_normalization(cfg: Any) -> None:
    """With `data.normalize from_train`, set data.mean / data.std of the stage config `cfg` to the training
    images' statistics (written to the run's config.yaml). They do not name the run (`config.data_derived`):
    `livt compare` finds the run directory from the config as given, before any data is read."""
    d = cfg.data
    if d.normalize == "from_train":
        mean, std = channel_stats(build_dataset(d, "train"))
        update(cfg, {"data.mean": mean, "data.std": std}, "data.normalize from_train")


__all__ = [
    "BUILDERS", "NORMALIZE", "SPLITS", "ArrayDataset", "LTDataset", "SplitFileDataset", "SubsetDataset",
    "SyntheticLT", "build_dataset", "carve_val", "channel_stats", "heldout_val", "read_split_file",
    "resolve_normalization", "train_class_counts", "verify_images",
]
