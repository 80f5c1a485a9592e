"""Class counts, shot groups and imbalance; also a command:

    python -m livt.data.stats ../shared/data/splits/Places_LT/Places_LT_train.txt
    # 62,500 images, 365 classes, max 4,980, min 5, imbalance 996.0, many/medium/few 131 / 163 / 71

Accepts a split file (`relative/path label` per line), a class-count file (`label count` per line) or
an `npz` dataset file (`labels`, optional `class_names`: `livt stats my_data/train.npz`).

The dependency runs one way: this module reads the split and npz formats of livt.data.splits and
livt.data.cifar, which never import it.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np

from livt.data.cifar import read_npz_labels
from livt.data.errors import MissingDataError, SplitFormatError
from livt.data.splits import class_counts, read_split_file

MANY_MIN = 101  # many-shot: more than 100 training images
FEW_MAX = 19  # few-shot: fewer than 20
INT64_MAX = 2**63 - 1


def shot_groups(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Class indices of the many (>100), medium (20-100) and few (<20) shot groups."""
    counts = np.asarray(counts)
    return {
        "many": np.flatnonzero(counts >= MANY_MIN),
        "medium": np.flatnonzero((counts > FEW_MAX) & (counts < MANY_MIN)),
        "few": np.flatnonzero(counts <= FEW_MAX),
    }


def read_class_counts(path: str | Path) -> np.ndarray:
    """Read a `<label> <count>` file (labels 0..C-1, each once; lines end at '\\n')."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"class-count file not found: {path}")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise SplitFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    pairs: dict[int, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise SplitFormatError(f"{path}:{lineno}: expected '<label> <count>' (two non-negative "
                                   f"integers), got {line!r}")
        label, count = int(parts[0]), int(parts[1])
        if label in pairs:
            raise SplitFormatError(f"{path}:{lineno}: label {label} repeated")
        if count > INT64_MAX or label > INT64_MAX:
            raise SplitFormatError(f"{path}:{lineno}: number out of the int64 range in {line!r}")
        pairs[label] = count
    if not pairs:
        raise SplitFormatError(f"{path}: no class counts in file")
    num_classes = max(pairs) + 1
    if len(pairs) != num_classes:
        missing = list(itertools.islice((c for c in range(num_classes) if c not in pairs), 10))  # lazy
        raise SplitFormatError(f"{path}: labels {missing} missing (expected 0..{num_classes - 1})")
    return np.array([pairs[c] for c in range(num_classes)], dtype=np.int64)


def describe(counts: np.ndarray, name: str = "train") -> str:
    """One line: images, classes, max, min, imbalance and shot-group sizes."""
    counts = np.asarray(counts)
    g = shot_groups(counts)
    imbalance = counts.max() / max(counts.min(), 1)
    return (f"{name}: {counts.sum():,} images, {len(counts):,} classes, max {counts.max():,}, "
            f"min {counts.min():,}, imbalance {imbalance:.1f}, many/medium/few "
            f"{len(g['many'])} / {len(g['medium'])} / {len(g['few'])}")


def counts_from_file(path: str | Path) -> np.ndarray:
    """Class counts of a split file, a class-count file (told apart by the first column) or an npz file."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"file not found: {path}")
    if path.suffix == ".npz":
        labels, names = read_npz_labels(path)
        return class_counts(labels, len(names) if names is not None else int(labels.max()) + 1)
    first = next((ln for ln in path.read_text(errors="replace").split("\n") if ln.strip()), "")
    if not first:
        raise SplitFormatError(f"{path}: empty file")
    if first.split()[0].isdigit():
        return read_class_counts(path)
    _, labels = read_split_file(path)
    return class_counts(labels, int(labels.max()) + 1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    for path in argv:
        print(describe(counts_from_file(path), Path(path).name))


if __name__ == "__main__":
    main()
