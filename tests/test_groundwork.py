"""The shared mechanisms every method builds on: honest model selection, the carved val split, the
per-dataset evaluation crop, method recipes layered with the presets, provenance, the installed wheel."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState

from livt import config as c
from livt import finetune
from livt.data import build_dataset, heldout_val, train_class_counts
from livt.data.splits import carve_val
from livt.data.transforms import eval_transform
from livt.losses import build_loss

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def cifar_like(root: Path, per_class: int = 30, test_per_class: int = 4, classes: int = 10) -> Path:
    """A CIFAR-format folder (train.npz / test.npz) of random 32 px images: val = test, as CIFAR's."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(classes), n)
        images = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
        np.savez(root / f"{name}.npz", images=images, labels=labels)
    return root


# ---------------------------------------------------------------------------------------------
# Honest model selection


def test_no_heldout_val_reports_the_last_epoch_and_says_so(tmp_path):
    root = cifar_like(tmp_path / "cifar")
    run_dir = finetune.main([
        "--data", "tiny", "--data.dataset", "cifar10_lt", "--data.num_classes", "10", "--data.root", str(root),
        "--data.imbalance", "3", "--optim.epochs", "2", "--eval_every", "1", "--from_scratch",
        "--output_dir", str(tmp_path / "out"), "--run_name", "cifar"])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["selection"] == {"rule": "last", "epoch": 2, "val": "none: val is the test split",
                                    "select": "auto"}
    assert "rule" in (run_dir / "test_results.md").read_text()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_top1" in r for r in rows)  # the test split is not even looked at during training
    # asking to select on such a val split is refused, naming the way out
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(c.ConfigError, match="best_val.*test split.*val_from_train"):
        finetune.main(["--data", "tiny", "--data.dataset", "cifar10_lt", "--data.num_classes", "10",
                       "--data.root", str(root), "--select", "best_val", "--from_scratch",
                       "--output_dir", str(tmp_path / "out"), "--run_name", "cifar2"])


def test_heldout_val_selects_on_val_and_records_the_epoch(tmp_path):
    run_dir = finetune.main(["--data", "tiny", "--from_scratch", "--optim.epochs", "3",
                             "--output_dir", str(tmp_path), "--run_name", "syn"])
    results = json.loads((run_dir / "test_results.json").read_text())
    sel = results["selection"]
    assert sel["rule"] == "best_val" and sel["val"].startswith("synthetic_val") and 1 <= sel["epoch"] <= 3
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val_top1" in r]
    assert len(val_rows) == 3
    best = max(val_rows, key=lambda r: r["val_top1"])  # first maximum, as the loop's strict '>'
    assert sel["epoch"] == best["epoch"]
    # what the run spent, and the provenance of the code that made it
    assert results["budget"]["epochs"] == 3 and results["budget"]["images_seen"] == results["budget"]["steps"] * 16
    prov = results["provenance"]
    assert set(prov) == {"git_commit", "git_dirty", "versions", "cuda_visible_devices"}
    assert prov["versions"]["torch"] == str(torch.__version__) and prov["versions"]["timm"]
    assert prov["git_commit"] is None or len(prov["git_commit"]) == 40
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["provenance"]["versions"] == prov["versions"] and saved["config_hash"] == results["config_hash"]


def test_an_empty_val_split_is_refused_up_front(tmp_path):
    with pytest.raises(c.ConfigError, match="val split .* is empty.*--select last"):
        finetune.main(["--data", "tiny", "--from_scratch", "--data.test_per_class", "4",
                       "--output_dir", str(tmp_path), "--run_name", "noval"])
    assert not (tmp_path / "noval" / "state").exists()


def test_carved_val_is_stratified_keeps_every_class_and_changes_the_loss_counts():
    targets = np.repeat(np.arange(4), [50, 10, 2, 1])
    train, val = carve_val(targets, 4, 0.1, seed=0)
    assert np.bincount(targets[val], minlength=4).tolist() == [5, 1, 1, 0]  # ceil(0.1 n), never all of a class
    assert np.bincount(targets[train], minlength=4).tolist() == [45, 9, 1, 1]
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(targets)
    again = carve_val(targets, 4, 0.1, seed=0)
    assert np.array_equal(again[1], val) and not np.array_equal(carve_val(targets, 4, 0.1, seed=1)[1], val)

    cfg = c.parse_args("finetune", ["--data", "tiny"])
    full = train_class_counts(cfg.data)
    carved_cfg = c.parse_args("finetune", ["--data", "tiny", "--data.val_from_train", "0.2"])
    carved = train_class_counts(carved_cfg.data)
    val_ds = build_dataset(carved_cfg.data, "val")
    assert (full - carved).tolist() == np.bincount(val_ds.targets, minlength=5).tolist()
    assert (carved >= 1).all() and (np.bincount(val_ds.targets, minlength=5) >= 1).all()
    assert heldout_val(val_ds, build_dataset(carved_cfg.data, "test"))
    assert c.config_hash(carved_cfg) != c.config_hash(cfg)  # the carve is part of the run's identity
    # the balanced losses see the remaining counts
    z, y = torch.zeros(1, 5), torch.tensor([4])
    assert build_loss("bal_ce", carved)(z, y).item() != pytest.approx(build_loss("bal_ce", full)(z, y).item())


def test_carved_val_run_selects_on_it(tmp_path):
    root = cifar_like(tmp_path / "cifar")
    run_dir = finetune.main([
        "--data", "tiny", "--data.dataset", "cifar10_lt", "--data.num_classes", "10", "--data.root", str(root),
        "--data.imbalance", "3", "--data.val_from_train", "0.2", "--optim.epochs", "2", "--from_scratch",
        "--output_dir", str(tmp_path / "out"), "--run_name", "carved"])
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["selection"]["rule"] == "best_val" and "carved" in results["selection"]["val"]
    per_class = (run_dir / "test_per_class.csv").read_text().splitlines()[1:]
    counts = [int(line.split(",")[2]) for line in per_class]
    full = np.floor(30 * (1 / 3) ** (np.arange(10) / 9)).astype(int)
    assert counts == (full - np.minimum(np.ceil(0.2 * full), full - 1)).astype(int).tolist()


# ---------------------------------------------------------------------------------------------
# Evaluation transform


def test_eval_crop_ratio_per_dataset():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    full = eval_transform(32, mean, std, crop=1.0)(img)
    assert torch.equal(full, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)  # untouched
    zoomed = eval_transform(32, mean, std, crop=0.875)(img)  # resize 36, crop 32: a 1.14x zoom
    assert zoomed.shape == full.shape and not torch.allclose(zoomed, full, atol=0.05)
    for preset in ("cifar10_lt", "cifar100_lt", "tiny", "demo"):
        assert c.parse_args("finetune", ["--data", preset]).data.eval_crop == 1.0, preset
    for preset in ("imagenet_lt", "places_lt", "inat18"):
        assert c.parse_args("finetune", ["--data", preset]).data.eval_crop == 0.875, preset
    with pytest.raises(ValueError, match="eval_crop"):
        eval_transform(32, mean, std, crop=1.5)


def test_eval_crop_is_recorded_with_the_weights(tmp_path):
    from livt.checkpoint import load_file_with_meta

    run_dir = finetune.main(["--data", "tiny", "--from_scratch", "--optim.epochs", "1",
                             "--output_dir", str(tmp_path), "--run_name", "crop"])
    _, meta = load_file_with_meta(run_dir / "classifier.safetensors")
    assert meta["config"]["data"]["eval_crop"] == 1.0


# ---------------------------------------------------------------------------------------------
# Method recipes


def test_layering_order_and_sources(tmp_path, monkeypatch):
    monkeypatch.setattr(c, "METHOD_DIR", tmp_path)
    (tmp_path / "m.yaml").write_text(
        "about: {family: test, paper: none}\n"
        "loss: {name: focal, gamma: 1.5}\n"
        "optim: {epochs: 11, blr: 0.5}\n"
        "by_dataset:\n  synthetic: {optim: {epochs: 12}}\n  places_lt: {optim: {epochs: 99}}\n")
    user = tmp_path / "user.yaml"
    user.write_text("optim: {blr: 0.25}\n")
    cfg = c.parse_args("finetune", ["--data", "tiny", "--method", "m", "--config", str(user),
                                    "--optim.warmup_epochs", "0.5"])
    assert cfg.method == "m" and cfg.loss.name == "focal" and cfg.loss.options["gamma"] == 1.5
    assert cfg.optim.epochs == 12  # by_dataset for the dataset kind beats the method's top level
    assert cfg.optim.blr == 0.25  # --config beats the method
    assert cfg.optim.warmup_epochs == 0.5  # --key beats everything
    assert cfg.data.max_per_class == 40  # from the preset
    src = c.non_default_sources(cfg)
    assert src["data.max_per_class"] == "configs/finetune/tiny.yaml"
    assert src["loss.name"].endswith("m.yaml") and src["optim.epochs"].endswith("m.yaml (by_dataset.synthetic)")
    assert src["optim.blr"] == str(user) and src["optim.warmup_epochs"] == "--optim.warmup_epochs"
    # the run's config.yaml records the sources
    c.save(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sources"]["optim.blr"] == str(user)
    # the method file under another dataset kind takes that kind's section
    assert c.parse_args("finetune", ["--data", "places_lt", "--method", "m"]).optim.epochs == 99


def test_method_file_is_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(c, "METHOD_DIR", tmp_path)
    (tmp_path / "bad.yaml").write_text("loss: {nme: ce}\n")
    with pytest.raises(c.ConfigError, match=r"bad\.yaml: unknown key 'loss\.nme'.*'loss\.name'"):
        c.parse_args("finetune", ["--method", "bad"])
    (tmp_path / "bad2.yaml").write_text("by_dataset:\n  synthetic: {optim: {epochz: 3}}\n")
    with pytest.raises(c.ConfigError, match=r"bad2\.yaml \(by_dataset\.synthetic\): unknown key 'optim\.epochz'"):
        c.parse_args("finetune", ["--data", "tiny", "--method", "bad2"])
    monkeypatch.undo()
    with pytest.raises(c.ConfigError, match="no method 'bal_bc'.*did you mean 'bal_bce'"):
        c.parse_args("finetune", ["--method", "bal_bc"])
    with pytest.raises(c.ConfigError, match="fine-tuning recipes"):
        c.resolve("pretrain", method="ce")


def test_every_shipped_method_resolves_on_every_preset():
    assert c.methods(), "configs/methods/ is empty"
    for name in c.methods():
        _, keys, about, _ = c.read_method(name)
        assert {"family", "paper", "summary"} <= set(about), name
        command = "stage2" if "stage2" in keys else "finetune"  # a second stage is run by `livt stage2`
        for preset in c.presets(command):
            assert c.parse_args(command, ["--data", preset, "--method", name]).method == name


# ---------------------------------------------------------------------------------------------
# The command surface, installed from a wheel


@pytest.mark.timeout(600)
def test_installed_wheel_finds_its_configs_outside_the_checkout(tmp_path):
    """Build a wheel, install it (without dependencies) into a fresh venv that sees this interpreter's
    packages, and run every command's --help from a folder outside the checkout."""
    build = tmp_path / "src"
    subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], check=True, capture_output=True)
    files = subprocess.run(["git", "-C", str(REPO), "ls-files"], check=True, capture_output=True,
                           text=True).stdout.split()
    for f in files:  # a copy of the tracked files, so the build leaves the checkout untouched
        dst = build / f
        if (REPO / f).is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((REPO / f).read_bytes())
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(build)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
                    *map(str, wheels.glob("*.whl"))], env=env, check=True, capture_output=True)
    # the dependencies: this interpreter's site-packages, also when it is a venv (which `--system-site-packages`
    # would not see), listed after the install so pip does not take an editable livt there for the wheel
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    Path(venv_site, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run([str(py), "-c", "import livt.config as c; print(c.__file__); print(c.CONFIG_DIR)"],
                           cwd=away, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where
    livt = venv / "bin" / "livt"
    top = subprocess.run([str(livt), "--help"], cwd=away, env=env, check=True, capture_output=True, text=True)
    from livt.cli import COMMANDS

    for name in COMMANDS:
        assert name in top.stdout
    # every command's --help through the installed entry point, in one process (each would import torch again)
    each = ("import contextlib, io\nfrom livt import cli\nfor name in cli.COMMANDS:\n"
            "    out, code = io.StringIO(), 0\n    with contextlib.redirect_stdout(out):\n        try:\n"
            "            cli.main([name, '--help'])\n        except SystemExit as e:\n            code = e.code\n"
            "    print('=== ' + name + ' ' + str(code))\n    print(out.getvalue())\n")
    out = subprocess.run([str(py), "-c", each], cwd=away, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    codes = dict(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("=== "))
    assert codes == {name: "0" for name in COMMANDS}, (codes, out.stderr[-2000:])
    help_text = out.stdout.split("=== finetune 0")[1].split("=== ")[0]
    assert "imagenet_lt" in help_text and "bal_bce" in help_text  # presets and methods found in the wheel
