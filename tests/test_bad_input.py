"""Bad inputs through the real entry points: the specific error type, a message naming the file, line, key
or class at fault, and nothing already written lost.

    pytest -q tests/test_bad_input.py --durations=10    # about 40 s on 2 cores

The parsers' own errors are in test_data.py and test_fuzz.py, the hand-off checks on their own in
test_checkpoint.py, a run directory holding another run in test_train.py.
"""

import hashlib
import io
import json
import re

import numpy as np
import pytest
import yaml
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from livt import finetune, pretrain
from livt.checkpoint import CheckpointError, load_file_with_meta
from livt.data.errors import DataError, EmptyClassError, ImageReadError, MissingDataError
from livt.engine import RunDirError


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


def snapshot(folder) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained(run_dir) -> bool:
    """Whether any optimizer step was logged or any training state saved."""
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "state").exists()


# ---------------------------------------------------------------------------------------------
# An image tree read through split files (dataset 'imagenet_lt', 3 classes)

TREE_ARGS = ["--data", "imagenet_lt", "--data.num_classes", "3", "--data.img_size", "32",
             "--model.name", "vit_micro", "--model.patch_size", "8", "--optim.epochs", "1",
             "--optim.batch_size", "4", "--data.batch_size", "4", "--data.num_workers", "0"]
CORRUPT, TRUNCATED = "train/c0/1.jpg", "train/c1/1.jpg"


@pytest.fixture
def tree(tmp_path):
    """images/{train,val,test}/c{0,1,2}/*.{png,jpg} (train 6 / 4 / 3 images) and splits/{train,val,test}.txt.

    Returns (image root, split folder, {relative image path: 'train.txt:<line>'}).
    """
    root, splits = tmp_path / "images", tmp_path / "splits"
    splits.mkdir()
    rng = np.random.default_rng(0)
    where = {}
    for split, per_class in (("train", (6, 4, 3)), ("val", (1, 1, 1)), ("test", (2, 2, 2))):
        lines = []
        for c, n in enumerate(per_class):
            for i in range(n):
                rel = f"{split}/c{c}/{i}.{'jpg' if i % 2 else 'png'}"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / rel)
                lines.append(f"{rel} {c}")
                where[rel] = f"{split}.txt:{len(lines)}"
        (splits / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root, splits, where


def tree_args(tmp_path, root, splits, *extra):
    return [*TREE_ARGS, "--data.root", str(root), "--data.split_dir", str(splits),
            "--data.train_file", "train.txt", "--data.val_file", "val.txt", "--data.test_file", "test.txt",
            "--output_dir", str(tmp_path / "runs"), "--run_name", "bft", "--from_scratch", *extra]


def break_two_training_images(root) -> None:
    """CORRUPT: random bytes; TRUNCATED: the first half of a valid JPEG."""
    (root / CORRUPT).write_bytes(np.random.default_rng(1).bytes(600))
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / TRUNCATED).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_unreadable_training_image_stops_the_run_naming_file_and_line(tmp_path, tree):
    root, splits, where = tree
    break_two_training_images(root)
    data_before = snapshot(tmp_path)
    with pytest.raises(ImageReadError) as e:
        finetune.main(tree_args(tmp_path, root, splits))
    msg = str(e.value)
    # whichever of the two the seeded data order reaches first, with the line that lists it
    named = [rel for rel in (CORRUPT, TRUNCATED)
             if msg.startswith(f"{root / rel}: cannot decode image (listed at {splits / where[rel]})")]
    assert len(named) == 1, msg
    run_dir = tmp_path / "runs" / "bft"
    assert not list(run_dir.glob("*.safetensors")) and not (run_dir / "state").exists()
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("runs/")} == data_before


def test_skip_bad_images_completes_and_reports_the_count(tmp_path, tree, capsys):
    root, splits, where = tree
    break_two_training_images(root)
    with pytest.warns(UserWarning, match="skipping unreadable image") as warned:
        run_dir = finetune.main(tree_args(tmp_path, root, splits, "--data.skip_bad_images", "true"))
    assert "skipped 2 unreadable images (data.skip_bad_images)" in capsys.readouterr().out
    messages = [str(w.message) for w in warned if "skipping unreadable image" in str(w.message)]
    for rel in (CORRUPT, TRUNCATED):
        assert sum(f"{root / rel}: cannot decode image (listed at {splits / where[rel]})" in m
                   for m in messages) == 1, rel
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["n"] == 6  # the test split is intact and fully evaluated
    assert (run_dir / "classifier.safetensors").is_file()


def test_skip_bad_images_survives_a_micro_batch_of_bad_images(tmp_path, tree, capsys):
    root, splits, _ = tree
    break_two_training_images(root)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        finetune.main(tree_args(tmp_path, root, splits, "--data.skip_bad_images", "true",
                                "--data.batch_size", "1"))
    assert "skipped 2 unreadable images" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
@pytest.mark.parametrize("key", ["--data.root", "--data.split_dir", "--data.train_file"])
def test_missing_root_or_split_file_stops_before_training(tmp_path, tree, stage, key):
    root, splits, _ = tree
    value = {"--data.root": str(tmp_path / "no_images"), "--data.split_dir": str(tmp_path / "no_splits"),
             "--data.train_file": "no_train.txt"}[key]
    missing = {"--data.root": f"image root not found: {tmp_path / 'no_images'}",
               "--data.split_dir": f"split file not found: {tmp_path / 'no_splits' / 'train.txt'}",
               "--data.train_file": f"split file not found: {splits / 'no_train.txt'}"}[key]
    argv = tree_args(tmp_path, root, splits, key, value)
    if stage == "pretrain":
        argv = [a for a in argv if a != "--from_scratch"]
    with pytest.raises(MissingDataError) as e:
        (finetune if stage == "finetune" else pretrain).main(argv)
    assert str(e.value).startswith(missing)
    run_dir = tmp_path / "runs" / "bft"
    assert not trained(run_dir) and not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("key", ["--data.val_file", "--data.test_file"])
def test_missing_eval_split_file_stops_before_training(tmp_path, tree, key):
    root, splits, _ = tree
    with pytest.raises(MissingDataError) as e:
        finetune.main(tree_args(tmp_path, root, splits, key, "no_eval.txt"))
    assert str(e.value).startswith(f"split file not found: {splits / 'no_eval.txt'}")
    assert not trained(tmp_path / "runs" / "bft")


def test_class_without_training_image_is_named_up_front(tmp_path, tree):
    root, splits, _ = tree
    lines = (splits / "train.txt").read_text().splitlines()
    (splits / "train.txt").write_text("\n".join(ln for ln in lines if not ln.endswith(" 1")) + "\n")
    with pytest.raises(EmptyClassError) as e:
        finetune.main(tree_args(tmp_path, root, splits, "--loss.name", "bal_bce"))
    assert str(e.value).startswith(f"{splits / 'train.txt'}: class 1 (class_1) has no training image")
    assert not trained(tmp_path / "runs" / "bft")


def test_zero_in_the_test_prior_names_the_class(tmp_path, tree):
    root, splits, _ = tree
    prior_file = tmp_path / "test_prior.txt"
    prior_file.write_text("0 3\n1 0\n2 1\n")
    with pytest.raises(ValueError, match="test_prior: class 1 has count 0"):
        finetune.main(tree_args(tmp_path, root, splits, "--loss.name", "bal_bce",
                                "--loss.test_prior_file", str(prior_file)))
    assert not trained(tmp_path / "runs" / "bft")


# ---------------------------------------------------------------------------------------------
# Pretraining files that do not fit the fine-tuning run (tiny preset)


def tiny(stage, out, run_name, *extra):
    entry = pretrain if stage == "pretrain" else finetune
    return entry.main(["--data", "tiny", "--optim.epochs", "1", "--output_dir", str(out),
                       "--run_name", run_name, *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny pretraining run (vit_micro, 32 px, patch 8, synthetic 5 classes)."""
    run_dir = tiny("pretrain", tmp_path_factory.mktemp("pre"), "mgp")
    reset_accelerate()
    return run_dir


@pytest.mark.parametrize("extra, counts", [(["--data.num_classes", "4"], "has 4 classes"),
                                           (["--data.imbalance", "5"], "has 5 classes")])
def test_other_classes_than_pretraining_names_both(pretrained, tmp_path, extra, counts):
    encoder = pretrained / "encoder.safetensors"
    _, meta = load_file_with_meta(encoder)
    before = snapshot(pretrained)
    with pytest.raises(DataError) as e:
        tiny("finetune", tmp_path, "bft", "--pretrained", str(encoder), *extra)
    msg = str(e.value)
    assert msg.startswith(f"{encoder} was pretrained on 'synthetic' with 5 classes "
                          f"({sum(meta['class_counts'])} images)")
    assert re.search(rf"fine-tuning data 'synthetic' {counts} \((\d+) images\)", msg)
    assert not trained(tmp_path / "bft") and snapshot(pretrained) == before


@pytest.mark.parametrize("extra, differ", [
    (["--model.patch_size", "4"], ["patch_size: file 8 vs config 4"]),
    (["--model.name", "vit_tiny"], ["embed_dim: file 128 vs config 192", "depth: file 4 vs config 12",
                                    "num_heads: file 4 vs config 3"]),
])
def test_pretraining_file_of_another_architecture(pretrained, tmp_path, extra, differ):
    encoder = pretrained / "encoder.safetensors"
    before = snapshot(pretrained)
    with pytest.raises(CheckpointError) as e:
        tiny("finetune", tmp_path, "bft", "--pretrained", str(encoder), *extra)
    msg = str(e.value)
    assert msg.startswith(f"load_encoder({encoder}): made for another architecture: ")
    assert msg.endswith("; ".join(differ))  # exactly the fields that differ, img_size never among them
    assert not trained(tmp_path / "bft") and snapshot(pretrained) == before


@pytest.fixture(scope="module")
def finetuned_48(pretrained, tmp_path_factory):
    """A completed fine-tuning run at 48 px from the 32 px encoder (its 4x4 position grid becomes 6x6)."""
    argv = ["--pretrained", str(pretrained / "encoder.safetensors"), "--data.img_size", "48",
            "--data.test_per_class", "5"]
    out = tmp_path_factory.mktemp("ft48")
    run_dir = tiny("finetune", out, "bft48", *argv)
    reset_accelerate()
    return out, run_dir, argv


def test_other_resolution_than_pretraining_is_interpolated(finetuned_48):
    _, run_dir, _ = finetuned_48
    state, meta = load_file_with_meta(run_dir / "classifier.safetensors")
    assert meta["arch"]["img_size"] == 48 and meta["arch"]["patch_size"] == 8
    assert state["pos_embed"].shape == (1, 1 + 6 * 6, 128)
    assert json.loads((run_dir / "test_results.json").read_text())["n"] == 5 * 5


def test_resume_from_a_missing_folder_names_it_and_keeps_the_run(finetuned_48, tmp_path):
    out, run_dir, argv = finetuned_48
    before = snapshot(run_dir)
    old_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    nowhere = tmp_path / "no_such_state"
    with pytest.raises(RunDirError, match=re.escape(f"--resume: no training state at {nowhere}")):
        tiny("finetune", out, "bft48", *argv, "--resume", str(nowhere))
    after = snapshot(run_dir)
    assert after.keys() == before.keys()
    assert {k for k in before if before[k] != after[k]} <= {"config.yaml"}
    # config.yaml is rewritten before the state is looked up: same run (hash), only the volatile key differs
    new_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert new_config["config_hash"] == old_config["config_hash"]
    assert {k for k in old_config if old_config[k] != new_config[k]} <= {"resume", "git_sha"}


def test_the_livt_command_prints_a_bad_input_without_a_traceback(capsys, monkeypatch):
    from livt import cli, finetune

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["finetune", "--data", "tiny", "--method", "tau_norm", "--init_classifier", "x.safetensors"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("livt finetune: ConfigError: --method tau_norm: ") and "livt stage2" in err
    assert "Traceback" not in err
    monkeypatch.setattr(finetune, "main", lambda argv: 1 / 0)  # a defect keeps its traceback
    with pytest.raises(ZeroDivisionError):
        cli.main(["finetune"])
