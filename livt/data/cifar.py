"""CIFAR-10-LT and CIFAR-100-LT, and the exponential long-tail profile they define.

Class i keeps n_i = floor(n_max * (1/gamma)^(i / (C-1))) training images (gamma = data.imbalance; 1 keeps
all); the images of each class are a seeded shuffle of its indices cut to n_i, one `RandomState(seed)`
shuffling the classes in order (the LDAM-DRW recipe, so seed 0 picks the images used in the literature).
Test sets stay balanced. The field has no CIFAR validation split: by its convention val = test here,
so never select checkpoints on CIFAR val and report CIFAR test as if it were held out.

Sources, in `data.root`: `train.npz` / `test.npz` with `images` (N, H, W, 3) uint8, `labels` and an
optional `class_names`; or torchvision's python-format folders (`cifar-10-batches-py`,
`cifar-100-python`), downloaded only with `--data.download true`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from livt.config import DataConfig
from livt.data.errors import DataError, LabelRangeError, MissingDataError, SplitFormatError
from livt.data.splits import ArrayDataset, check_no_empty_class

CIFAR = {  # dataset kind -> (classes, torchvision class name, torchvision folder)
    "cifar10_lt": (10, "CIFAR10", "cifar-10-batches-py"),
    "cifar100_lt": (100, "CIFAR100", "cifar-100-python"),
}


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> np.ndarray:
    """floor(n_max * (1/imbalance)^(i/(C-1))) for i = 0..C-1, (C,) int64; imbalance 1 keeps n_max each."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (n_max / n_min), got {imbalance}")
    if num_classes == 1:
        return np.array([n_max], dtype=np.int64)
    exponent = np.arange(num_classes, dtype=np.float64) / (num_classes - 1)
    return np.floor(n_max * (1.0 / np.float64(imbalance)) ** exponent).astype(np.int64)


def balanced_counts(total: int, num_classes: int) -> np.ndarray:
    """`total` images spread over the classes as evenly as possible (the first classes get the extra one)."""
    counts = np.full(num_classes, total // num_classes, dtype=np.int64)
    counts[: total % num_classes] += 1
    return counts


def train_profile(n_max: int, num_classes: int, imbalance: float, balanced: bool) -> np.ndarray:
    """Per-class training counts: the long tail, or a balanced set of the same total size."""
    counts = long_tail_counts(n_max, num_classes, imbalance)
    return balanced_counts(int(counts.sum()), num_classes) if balanced else counts


def select_per_class(targets: np.ndarray, counts: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the first counts[c] images of a seeded shuffle of each class c, grouped by class."""
    rng = np.random.RandomState(seed)
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if len(idx) < n:
            raise DataError(f"class {c} has {len(idx)} images, fewer than the {n} requested")
        rng.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SplitFormatError(f"{path}: not a readable .npz file: {e}") from None


def read_npz_labels(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """`labels` (N,) int64 and the optional `class_names` of an npz split; the images are not read."""
    with _open_npz(path) as f:
        if "labels" not in f.files:
            raise SplitFormatError(f"{path}: no 'labels' array; expected images, labels (and class_names)")
        labels = f["labels"]
        names = [str(n) for n in f["class_names"]] if "class_names" in f.files else None
    if labels.ndim != 1 or not len(labels) or not np.issubdtype(labels.dtype, np.integer):
        raise SplitFormatError(f"{path}: labels must be a non-empty 1-D integer array, got {labels.dtype} "
                               f"{labels.shape}")
    return labels.astype(np.int64), names


def read_npz(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(images uint8 (N, H, W, 3), labels (N,) int64 in [0, num_classes), class_names or None) of an npz."""
    labels, names = read_npz_labels(path)
    with _open_npz(path) as f:
        if "images" not in f.files:
            raise SplitFormatError(f"{path}: no 'images' array; expected images, labels (and class_names)")
        images = f["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
        raise SplitFormatError(f"{path}: images must be uint8 (N, H, W, 3) with N labels, "
                               f"got {images.dtype} {images.shape} and {labels.shape} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        raise LabelRangeError(f"{path}: labels[{bad[0]}] = {labels[bad[0]]} outside [0, {num_classes})")
    if names is not None and len(names) != num_classes:
        raise SplitFormatError(f"{path}: {len(names)} class_names for {num_classes} classes")
    return images, labels, names


def load_cifar(root: str | Path, kind: str, train: bool,
               download: bool = False) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, 32, 32, 3), labels (N,) int64, class names) of the full CIFAR split."""
    num_classes, tv_name, tv_folder = CIFAR[kind]
    root = Path(root)
    npz = root / ("train.npz" if train else "test.npz")
    if npz.is_file():
        images, labels, names = read_npz(npz, num_classes)
        return images, labels, names or [f"class_{c:02d}" for c in range(num_classes)]
    if not (root / tv_folder).is_dir() and not download:
        raise MissingDataError(
            f"{kind}: found neither {npz} nor torchvision's {root / tv_folder}; pass --data.download true "
            f"to let torchvision download it into {root}, or point --data.root at a folder holding "
            "train.npz/test.npz")
    import torchvision

    try:
        ds = getattr(torchvision.datasets, tv_name)(str(root), train=train, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise MissingDataError(f"{kind}: {root / tv_folder}: {e}") from None
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def long_tail_subset(images: np.ndarray, labels: np.ndarray, num_classes: int,
                     cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training images kept by the exponential profile of `data.imbalance` (or its `balanced` twin),
    n_max = the largest class; class i is the i-th most frequent one by convention (CIFAR's are equal).
    imbalance 1 (not balanced) keeps every image."""
    if cfg.imbalance == 1 and not cfg.balanced:
        return images, labels  # keep all: an npz set may be long-tailed already
    n_max = int(np.bincount(labels, minlength=num_classes).max())
    keep = select_per_class(labels, train_profile(n_max, num_classes, cfg.imbalance, cfg.balanced),
                            cfg.subset_seed)
    return images[keep], labels[keep]


def build_cifar(cfg: DataConfig, split: str) -> ArrayDataset:
    """CIFAR-10/100-LT train (long-tailed or `balanced`), balanced test; val = test (see module doc)."""
    num_classes = CIFAR[cfg.dataset][0]
    if cfg.num_classes != num_classes:
        raise DataError(f"{cfg.dataset} has {num_classes} classes but data.num_classes is "
                        f"{cfg.num_classes}; set --data.num_classes {num_classes}")
    if not cfg.root:
        raise MissingDataError(f"{cfg.dataset}: data.root is not set (folder of train.npz/test.npz or "
                               "torchvision's CIFAR files)")
    images, labels, names = load_cifar(cfg.root, cfg.dataset, split == "train", cfg.download)
    if split == "train":
        images, labels = long_tail_subset(images, labels, num_classes, cfg)
    ds = ArrayDataset(images, labels, names, f"{cfg.dataset}_{split}")
    ds.source = f"{Path(cfg.root).resolve()} ({'train' if split == 'train' else 'test'})"  # val = test
    if split == "train":
        check_no_empty_class(ds, f"{cfg.dataset} train ({cfg.root})")
    return ds


NPZ_SPLITS = {"train": "train.npz", "val": "val.npz", "test": "test.npz"}


def build_npz(cfg: DataConfig, split: str) -> ArrayDataset:
    """A user's own set: `data.root` holds train.npz, test.npz and optionally val.npz, each with `images`
    uint8 (N, H, W, 3), `labels` and optional `class_names` (train's name the classes of all three).

    The class count is that of train (its class_names, else its largest label + 1) and must equal
    `data.num_classes`. Train is subsampled like CIFAR-LT (`data.imbalance`, `balanced`; 1 keeps an
    already long-tailed set as it is). Without val.npz, val is the test split (`heldout_val` is False).
    """
    if not cfg.root:
        raise MissingDataError("npz: data.root is not set (the folder holding train.npz and test.npz)")
    root = Path(cfg.root)
    train_path = root / NPZ_SPLITS["train"]
    for path in (train_path, root / NPZ_SPLITS["test"]):
        if not path.is_file():
            raise MissingDataError(f"npz: {path} not found (data.root must hold train.npz and test.npz)")
    train_labels, train_names = read_npz_labels(train_path)
    num_classes = len(train_names) if train_names is not None else int(train_labels.max()) + 1
    if cfg.num_classes != num_classes:
        raise DataError(f"npz: {train_path} has {num_classes} classes but data.num_classes is "
                        f"{cfg.num_classes}; set --data.num_classes {num_classes}")
    own = split if split != "val" or (root / NPZ_SPLITS["val"]).is_file() else "test"
    path = root / NPZ_SPLITS[own]
    images, labels, names = read_npz(path, num_classes)
    if split == "train":
        images, labels = long_tail_subset(images, labels, num_classes, cfg)
    names = train_names or names or [f"class_{c:02d}" for c in range(num_classes)]
    ds = ArrayDataset(images, labels, names, f"npz_{split}")
    ds.source = str(path.resolve())  # val without val.npz is the test file: the same source
    if split == "train":
        check_no_empty_class(ds, f"npz train ({train_path})")
    return ds
