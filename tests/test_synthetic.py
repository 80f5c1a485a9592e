"""The built-in synthetic long-tailed set: counts, determinism, and no class information in colour.

    pytest -q tests/test_synthetic.py --durations=5
"""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from livt.config import DataConfig
from livt.data import build_dataset, train_class_counts
from livt.data.stats import class_counts
from livt.data.synthetic import PRIMITIVES, ClassTable, SyntheticLT, render

CFG = DataConfig(dataset="synthetic", num_classes=5, max_per_class=100, imbalance=10, test_per_class=20)


def test_split_counts_by_hand():
    # floor(100 * 0.1^(i/4)): 100, 56.2, 31.6, 17.8, 10
    assert class_counts(build_dataset(CFG, "train").targets, 5).tolist() == [100, 56, 31, 17, 10]
    assert train_class_counts(CFG).tolist() == [100, 56, 31, 17, 10]
    assert class_counts(build_dataset(CFG, "val").targets, 5).tolist() == [4] * 5
    assert class_counts(build_dataset(CFG, "test").targets, 5).tolist() == [20] * 5
    default = build_dataset(DataConfig(test_per_class=1), "train")  # the demo's 10 classes
    assert class_counts(default.targets, 10).tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


def test_balanced_variant_has_the_same_size():
    bal = build_dataset(replace(CFG, balanced=True), "train")
    assert class_counts(bal.targets, 5).tolist() == [43, 43, 43, 43, 42]  # 214 images


def test_images_and_interface():
    ds = build_dataset(replace(CFG, img_size=24), "val")
    assert ds.images.shape == (20, 24, 24, 3) and ds.images.dtype == np.uint8
    img, label = ds[7]
    assert (img.mode, img.size, label) == ("RGB", (24, 24), int(ds.targets[7]))
    assert ds.class_names == ["class_00", "class_01", "class_02", "class_03", "class_04"]
    assert ds.name == "synthetic_val" and ds.num_classes == 5


def test_deterministic_and_seeded():
    a, b = SyntheticLT(CFG, "test"), SyntheticLT(CFG, "test")
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.targets, b.targets)
    other = SyntheticLT(replace(CFG, subset_seed=1), "test")
    assert not np.array_equal(a.images, other.images)
    val = SyntheticLT(CFG, "val")
    assert not any(np.array_equal(v, t) for v in val.images[:4] for t in a.images[:20])  # splits differ


def test_long_tail_is_a_subset_of_the_full_set():
    lt = SyntheticLT(CFG, "train")
    full = SyntheticLT(replace(CFG, imbalance=1), "train")
    for c, n in enumerate([100, 56, 31, 17, 10]):
        assert np.array_equal(lt.images[lt.targets == c], full.images[full.targets == c][:n])


def test_render_one_image():
    a = render(3, np.random.default_rng(0), num_classes=5, size=32)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(3, np.random.default_rng(0), num_classes=5, size=32))
    assert not np.array_equal(a, render(3, np.random.default_rng(1), num_classes=5, size=32))


def test_classes_are_distinct_compositions():
    table = ClassTable(100)
    parts = [tuple(sorted(k for k in row if k >= 0)) for row in table.kinds]
    assert len(set(parts)) == 100  # no two classes share their multiset of primitives
    assert Counter(len(p) for p in parts).keys() <= {2, 3}
    assert set(np.unique(table.kinds[table.kinds >= 0])) == set(range(len(PRIMITIVES)))
    assert np.array_equal(ClassTable(100).offsets, table.offsets)  # fixed by C alone


@pytest.fixture(scope="module")
def ten_classes():
    return SyntheticLT(DataConfig(num_classes=10, test_per_class=60), "test")


def test_mean_colour_does_not_identify_the_class(ten_classes):
    x = ten_classes.images.reshape(len(ten_classes), -1, 3).mean(1) / 255  # (N, 3) mean colour per image
    y = ten_classes.targets
    fit = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(10)])
    held = np.setdiff1d(np.arange(len(y)), fit)
    centroids = np.stack([x[fit][y[fit] == c].mean(0) for c in range(10)])
    pred = np.argmin(((x[held, None] - centroids[None]) ** 2).sum(-1), axis=1)
    accuracy = (pred == y[held]).mean()
    assert accuracy < 0.2  # chance is 0.1
    # the class means of the mean colour differ from mid-grey by sampling noise only
    stderr = x.std(0) / np.sqrt(60)
    assert np.abs((centroids - 0.5) / stderr).max() < 4 and x.std(0).min() > 0.1


def test_classes_vary_within(ten_classes):
    imgs = ten_classes.images[ten_classes.targets == 0].astype(np.float32) / 255
    assert imgs.std(0).mean() > 0.2  # pixel-wise spread across images of one class
