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

from collections.abc import Callable

import numpy as np

from livt.config import DataConfig
from livt.data.cifar import build_cifar
from livt.data.errors import DataError
from livt.data.folder import build_folder
from livt.data.splits import (
    ArrayDataset,
    LTDataset,
    SplitFileDataset,
    SubsetDataset,
    build_imagenet_bal,
    carve_val,
    build_split_dataset,
    read_split_file,
    resolve,
    verify_images,
)
from livt.data.synthetic import SyntheticLT

SPLITS = ("train", "val", "test")

BUILDERS: dict[str, Callable[[DataConfig, str], LTDataset]] = {
    "synthetic": SyntheticLT,
    "cifar10_lt": build_cifar,
    "cifar100_lt": build_cifar,
    "imagenet_lt": build_split_dataset,
    "imagenet_bal": build_imagenet_bal,
    "places_lt": build_split_dataset,
    "inat18": build_split_dataset,
    "folder": build_folder,
}


def build_dataset(cfg: DataConfig, split: str) -> LTDataset:
    """The `split` ('train' | 'val' | 'test') of the dataset that `cfg.dataset` names."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if cfg.dataset not in BUILDERS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(BUILDERS)}")
    if cfg.val_from_train and split in ("train", "val"):
        full = BUILDERS[cfg.dataset](cfg, "train")
        train_idx, val_idx = carve_val(full.targets, full.num_classes, cfg.val_from_train, cfg.subset_seed)
        part = {"train": train_idx, "val": val_idx}[split]
        return SubsetDataset(full, part, f"{full.name} ({'val carved from train' if split == 'val' else 'rest'})")
    return BUILDERS[cfg.dataset](cfg, split)


def heldout_val(val: LTDataset, test: LTDataset) -> bool:
    """Whether the val split is held out from what is reported (not the test split's images)."""
    return val.source != test.source


def train_class_counts(cfg: DataConfig) -> np.ndarray:
    """Training images per class, (C,) int64: from `cfg.class_counts_file` when set (evaluation without
    the training list), else from the training split."""
    # imported here: see livt.data.splits.check_no_empty_class
    from livt.data.stats import check_no_empty_class, class_counts, read_class_counts

    if not cfg.class_counts_file:
        ds = build_dataset(cfg, "train")
        return class_counts(ds.targets, ds.num_classes)
    path = resolve(cfg, cfg.class_counts_file) if (cfg.split_dir or cfg.root) else cfg.class_counts_file
    counts = read_class_counts(path)
    if len(counts) != cfg.num_classes:
        raise DataError(f"{path}: counts for {len(counts)} classes, but data.num_classes is "
                        f"{cfg.num_classes}")
    check_no_empty_class(counts, str(path))
    return counts


__all__ = [
    "BUILDERS", "SPLITS", "ArrayDataset", "LTDataset", "SplitFileDataset", "SubsetDataset", "SyntheticLT", "build_dataset",
    "carve_val", "heldout_val",
    "read_split_file", "train_class_counts", "verify_images",
]
