"""The dataset interface, and datasets read from split files of `relative/path label` lines.

ImageNet-LT, Places-LT, iNaturalist 2018 and ImageNet-BAL are all lists of images under an image root.
Lists are parsed strictly, up front: a malformed line or a label outside [0, C) stops the run with the
file and line at fault. Images are opened only when a sample is loaded (iNat18 has 437k of them);
`verify_images` opens them all for an opt-in check. `LTDataset.open` hands over an image file not yet
decoded (`EncodedImage`), for a transform that decodes it itself (`livt.data.transforms.TrainTransform`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from livt.config import DataConfig
from livt.data.errors import (
    DataError,
    EmptyClassError,
    ImageReadError,
    LabelRangeError,
    MissingDataError,
    SplitFormatError,
)

# A truncated JPEG must raise, not be padded with grey: keep Pillow's default.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class LTDataset(torch.utils.data.Dataset):
    """A classification dataset: `load(i)` -> (RGB PIL image, label); `targets` (N,) int64.

    Subclasses set `targets`, `num_classes`, `class_names`, `name` and implement `load`. `source` names
    where the images come from (a list file, a folder, an array file's split): two splits with the same
    source are the same images, which is how a val split that is the test split is recognised.
    """

    targets: np.ndarray
    num_classes: int
    class_names: list[str]
    name: str

    @property
    def source(self) -> str:
        return self.__dict__.get("_source", self.name)

    @source.setter
    def source(self, value: str) -> None:
        self.__dict__["_source"] = value

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> tuple[Image.Image, int]:
        raise NotImplementedError

    def open(self, index: int) -> tuple[Image.Image | EncodedImage, int]:
        """(the image, label) with the decoding left to the caller where the image is a file (`EncodedImage`);
        the decoded image otherwise."""
        return self.load(index)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.load(index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self):,} images, {self.num_classes} classes)"


class ArrayDataset(LTDataset):
    """Images held in memory as uint8 (N, H, W, 3) (CIFAR, synthetic)."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, class_names: list[str], name: str):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{name}: {len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)
        self.num_classes = len(class_names)
        self.class_names = list(class_names)
        self.name = name

    def load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])


# what Pillow raises for a missing, unknown or broken image file
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class EncodedImage:
    """An image file not decoded yet, and where it is listed (`origin`, for the error messages)."""

    path: Path
    origin: str = ""

    def header(self) -> Image.Image:
        """The file opened by Pillow, which reads the header only (size, format, mode): nothing is decoded
        until `load()`."""
        try:
            return Image.open(self.path)
        except READ_ERRORS as e:
            raise self.error(e) from None

    def error(self, e: Exception) -> ImageReadError:
        """The `ImageReadError` naming the file (and origin) for a failure `e` to open or decode it."""
        where = f" (listed at {self.origin})" if self.origin else ""
        if isinstance(e, FileNotFoundError):
            return ImageReadError(f"{self.path}: image not found{where}")
        return ImageReadError(f"{self.path}: cannot decode image{where}: {e}")


def decode_rgb(img: Image.Image, source: EncodedImage) -> Image.Image:
    """Decode `img` (opened from `source`, maybe set to a reduced JPEG scale by `draft`) into RGB."""
    try:
        with img:
            img.load()  # decode now: Image.open is lazy and a truncated file fails only here
            return img.convert("RGB")
    except READ_ERRORS as e:
        raise source.error(e) from None


def open_image(path: str | Path, origin: str = "") -> Image.Image:
    """Decode an image fully into RGB; any failure is an `ImageReadError` naming the file (and origin)."""
    source = EncodedImage(Path(path), origin)
    return decode_rgb(source.header(), source)


INT64_MAX = 2**63 - 1


def _label(text: str) -> int | None:
    """A non-negative ASCII integer that fits int64, else None."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > 19:
        return None
    value = int(text)
    return value if value <= INT64_MAX else None


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines. Lines end at '\n' only (as for editors and
    `wc -l`; str.splitlines would also break at form feeds and Unicode separators)."""
    if not path.is_file():
        raise MissingDataError(f"split file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SplitFormatError(f"{path}: not a UTF-8 text file ({e})") from None
    return [(n, ln.strip()) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]


def _parse_split_file(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Paths, labels and the line number of each sample."""
    paths, labels, linenos = [], [], []
    for lineno, line in _read_lines(path):
        # split on the last whitespace so that a path may contain spaces
        parts = line.rsplit(None, 1)
        label = _label(parts[1]) if len(parts) == 2 else None
        if label is None:
            raise SplitFormatError(
                f"{path}:{lineno}: expected '<relative/path> <non-negative integer label>', got {line!r}")
        paths.append(parts[0])
        labels.append(label)
        linenos.append(lineno)
    if not paths:
        raise SplitFormatError(f"{path}: no samples in split file")
    return paths, np.array(labels, dtype=np.int64), np.array(linenos, dtype=np.int64)


def read_split_file(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse a `relative/path label` file: (paths, labels (N,) int64). Strict; errors name file:line."""
    paths, labels, _ = _parse_split_file(Path(path))
    return paths, labels


def _parse_inat_json(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[int, str]]:
    """The official iNaturalist json: paths, labels, image ids (the 'line' of a sample) and the
    category names by id."""
    if not path.is_file():
        raise MissingDataError(f"split file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {im["id"]: str(im["file_name"]) for im in data["images"]}
        anns = list(data["annotations"])
        categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SplitFormatError(f"{path}: not an iNaturalist json with 'images' (id, file_name) and "
                               f"'annotations' (image_id, category_id): {e!r}") from None
    paths, labels, ids = [], [], []
    for k, ann in enumerate(anns):
        try:
            image_id, label = ann["image_id"], ann["category_id"]
            known = image_id in images
        except (KeyError, TypeError):
            raise SplitFormatError(f"{path}: annotation {k} lacks image_id/category_id: {ann!r}") from None
        if not known:
            raise SplitFormatError(f"{path}: annotation {k} refers to unknown image id {image_id!r}")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= INT64_MAX:
            raise SplitFormatError(f"{path}: annotation {k} (image id {image_id}): bad category_id {label!r}")
        paths.append(images[image_id])
        labels.append(label)
        ids.append(image_id)
    if not paths:
        raise SplitFormatError(f"{path}: no annotations")
    return paths, np.array(labels, dtype=np.int64), np.array(ids, dtype=object), categories


class SplitFileDataset(LTDataset):
    """Images listed in a split file (`relative/path label` lines, or an iNaturalist `.json`) under `root`.

    Class names: `class_names`, else the json's categories when they cover every class, else 'class_N'.
    Checks up front that `root` exists, that the list parses and that labels lie in [0, num_classes).
    """

    def __init__(self, root: str | Path, split_file: str | Path, num_classes: int,
                 class_names: list[str] | None = None, name: str = ""):
        self.root = Path(root)
        self.split_file = Path(split_file)
        if not self.root.is_dir():
            raise MissingDataError(f"image root not found: {self.root} (set --data.root)")
        self._json = self.split_file.suffix == ".json"
        categories: dict[int, str] = {}
        if self._json:
            paths, labels, origins, categories = _parse_inat_json(self.split_file)
        else:
            paths, labels, origins = _parse_split_file(self.split_file)
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            i = bad[0]
            raise LabelRangeError(
                f"{self._origin(origins[i])}: label {labels[i]} outside [0, {num_classes}) "
                f"({len(bad)} such line(s); is data.num_classes={num_classes} right?)")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.paths = paths
        self.targets = labels
        self._origins = origins
        self.num_classes = num_classes
        if class_names is None and set(categories) == set(range(num_classes)):
            class_names = [categories[c] for c in range(num_classes)]
        width = len(str(num_classes - 1))
        self.class_names = class_names or [f"class_{c:0{width}d}" for c in range(num_classes)]
        self.name = name or self.split_file.stem
        self.source = str(self.split_file.resolve())

    def keep(self, indices: np.ndarray) -> None:
        """Keep only these entries of the list, in this order (balanced subsets)."""
        self.paths = [self.paths[i] for i in indices]
        self.targets, self._origins = self.targets[indices], self._origins[indices]

    def _origin(self, o: object) -> str:
        return f"{self.split_file} (image id {o})" if self._json else f"{self.split_file}:{o}"

    def origin(self, index: int) -> str:
        """Where sample `index` is listed: 'file:line' (or 'file (image id N)')."""
        return self._origin(self._origins[index])

    def load(self, index: int) -> tuple[Image.Image, int]:
        return open_image(self.root / self.paths[index], self.origin(index)), int(self.targets[index])

    def open(self, index: int) -> tuple[EncodedImage, int]:
        return EncodedImage(self.root / self.paths[index], self.origin(index)), int(self.targets[index])


class SubsetDataset(LTDataset):
    """Entries `indices` of `base` (a val split carved from train, and the train split that remains)."""

    def __init__(self, base: LTDataset, indices: np.ndarray, name: str) -> None:
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.targets = base.targets[self.indices]
        self.num_classes, self.class_names, self.name = base.num_classes, base.class_names, name
        self.source = f"{base.source} [{name}]"

    def load(self, index: int) -> tuple[Image.Image, int]:
        return self.base.load(int(self.indices[index]))

    def open(self, index: int) -> tuple[Image.Image | EncodedImage, int]:
        return self.base.open(int(self.indices[index]))


def carve_val(targets: np.ndarray, num_classes: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): a stratified val split of `fraction` of each class.

    Class c of n_c images gives min(ceil(fraction * n_c), n_c - 1) images to val (a seeded draw), so every
    class keeps at least one training image and every class with two or more appears in val. Both index
    lists are sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"data.val_from_train must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 7919])
    val = []
    for c in range(num_classes):
        idx = np.flatnonzero(targets == c)
        k = min(int(np.ceil(fraction * len(idx))), len(idx) - 1)
        if k > 0:
            val.append(rng.choice(idx, size=k, replace=False))
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(targets)), val_idx)
    return train_idx, val_idx


def verify_images(dataset: LTDataset, max_errors: int = 20) -> list[str]:
    """Open every image of `dataset`; the messages of the first `max_errors` failures (empty = all fine)."""
    errors = []
    for i in range(len(dataset)):
        try:
            dataset.load(i)
        except ImageReadError as e:
            errors.append(str(e))
            if len(errors) >= max_errors:
                break
    return errors


def read_class_names(path: Path, num_classes: int) -> list[str]:
    """`<label> <name>` per line (names may contain '/' but not whitespace-only) -> names in label order."""
    names: dict[int, str] = {}
    for lineno, line in _read_lines(path):
        parts = line.split(None, 1)
        label = _label(parts[0]) if len(parts) == 2 else None
        if label is None or label in names:
            raise SplitFormatError(
                f"{path}:{lineno}: expected '<label> <name>' with a new label, got {line!r}")
        names[label] = parts[1]
    if sorted(names) != list(range(num_classes)):
        raise SplitFormatError(f"{path}: expected names for labels 0..{num_classes - 1}, "
                               f"got {len(names)} labels (is data.num_classes={num_classes} right?)")
    return [names[c] for c in range(num_classes)]


def class_counts(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class, (C,) int64."""
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.int64)


def check_no_empty_counts(counts: np.ndarray, source: str, class_names: list[str] | None = None) -> None:
    """EmptyClassError naming the classes with no training image (their prior would be 0: log 0)."""
    empty = np.flatnonzero(np.asarray(counts) == 0)
    if len(empty):
        names = [f"{c} ({class_names[c]})" if class_names else str(c) for c in empty[:10]]
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise EmptyClassError(
            f"{source}: class {', '.join(names)}{more} has no training image; the class prior would be 0 "
            f"(log 0 in the balanced losses). Drop the class or add images.")


def check_no_empty_class(ds: LTDataset, source: str = "") -> None:
    """EmptyClassError naming the class when a training set lacks one (the list file by default)."""
    check_no_empty_counts(class_counts(ds.targets, ds.num_classes),
                          source or str(getattr(ds, "split_file", ds.name)), ds.class_names)


def balanced_indices(labels: np.ndarray, num_classes: int, per_class: int, seed: int,
                     source: str) -> np.ndarray:
    """`per_class` entries of every class, a seeded draw without replacement, kept in list order."""
    rng = np.random.RandomState(seed)
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            kind = EmptyClassError if len(idx) == 0 else DataError
            raise kind(f"{source}: class {c} has {len(idx)} images, fewer than per_class={per_class}")
        rng.shuffle(idx)
        keep.append(idx[:per_class])
    return np.sort(np.concatenate(keep))


# ---------------------------------------------------------------------------------------------
# Presets: the standard split-file names of each dataset


STANDARD_FILES = {
    "imagenet_lt": {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
                    "test": "ImageNet_LT_test.txt", "names": "ImageNet_LT_label_to_wnid.txt"},
    "places_lt": {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt",
                  "test": "Places_LT_test.txt", "names": "Places_LT_label_to_name.txt"},
    # the field reports iNat18 on its val set: test = val
    "inat18": {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt",
               "test": "iNaturalist18_val.txt", "names": ""},
}
STANDARD_NUM_CLASSES = {"imagenet_lt": 1000, "imagenet_bal": 1000, "places_lt": 365, "inat18": 8142}


def split_dir(cfg: DataConfig) -> Path:
    if not (cfg.split_dir or cfg.root):
        raise MissingDataError(f"{cfg.dataset}: data.root is not set (the image root; split files are "
                               "read from data.split_dir, default the root)")
    return Path(cfg.split_dir or cfg.root)


def resolve(cfg: DataConfig, name: str) -> Path:
    """An explicit file name: absolute, or relative to the split folder."""
    path = Path(name)
    return path if path.is_absolute() else split_dir(cfg) / path


def split_file(cfg: DataConfig, split: str, files: dict[str, str]) -> Path:
    explicit = {"train": cfg.train_file, "val": cfg.val_file, "test": cfg.test_file}[split]
    if split == "test" and not explicit and files["test"] == files["val"]:
        explicit = cfg.val_file  # test = val (iNat18): follow an explicit val file
    return resolve(cfg, explicit or files[split])


def _class_names(cfg: DataConfig, files: dict[str, str], listing: Path) -> list[str] | None:
    if listing.suffix == ".json":
        return None  # the json's own categories
    names = split_dir(cfg) / files["names"] if files["names"] else None
    return read_class_names(names, cfg.num_classes) if names is not None and names.is_file() else None


def build_split_dataset(cfg: DataConfig, split: str) -> SplitFileDataset:
    """ImageNet-LT, Places-LT and iNaturalist 2018 from their split files (or iNat's json)."""
    files = STANDARD_FILES[cfg.dataset]
    listing = split_file(cfg, split, files)
    ds = SplitFileDataset(cfg.root, listing, cfg.num_classes, _class_names(cfg, files, listing),
                          name=f"{cfg.dataset}_{split}")
    if split == "train":
        check_no_empty_class(ds)
    return ds


def build_imagenet_bal(cfg: DataConfig, split: str) -> SplitFileDataset:
    """ImageNet-BAL: `per_class` images of every class drawn (seed `subset_seed`) from a full ImageNet
    train list given as `train_file`; val and test are ImageNet-LT's."""
    files = STANDARD_FILES["imagenet_lt"]
    if split != "train":
        listing = split_file(cfg, split, files)
        return SplitFileDataset(cfg.root, listing, cfg.num_classes, _class_names(cfg, files, listing),
                                name=f"imagenet_bal_{split}")
    if not cfg.train_file:
        raise MissingDataError(
            "imagenet_bal: set --data.train_file to a list of the full ImageNet train set "
            "('train/<wnid>/<file>.JPEG label' per line); the balanced subset is drawn from it")
    listing = resolve(cfg, cfg.train_file)
    ds = SplitFileDataset(cfg.root, listing, cfg.num_classes, _class_names(cfg, files, listing),
                          name="imagenet_bal_train")
    ds.keep(balanced_indices(ds.targets, cfg.num_classes, cfg.per_class, cfg.subset_seed, str(listing)))
    return ds
