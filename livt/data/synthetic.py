"""SyntheticLT: the built-in long-tailed dataset (kind 'synthetic'), for the CPU demo and the tests.

Each class is a composition of 2-3 primitive shapes (disk, ring, cross, triangle, hollow square, striped
square, bar, checker) in a class-specific layout: which primitives, where each sits relative to the
others, its size and its orientation. The class table is fixed by the number of classes alone; the
samples depend on `subset_seed`. Every image shows one object under a random pose (rotation +-30
degrees, scale 0.8-1.2, translation up to an eighth of the image), each part in its own random colour,
over a cluttered background (a random base colour, a colour grating and low-frequency colour noise),
with up to two distractor primitives, and pixel noise (`data.clutter` scales the grating, the colour noise and
the distractor probability: 1 is this standard set, 0 leaves the object alone on a plain random colour with
pixel noise; the demo uses 0). Colours are drawn independently of the class, and
foreground and background colours have the same distribution, so the mean colour of an image carries no
class information: the classes differ only in shape and arrangement.

Counts: class i has floor(max_per_class * (1/imbalance)^(i/(C-1))) training images (or, with `balanced`,
the same total spread evenly), val has test_per_class // 5 and test test_per_class images per class.
Images are rendered up front into memory, from one random stream per (seed, split, class): the first k
images of a class are the same whatever the requested count, so the long-tailed set is a subset of the
balanced one of the same seed. Same config, same bytes; about 0.3 s for 2,500 32x32 images on one core.

    python benchmarks/synthetic_baselines.py   # linear probe vs small ViT/CNN on this data
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from livt.config import DataConfig
from livt.data.cifar import train_profile
from livt.data.splits import ArrayDataset

PRIMITIVES = ("disk", "ring", "cross", "triangle", "frame", "stripes", "bar", "checker")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
ROTATION = np.pi / 6  # object pose: uniform in +-ROTATION
PART_RADIUS = 0.16  # of the image side, at object scale 1
LAYOUT_EXTENT = 2.6  # the parts of an object lie within this many part radii of its centre
TRANSLATION = 0.12  # object centre: uniform in +-TRANSLATION * image side
DISTRACTOR_PROB = 0.5  # per distractor slot (two slots)
NOISE_STD = 0.03  # pixel noise, on the 0-1 scale
GRID = 4  # low-frequency background noise: a GRID x GRID colour field, upsampled
MAX_PARTS = 3
CLASS_TABLE_SEED = 20230310


class ClassTable:
    """Per class: part kinds (K,), offsets (K, 2) in part radii, part angles (K,), part sizes (K,).

    Each class has its own multiset of primitives while C allows it (up to 156 classes), so classes
    never coincide under a rotation or a mirror.
    """

    def __init__(self, num_classes: int):
        rng = np.random.default_rng([CLASS_TABLE_SEED, num_classes])
        t = len(PRIMITIVES)
        pairs = [(a, b) for a in range(t) for b in range(a + 1, t)]
        triples = [(a, b, c) for a in range(t) for b in range(a + 1, t) for c in range(b + 1, t)]
        repeats = ([(a, a) for a in range(t)]
                   + [(a, a, b) for a in range(t) for b in range(t) if a != b])
        order = [np.array(x, dtype=object) for x in (pairs, triples, repeats)]
        for x in order:
            rng.shuffle(x)
        # interleave pairs and triples so that any C mixes 2- and 3-part classes
        combos = [c for pt in zip(order[0], order[1][: len(order[0])], strict=True) for c in pt]
        combos += list(order[1][len(order[0]):]) + list(order[2])
        while len(combos) < num_classes:  # beyond 156 classes: same multisets, new layouts
            combos += combos[: num_classes - len(combos)]
        self.num_classes = num_classes
        self.kinds = np.full((num_classes, MAX_PARTS), -1, dtype=np.int64)
        self.offsets = np.zeros((num_classes, MAX_PARTS, 2))
        self.angles = np.zeros((num_classes, MAX_PARTS))
        self.sizes = np.ones((num_classes, MAX_PARTS))
        for c in range(num_classes):
            kinds = rng.permutation(np.array(combos[c], dtype=np.int64))
            k = len(kinds)
            self.kinds[c, :k] = kinds
            self.sizes[c, :k] = rng.uniform(0.8, 1.25, k)
            self.angles[c, :k] = rng.uniform(-np.pi, np.pi, k)
            self.offsets[c, :k] = self._layout(rng, self.sizes[c, :k])

    @staticmethod
    def _layout(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
        """Part centres (in part radii) around the object centre; parts touch at most lightly."""
        k = len(sizes)
        while True:  # rejection sampling, 1024 candidate layouts at a time
            pts = rng.uniform(-LAYOUT_EXTENT, LAYOUT_EXTENT, (1024, k, 2))
            pts -= pts.mean(1, keepdims=True)
            dist = np.linalg.norm(pts[:, :, None] - pts[:, None], axis=-1)  # (1024, k, k)
            gap = dist - 0.9 * (sizes[:, None] + sizes[None])
            gap[:, np.eye(k, dtype=bool)] = np.inf
            reach = np.linalg.norm(pts, axis=-1) + sizes
            ok = (gap.min((1, 2)) > 0.1) & (reach.max(1) <= LAYOUT_EXTENT)
            if ok.any():
                return pts[np.argmax(ok)]


# ---------------------------------------------------------------------------------------------
# Rendering


def _signed_distance(kind: int, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside, in units of the part radius) of primitive `kind` at (p, q)."""
    name = PRIMITIVES[kind]
    r = np.hypot(p, q)
    box = np.maximum(np.abs(p), np.abs(q))
    if name == "disk":
        return 0.8 - r
    if name == "ring":
        return 0.22 - np.abs(r - 0.7)
    if name == "cross":
        return np.maximum(np.minimum(0.25 - np.abs(p), 0.95 - np.abs(q)),
                          np.minimum(0.25 - np.abs(q), 0.95 - np.abs(p)))
    if name == "triangle":  # equilateral, circumradius 1, inradius 0.5
        a = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        return np.min(0.5 - (p[..., None] * np.cos(a) + q[..., None] * np.sin(a)), axis=-1)
    if name == "frame":
        return np.minimum(0.8 - box, box - 0.42)
    if name == "stripes":  # three bars across a square
        return np.minimum(0.8 - box, np.sin(np.pi * 1.9 * p) / (np.pi * 1.9))
    if name == "bar":
        return np.minimum(0.95 - np.abs(p), 0.28 - np.abs(q))
    if name == "checker":
        return np.minimum(0.8 - box, np.minimum(np.abs(p), np.abs(q)) * np.sign(p * q))
    raise KeyError(kind)


class _Layer:
    """One drawing slot per image: which primitive (-1 = none), where, how large, what colour."""

    def __init__(self, n: int):
        self.kind = np.full(n, -1, dtype=np.int64)
        self.centre = np.zeros((n, 2))  # pixels from the image centre (x, y)
        self.angle = np.zeros(n)
        self.radius = np.ones(n)  # pixels
        self.colour = np.zeros((n, 3))


def _contrasting(base: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A colour at circular distance 0.3-0.7 from `base` in every channel: uniform when `base` is."""
    return (base + 0.3 + 0.4 * u) % 1.0


N_UNIFORMS = 14 + 2 * 9 + MAX_PARTS * 7  # columns of the per-image parameter matrix


def _draw_layers(classes: np.ndarray, u: np.ndarray, table: ClassTable, size: int, clutter: float = 1.0):
    """Turn the per-image uniforms into background and drawing layers (distractors first)."""
    n = len(classes)
    cols = iter(range(u.shape[1]))
    col = lambda: u[:, next(cols)]
    bg = np.stack([col(), col(), col()], 1)
    bg2 = np.stack([col(), col(), col()], 1)
    grating = dict(angle=col() * np.pi, freq=0.15 + 0.35 * col(), phase=col() * 2 * np.pi, amp=0.25 * clutter * col())
    centre = (np.stack([col(), col()], 1) - 0.5) * 2 * TRANSLATION * size
    theta = (col() - 0.5) * 2 * ROTATION
    scale = 0.8 + 0.4 * col()
    unit = PART_RADIUS * size * scale  # (n,) pixels per part radius

    layers = []
    for _ in range(2):  # distractors: any primitive, anywhere, under the object
        d = _Layer(n)
        present = col() < DISTRACTOR_PROB * clutter
        kind = np.minimum((col() * len(PRIMITIVES)).astype(np.int64), len(PRIMITIVES) - 1)
        d.kind = np.where(present, kind, -1)
        d.centre = (np.stack([col(), col()], 1) - 0.5) * 0.9 * size
        d.angle = col() * 2 * np.pi
        d.radius = PART_RADIUS * size * (0.6 + 0.4 * col())
        d.colour = _contrasting(bg, np.stack([col(), col(), col()], 1))
        layers.append(d)

    cos, sin = np.cos(theta), np.sin(theta)
    for k in range(MAX_PARTS):
        p = _Layer(n)
        p.kind = table.kinds[classes, k]
        off = table.offsets[classes, k] * (1 + 0.08 * (np.stack([col(), col()], 1) - 0.5))
        p.centre = centre + unit[:, None] * np.stack(
            [cos * off[:, 0] - sin * off[:, 1], sin * off[:, 0] + cos * off[:, 1]], 1)
        p.angle = theta + table.angles[classes, k] + (col() - 0.5) * 0.3
        p.radius = unit * table.sizes[classes, k] * (0.9 + 0.2 * col())
        p.colour = _contrasting(bg, np.stack([col(), col(), col()], 1))
        layers.append(p)
    return bg, bg2, grating, layers


def render_batch(classes: np.ndarray, u: np.ndarray, grid: np.ndarray, noise: np.ndarray,
                 table: ClassTable, size: int, clutter: float = 1.0) -> np.ndarray:
    """Images (n, size, size, 3) uint8 of `classes`, from uniforms u (n, N_UNIFORMS), standard-normal
    background fields grid (n, GRID, GRID, 3) and pixel noise (n, size, size, 3); `clutter` scales the
    background grating and noise and the distractor probability (1 = the standard set)."""
    n = len(classes)
    bg, bg2, g, layers = _draw_layers(classes, u, table, size, clutter)
    ax = np.arange(size, dtype=np.float32) - (size - 1) / 2
    y, x = np.meshgrid(ax, ax, indexing="ij")  # (S, S) pixel centres

    # background: base colour, a colour grating, low-frequency colour noise
    phase = (np.cos(g["angle"])[:, None, None] * x + np.sin(g["angle"])[:, None, None] * y) \
        * g["freq"][:, None, None] + g["phase"][:, None, None]
    mix = (g["amp"][:, None, None] * (0.5 + 0.5 * np.sin(phase)))[..., None]  # (n, S, S, 1)
    img = (bg[:, None, None] * (1 - mix) + bg2[:, None, None] * mix).astype(np.float32)
    field = F.interpolate(torch.from_numpy(grid.astype(np.float32)).permute(0, 3, 1, 2), size=(size, size),
                          mode="bicubic", align_corners=False).permute(0, 2, 3, 1).numpy()
    img += 0.06 * clutter * field

    for layer in layers:
        alpha = np.zeros((n, size, size), dtype=np.float32)
        for kind in range(len(PRIMITIVES)):
            sel = np.flatnonzero(layer.kind == kind)
            if not len(sel):
                continue
            c, s = np.cos(layer.angle[sel])[:, None, None], np.sin(layer.angle[sel])[:, None, None]
            dx = x - layer.centre[sel, 0, None, None]
            dy = y - layer.centre[sel, 1, None, None]
            r = layer.radius[sel, None, None]
            p, q = (c * dx + s * dy) / r, (-s * dx + c * dy) / r  # part frame, in part radii
            alpha[sel] = np.clip(_signed_distance(kind, p, q) * r + 0.5, 0, 1)  # 1-pixel soft edge
        a = alpha[..., None]
        img = img * (1 - a) + layer.colour[:, None, None].astype(np.float32) * a

    img += NOISE_STD * noise
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def _streams(seed: int, split: str, c: int) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([seed, SPLIT_CODE[split], c])
    return [np.random.default_rng(s) for s in ss.spawn(3)]


def render(class_id: int, rng: np.random.Generator, num_classes: int = 10, size: int = 32) -> np.ndarray:
    """One image (size, size, 3) uint8 of `class_id`, drawn with `rng`."""
    u = rng.random((1, N_UNIFORMS))
    grid = rng.standard_normal((1, GRID, GRID, 3))
    noise = rng.standard_normal((1, size, size, 3), dtype=np.float32)
    return render_batch(np.array([class_id]), u, grid, noise, ClassTable(num_classes), size)[0]


def split_counts(cfg: DataConfig, split: str) -> np.ndarray:
    """Images per class of a split of the synthetic set."""
    if split == "train":
        return train_profile(cfg.max_per_class, cfg.num_classes, cfg.imbalance, cfg.balanced)
    per_class = cfg.test_per_class // 5 if split == "val" else cfg.test_per_class
    return np.full(cfg.num_classes, per_class, dtype=np.int64)


class SyntheticLT(ArrayDataset):
    """The synthetic long-tailed set of `cfg` (see the module docstring), one split, held in memory."""

    def __init__(self, cfg: DataConfig, split: str):
        if split not in SPLIT_CODE:
            raise ValueError(f"split must be one of {', '.join(SPLIT_CODE)}, got {split!r}")
        if cfg.num_classes < 2:
            raise ValueError(f"synthetic: num_classes must be >= 2, got {cfg.num_classes}")
        if cfg.clutter < 0:
            raise ValueError(f"synthetic: data.clutter must be >= 0 (1 = the standard set), got {cfg.clutter}")
        self.table = ClassTable(cfg.num_classes)
        counts = split_counts(cfg, split)
        # render the classes batched together (vectorised), from their own streams
        u, grid, noise, labels = [], [], [], []
        for c, n in enumerate(counts):
            params, fields, pixels = _streams(cfg.subset_seed, split, c)
            u.append(params.random((n, N_UNIFORMS)))
            grid.append(fields.standard_normal((n, GRID, GRID, 3)))
            noise.append(pixels.standard_normal((n, cfg.img_size, cfg.img_size, 3), dtype=np.float32))
            labels.append(np.full(n, c, dtype=np.int64))
        labels = np.concatenate(labels)
        images = render_batch(labels, np.concatenate(u), np.concatenate(grid), np.concatenate(noise),
                              self.table, cfg.img_size, cfg.clutter)
        width = len(str(cfg.num_classes - 1))
        names = [f"class_{c:0{max(width, 2)}d}" for c in range(cfg.num_classes)]
        super().__init__(images, labels, names, f"synthetic_{split}")
