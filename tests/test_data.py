"""Datasets, split files, bad-input errors, transforms and seeded augmentation.

    pytest -q tests/test_data.py --durations=5
"""

import io
import json
import random
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from livt.config import DataConfig
from livt.data import build_dataset, read_split_file, train_class_counts, verify_images
from livt.data.cifar import balanced_counts, long_tail_counts
from livt.data.errors import (
    DataError,
    EmptyClassError,
    ImageReadError,
    LabelRangeError,
    MissingDataError,
    SplitFormatError,
)
from livt.data.loading import Augmented, collate, make_loader
from livt.data.samplers import EvalSampler
from livt.data.stats import class_counts, shot_groups
from livt.data.transforms import eval_transform, finetune_transform, pretrain_transform

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

# ---------------------------------------------------------------------------------------------
# CIFAR-LT counts


def test_cifar10_lt_counts_by_hand():
    assert long_tail_counts(5000, 10, 100).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert [long_tail_counts(5000, 10, g).sum() for g in (10, 50, 100)] == [20431, 13996, 12406]
    assert long_tail_counts(5000, 10, 1).tolist() == [5000] * 10


def test_cifar100_lt_counts_by_hand():
    assert [long_tail_counts(500, 100, g).sum() for g in (10, 50, 100)] == [19573, 12608, 10847]
    c = long_tail_counts(500, 100, 100)
    assert (c[0], c[-1]) == (500, 5) and np.all(np.diff(c) <= 0)


def test_balanced_counts_same_total():
    assert balanced_counts(12406, 10).tolist() == [1241] * 6 + [1240] * 4
    assert balanced_counts(10847, 100).sum() == 10847


def _fake_cifar(root: Path, per_class: int, num_classes: int = 10, with_names: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", per_class), ("test", 3)):
        labels = np.repeat(np.arange(num_classes), n)
        extra = {"class_names": np.array([f"c{i}" for i in range(num_classes)])} if with_names else {}
        np.savez(root / f"{name}.npz", images=rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8),
                 labels=labels, **extra)


def test_cifar_npz_long_tail_and_balanced(tmp_path):
    _fake_cifar(tmp_path, per_class=50)
    cfg = DataConfig(dataset="cifar10_lt", root=str(tmp_path), imbalance=10)
    train = build_dataset(cfg, "train")
    # floor(50 * 0.1^(i/9)): 50, 38.7, 29.9, 23.2, 17.9, 13.9, 10.7, 8.3, 6.4, 5
    assert class_counts(train.targets, 10).tolist() == [50, 38, 29, 23, 17, 13, 10, 8, 6, 5]
    assert train.class_names[3] == "c3" and train.load(0)[0].mode == "RGB"
    again = build_dataset(cfg, "train")
    assert np.array_equal(train.images, again.images)  # seeded selection
    other = build_dataset(replace(cfg, subset_seed=1), "train")
    assert not np.array_equal(train.images, other.images)
    bal = build_dataset(replace(cfg, balanced=True), "train")
    assert class_counts(bal.targets, 10).tolist() == [20] * 9 + [19]  # 199 images, evenly
    assert len(build_dataset(cfg, "val")) == len(build_dataset(cfg, "test")) == 30  # val = test


def test_cifar_missing_and_wrong_class_count(tmp_path):
    with pytest.raises(MissingDataError, match="--data.download true"):
        build_dataset(DataConfig(dataset="cifar10_lt", root=str(tmp_path)), "train")
    with pytest.raises(DataError, match="data.num_classes"):
        build_dataset(DataConfig(dataset="cifar100_lt", root=str(tmp_path)), "train")


def test_real_cifar10_lt(shared_data):
    cfg = DataConfig(dataset="cifar10_lt", root=str(shared_data / "cifar10"), imbalance=100)
    train = build_dataset(cfg, "train")
    assert len(train) == 12406
    assert class_counts(train.targets, 10).tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert train.class_names[:3] == ["airplane", "automobile", "bird"]
    assert train.images.shape[1:] == (32, 32, 3)


# ---------------------------------------------------------------------------------------------
# Real split files


def test_places_lt_train_statistics(shared_data):
    paths, labels = read_split_file(shared_data / "splits/Places_LT/Places_LT_train.txt")
    counts = class_counts(labels, 365)
    assert (len(paths), len(counts), counts.max(), counts.min()) == (62500, 365, 4980, 5)
    g = shot_groups(counts)
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == (131, 163, 71)
    assert paths[0] == "train/airfield/00004851.jpg"


def test_places_lt_through_build_dataset(shared_data, tmp_path):
    cfg = DataConfig(dataset="places_lt", root=str(tmp_path), num_classes=365,
                     split_dir=str(shared_data / "splits/Places_LT"))
    train = build_dataset(cfg, "train")
    assert len(train) == 62500 and train.class_names[0] == "airfield"
    assert train.class_names[8] == "apartment_building-outdoor"
    assert [len(build_dataset(cfg, s)) for s in ("val", "test")] == [7300, 36500]
    assert train_class_counts(cfg).sum() == 62500


def test_stats_command_on_places_lt(shared_data):
    proc = subprocess.run([sys.executable, "-m", "livt.data.stats",
                           str(shared_data / "splits/Places_LT/Places_LT_train.txt")],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert "62,500 images, 365 classes, max 4,980, min 5" in proc.stdout and "131 / 163 / 71" in proc.stdout
    assert "RuntimeWarning" not in proc.stderr  # the package does not import the module it runs


def test_imagenet_lt_class_counts_file(shared_data, tmp_path):
    cfg = DataConfig(dataset="imagenet_lt", root=str(tmp_path), num_classes=1000,
                     split_dir=str(shared_data / "splits/ImageNet_LT"),
                     class_counts_file="ImageNet_LT_train_class_counts.txt")
    counts = train_class_counts(cfg)
    assert (counts.sum(), len(counts), counts.max(), counts.min()) == (115846, 1000, 1280, 5)
    assert [len(v) for v in shot_groups(counts).values()] == [385, 479, 136]
    test = build_dataset(cfg, "test")
    assert len(test) == 50000 and test.class_names[0] == "n01440764"


def test_inat18_test_is_val(shared_data, tmp_path):
    cfg = DataConfig(dataset="inat18", root=str(tmp_path), num_classes=8142,
                     split_dir=str(shared_data / "splits/iNaturalist18"))
    test = build_dataset(cfg, "test")
    assert len(test) == 24426 and np.all(class_counts(test.targets, 8142) == 3)


# ---------------------------------------------------------------------------------------------
# A small image tree made here


def _png(path: Path, colour=(200, 30, 60), size=(6, 5), fmt="PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)


@pytest.fixture
def tree(tmp_path):
    """root/train/c{0,1,2}/*.png (3, 2, 1 images; one path with a space), split files in tmp_path."""
    root = tmp_path / "images"
    train = []
    for c, n in enumerate((3, 2, 1)):
        for i in range(n):
            rel = f"train/c{c}/img {i}.png" if (c, i) == (1, 1) else f"train/c{c}/{i}.png"
            _png(root / rel, colour=(40 * c, 10 * i, 100))
            train.append(f"{rel} {c}")
    _png(root / "val/c0/v.png")
    _png(root / "val/c2/v.png")
    (tmp_path / "train.txt").write_text("\n".join(train) + "\n\n")  # a blank line is fine
    (tmp_path / "val.txt").write_text("val/c0/v.png 0\nval/c2/v.png 2\n")
    cfg = DataConfig(dataset="imagenet_lt", root=str(root), split_dir=str(tmp_path), num_classes=3,
                     train_file="train.txt", val_file="val.txt", test_file="val.txt")
    return cfg, tmp_path


def test_split_file_tree_through_build_dataset(tree):
    cfg, _ = tree
    ds = build_dataset(cfg, "train")
    assert len(ds) == 6 and ds.targets.tolist() == [0, 0, 0, 1, 1, 2]
    assert ds.paths[4] == "train/c1/img 1.png"  # split on the last whitespace
    img, label = ds[4]
    assert (img.mode, img.size, label) == ("RGB", (6, 5), 1)
    assert img.getpixel((0, 0)) == (40, 10, 100)
    assert ds.origin(4).endswith("train.txt:5")
    assert len(build_dataset(cfg, "test")) == 2
    assert train_class_counts(cfg).tolist() == [3, 2, 1]
    assert verify_images(ds) == []


def test_imagenet_bal_draws_per_class(tree):
    cfg, _ = tree
    cfg = replace(cfg, dataset="imagenet_bal", per_class=1)
    ds = build_dataset(cfg, "train")
    assert class_counts(ds.targets, 3).tolist() == [1, 1, 1]
    with pytest.raises(DataError, match="class 2 has 1 images, fewer than per_class=2"):
        build_dataset(replace(cfg, per_class=2), "train")


def test_inat_json_format(tmp_path):
    root = tmp_path / "inat"
    for i in range(3):
        _png(root / f"train_val2018/x/{i}.jpg", fmt="JPEG")
    doc = {"images": [{"id": 10 + i, "file_name": f"train_val2018/x/{i}.jpg"} for i in range(3)],
           "annotations": [{"image_id": 10 + i, "category_id": c} for i, c in enumerate((1, 0, 1))],
           "categories": [{"id": 0, "name": "Aa"}, {"id": 1, "name": "Bb"}]}
    (tmp_path / "train2018.json").write_text(json.dumps(doc))
    doc["annotations"][2]["category_id"] = 5
    (tmp_path / "val2018.json").write_text(json.dumps(doc))
    cfg = DataConfig(dataset="inat18", root=str(root), split_dir=str(tmp_path), num_classes=2,
                     train_file="train2018.json", val_file="val2018.json")
    ds = build_dataset(cfg, "train")
    assert ds.targets.tolist() == [1, 0, 1] and ds.class_names == ["Aa", "Bb"]
    assert ds.load(1)[0].mode == "RGB"
    with pytest.raises(LabelRangeError, match=r"val2018\.json \(image id 12\): label 5"):
        build_dataset(cfg, "test")  # test = val


# ---------------------------------------------------------------------------------------------
# Bad inputs: the exception type, and a message naming the file and line (or class)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*imagenet_lt.*places_lt.*folder"):
        build_dataset(DataConfig(dataset="imagenet"), "train")


def test_missing_root(tree):
    cfg, tmp = tree
    with pytest.raises(MissingDataError, match="image root not found: .*nowhere"):
        build_dataset(replace(cfg, root=str(tmp / "nowhere")), "train")


def test_missing_split_file(tree):
    cfg, tmp = tree
    with pytest.raises(MissingDataError, match=re.escape(f"split file not found: {tmp / 'nope.txt'}")):
        build_dataset(replace(cfg, train_file="nope.txt"), "train")
    with pytest.raises(MissingDataError, match="ImageNet_LT_train.txt"):  # the standard name
        build_dataset(replace(cfg, train_file=""), "train")


@pytest.mark.parametrize("line", ["train/c0/0.png x", "train/c0/0.png", "train/c0/0.png -1", "a 1.5"])
def test_malformed_split_line(tree, line):
    cfg, tmp = tree
    (tmp / "bad.txt").write_text(f"train/c0/1.png 0\n{line}\n")
    with pytest.raises(SplitFormatError) as e:
        build_dataset(replace(cfg, train_file="bad.txt"), "train")
    assert f"{tmp / 'bad.txt'}:2:" in str(e.value) and repr(line) in str(e.value)


@pytest.mark.parametrize("label", [str(2**63), "9" * 5000, "\u00b2"])
def test_label_not_an_int64_is_a_format_error(tmp_path, label):
    (tmp_path / "s.txt").write_text(f"a.png 0\nb.png {label}\n")
    with pytest.raises(SplitFormatError, match=re.escape(f"{tmp_path / 's.txt'}:2: ")):
        read_split_file(tmp_path / "s.txt")
    (tmp_path / "s.txt").write_text(f"a.png 0\nb.png {2**63 - 1}\n")
    assert read_split_file(tmp_path / "s.txt")[1].tolist() == [0, 2**63 - 1]


def test_line_numbers_count_newlines_only(tmp_path):
    (tmp_path / "s.txt").write_bytes("a\x0c.png 1\r\nb\u2028c.png 2\nd.png x\n".encode())
    with pytest.raises(SplitFormatError, match=re.escape(f"{tmp_path / 's.txt'}:3: ")):
        read_split_file(tmp_path / "s.txt")


def test_label_out_of_range(tree):
    cfg, tmp = tree
    (tmp / "bad.txt").write_text("train/c0/0.png 0\ntrain/c1/0.png 1\ntrain/c2/0.png 3\n")
    with pytest.raises(LabelRangeError, match=r"bad\.txt:3: label 3 outside \[0, 3\)"):
        build_dataset(replace(cfg, train_file="bad.txt"), "train")


def test_class_without_training_image(tree):
    cfg, tmp = tree
    (tmp / "bad.txt").write_text("train/c0/0.png 0\ntrain/c2/0.png 2\n")
    with pytest.raises(EmptyClassError, match=r"bad\.txt: class 1 \(class_1\) has no training image"):
        build_dataset(replace(cfg, train_file="bad.txt"), "train")
    build_dataset(replace(cfg, val_file="bad.txt"), "val")  # only training classes must be populated


def _bad_images(tmp: Path, root: Path) -> None:
    """Line 2: missing file; line 3: random bytes; line 4: a truncated JPEG."""
    (root / "train/c0/noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "train/c1/cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp / "bad.txt").write_text("train/c0/0.png 0\ntrain/c0/gone.png 0\ntrain/c0/noise.png 0\n"
                                 "train/c1/cut.jpg 1\ntrain/c2/0.png 2\n")


@pytest.mark.parametrize("index, name, line", [(1, "gone.png", 2), (2, "noise.png", 3), (3, "cut.jpg", 4)])
def test_unreadable_image(tree, index, name, line):
    cfg, tmp = tree
    _bad_images(tmp, Path(cfg.root))
    ds = build_dataset(replace(cfg, train_file="bad.txt"), "train")  # images are not opened up front
    with pytest.raises(ImageReadError) as e:
        ds.load(index)
    assert name in str(e.value) and f"bad.txt:{line}" in str(e.value)


def test_skip_bad_images_counts_them(tree):
    cfg, tmp = tree
    _bad_images(tmp, Path(cfg.root))
    ds = build_dataset(replace(cfg, train_file="bad.txt"), "train")
    names = [e.split(":")[0].rsplit("/", 1)[1] for e in verify_images(ds)]
    assert names == ["gone.png", "noise.png", "cut.jpg"]
    assert len(verify_images(ds, max_errors=1)) == 1
    aug = Augmented(ds, eval_transform(8, MEAN, STD), seed=0, skip_bad_images=True)
    with pytest.warns(UserWarning) as warned:
        batches = list(make_loader(aug, EvalSampler(len(ds)), batch_size=4, num_workers=0))
    assert ["gone.png" in str(w.message) for w in warned] == [True, False, False]
    assert "cut.jpg" in str(warned[2].message) and "bad.txt:4" in str(warned[2].message)
    assert [(len(b[1]), b[3]) for b in batches] == [(1, 3), (1, 0)]
    assert batches[0][2].tolist() == [0] and batches[1][2].tolist() == [4]
    with pytest.raises(ImageReadError):
        Augmented(ds, eval_transform(8, MEAN, STD), seed=0)[(0, 1)]


def test_collate_all_skipped():
    images, labels, indices, n = collate([None, None])
    assert (images.shape[0], labels.dtype, indices.dtype, n) == (0, torch.int64, torch.int64, 2)


# ---------------------------------------------------------------------------------------------
# Folder datasets


def test_folder_dataset(tmp_path):
    for c, n in (("ant", 2), ("bee", 8), ("cat", 4)):
        for i in range(n):
            _png(tmp_path / f"train/{c}/{i}.png")
        _png(tmp_path / f"test/{c}/t.jpg", fmt="JPEG")
    (tmp_path / "train/cat/notes.txt").write_text("not an image")
    cfg = DataConfig(dataset="folder", root=str(tmp_path), num_classes=3, imbalance=1)
    train = build_dataset(cfg, "train")
    assert train.class_names == ["ant", "bee", "cat"]
    assert class_counts(train.targets, 3).tolist() == [2, 8, 4]
    assert len(build_dataset(cfg, "val")) == 3  # no val/: falls back to test/
    # imbalance 8, classes ranked by size: bee keeps 8, cat floor(8 / 8^0.5) = 2, ant floor(8 / 8) = 1
    sub = build_dataset(replace(cfg, imbalance=8), "train")
    assert class_counts(sub.targets, 3).tolist() == [1, 8, 2]
    (tmp_path / "train/dog").mkdir()
    with pytest.raises(EmptyClassError, match=r"train/dog: class 3 \(dog\) has no training image"):
        build_dataset(replace(cfg, num_classes=4), "train")
    with pytest.raises(DataError, match="4 class folders, but data.num_classes is 3"):
        build_dataset(cfg, "train")


# ---------------------------------------------------------------------------------------------
# Transforms and seeded augmentation


def test_transform_shapes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    for tf in (pretrain_transform(32, MEAN, STD), finetune_transform(32, MEAN, STD),
               finetune_transform(32, MEAN, STD, rand_augment="", reprob=0.0, color_jitter=0.4),
               eval_transform(32, MEAN, STD)):
        x = tf(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transform_values():
    tf = eval_transform(32, MEAN, STD)
    assert tf.transforms[0].size == 36  # int(32 / 0.875)
    x = tf(Image.new("RGB", (70, 50), (51, 102, 153)))  # a flat image stays flat
    expected = [(51 / 255 - 0.5) / 0.2, (102 / 255 - 0.4) / 0.25, (153 / 255 - 0.3) / 0.3]
    assert torch.allclose(x.mean((1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(x.std((1, 2)), torch.zeros(3), atol=1e-5)


@pytest.fixture(scope="module")
def small_synthetic():
    return build_dataset(DataConfig(num_classes=4, max_per_class=8, imbalance=2, test_per_class=5), "train")


def test_augmented_is_a_function_of_epoch_and_index(small_synthetic):
    aug = Augmented(small_synthetic, finetune_transform(32, MEAN, STD), seed=7)
    items = [(0, 3), (1, 3), (0, 5), (2, 0)]
    first = {it: aug[it] for it in items}
    torch.manual_seed(123)  # the global state must not matter
    again = {it: aug[it] for it in reversed(items)}
    for it in items:
        assert torch.equal(first[it][0], again[it][0]) and first[it][1:] == again[it][1:]
    assert not torch.equal(first[(0, 3)][0], first[(1, 3)][0])
    assert first[(0, 3)][2] == 3 and first[(0, 3)][1] == int(small_synthetic.targets[3])
    other_seed = Augmented(small_synthetic, finetune_transform(32, MEAN, STD), seed=8)[(0, 3)][0]
    assert not torch.equal(first[(0, 3)][0], other_seed)


def test_augmented_restores_global_rng(small_synthetic):
    aug = Augmented(small_synthetic, pretrain_transform(32, MEAN, STD), seed=0)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    aug[(0, 1)]
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_loader_workers_match_main_process(small_synthetic):
    aug = Augmented(small_synthetic, pretrain_transform(32, MEAN, STD), seed=0)
    items = [(3, i) for i in range(len(small_synthetic))]
    serial = torch.stack([aug[it][0] for it in items])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    batches = list(make_loader(aug, items, batch_size=5, num_workers=2))
    assert torch.equal(torch.get_rng_state(), state)  # iterating does not consume the global RNG
    assert torch.equal(torch.cat([b[0] for b in batches]), serial)
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(len(small_synthetic)))


def test_stored_size_resizes_every_split_once(tree):
    cfg = DataConfig(dataset="synthetic", num_classes=4, max_per_class=12, imbalance=3, test_per_class=5)
    full, small = build_dataset(cfg, "test"), build_dataset(replace(cfg, stored_size=16), "test")
    assert small.images.shape == (20, 16, 16, 3) and np.array_equal(small.targets, full.targets)
    assert small.source == full.source
    want = np.asarray(Image.fromarray(full.images[3]).resize((16, 16), Image.BICUBIC))
    assert np.array_equal(small.images[3], want)
    carved = build_dataset(replace(cfg, stored_size=16, val_from_train=0.2), "val")  # resized before carving
    assert carved.load(0)[0].size == (16, 16)
    with pytest.raises(DataError, match="data.stored_size must be >= 0"):
        build_dataset(replace(cfg, stored_size=-16), "test")
    with pytest.raises(ValueError, match="data.clutter must be >= 0"):
        build_dataset(replace(cfg, clutter=-1.0), "test")
    with pytest.raises(DataError, match="stored_size resizes in-memory sets"):
        build_dataset(replace(tree[0], stored_size=16), "train")  # a split-file set of JPEG files


def test_clutter_scales_the_background_only():
    from livt.data.synthetic import GRID, N_UNIFORMS, ClassTable, render_batch
    cfg = DataConfig(dataset="synthetic", num_classes=4, max_per_class=8, imbalance=1, test_per_class=40)
    assert np.array_equal(build_dataset(cfg, "test").images, build_dataset(replace(cfg, clutter=1.0), "test").images)
    rng = np.random.default_rng(0)
    classes, u, grid = rng.integers(0, 4, 200), rng.random((200, N_UNIFORMS)), rng.standard_normal((200, GRID, GRID, 3))
    noiseless = lambda clutter: render_batch(classes, u, grid, np.zeros((200, 32, 32, 3)), ClassTable(4), 32, clutter)
    corner = lambda x: x[:, :5, :5].astype(float).std(axis=(1, 2)).mean()  # background pixels, mostly
    plain, standard = noiseless(0.0), noiseless(1.0)
    assert corner(plain) < 0.2 * corner(standard)  # no grating, colour field or distractors left
