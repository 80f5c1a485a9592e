"""`livt compare` over the options a user passes after `--`, on a user's own data (npz with and without
val.npz, an image folder): every row of every method family finishes, and a second call reuses every run.

Three calls cover the matrix (all with --pretrained mgp, so every ViT row depends on a pretraining run):
  npz with val.npz:    normalize from_train, posthoc, sampler sqrt    | gbl, glag (stage 2 on gbl), sade
  npz without val.npz: normalize from_train, val_from_train, test_prior_imbalance, sampler class_balanced
                                                                      | bal_bce, reslt, resnet_ce (CNN)
  folder:              normalize from_train, val_from_train           | ce (the plain baseline)
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from livt import compare, config

CLASSES = 5
SMALL = ["--optim.batch_size", "8", "--data.batch_size", "8", "--data.test_per_class", "4", "--aug.mixup", "0",
         "--aug.cutmix", "0", "--aug.rand_augment", "", "--data.img_size", "16", "--model.patch_size", "8"]


def images(rng, labels):
    """16 x 16 images whose colour tells the class (a learnable set), uint8 (N, 16, 16, 3)."""
    base = np.array([[40 + 40 * c, 200 - 30 * c, (90 * c) % 256] for c in range(CLASSES)], dtype=float)
    x = base[labels][:, None, None, :] + rng.normal(0, 25, (len(labels), 16, 16, 3))
    return x.clip(0, 255).astype(np.uint8)


def npz_set(root: Path, with_val: bool) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    splits = {"train": [16, 10, 6, 4, 3], "test": [4] * CLASSES, **({"val": [3] * CLASSES} if with_val else {})}
    for split, counts in splits.items():
        labels = np.repeat(np.arange(CLASSES), counts)
        np.savez(root / f"{split}.npz", images=images(rng, labels), labels=labels)
    return root


def folder_set(root: Path) -> Path:
    rng = np.random.default_rng(1)
    for split, counts in {"train": [14, 9, 6, 4, 3], "test": [4] * CLASSES}.items():
        labels = np.repeat(np.arange(CLASSES), counts)
        for i, (im, c) in enumerate(zip(images(rng, labels), labels)):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(root / split / f"c{c}" / f"{i}.png")
    return root


# SADE and ResLT take the MGP encoder like every ViT row (shared and expert / backbone blocks from it)
CALLS = {
    "npz_val": (["gbl", "glag", "sade"],
                ["--data.normalize", "from_train", "--posthoc", "--data.sampler", "sqrt"]),
    "npz": (["bal_bce", "reslt", "resnet_ce"],
            ["--data.normalize", "from_train", "--data.val_from_train", "0.2", "--test_prior_imbalance", "10",
             "--data.sampler", "class_balanced"]),
    "folder": (["ce"], ["--data.normalize", "from_train", "--data.val_from_train", "0.25"]),
}


@pytest.fixture(scope="module")
def calls(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    roots = {"npz_val": ("npz", npz_set(tmp / "npz_val", True)), "npz": ("npz", npz_set(tmp / "npz", False)),
             "folder": ("folder", folder_set(tmp / "folder"))}
    argvs = {}
    for name, (methods, options) in CALLS.items():
        kind, root = roots[name]
        shared = ["--data.dataset", kind, "--data.root", str(root), "--data.num_classes", str(CLASSES),
                  "--data.imbalance", "1", *SMALL, *options]
        argvs[name] = ["--data", "tiny", "--methods", ",".join(methods), "--epochs", "1", "--pretrained", "mgp",
                       "--pretrain-args", "--optim.epochs 1", "--output_dir", str(tmp / name),
                       "--out", str(tmp / name / "table"), "--", *shared]
        compare.main(argvs[name])
    return tmp, argvs


@pytest.mark.parametrize("name", CALLS)
def test_every_row_finishes(calls, name):
    tmp, _ = calls
    table = json.loads((tmp / name / "table" / "comparison.json").read_text())
    assert [e["method"] for e in table] == CALLS[name][0]
    for e in table:
        assert e["errors"] == [] and e["top1"] is not None, (name, e["method"], e["errors"])
        own = json.loads((Path(e["run_dirs"][0]) / "test_results.json").read_text())
        assert e["top1"] == own["top1"]
    pretrain = [p for p in (tmp / name).glob("pretrain-*") if (p / "encoder.safetensors").is_file()]
    assert len(pretrain) == 1  # one pretraining run, in the directory the runner planned
    vit_rows = [e for e in table if not e["method"].endswith("@scratch") and e["method"] != "resnet_ce"]
    for e in vit_rows:  # every ViT row started from that encoder (its stage 1 for a second stage)
        doc = yaml.safe_load((Path(e["run_dirs"][0]) / "config.yaml").read_text())
        cfg = config.from_dict("stage2" if doc.get("stage2") else "finetune", doc)
        if not getattr(cfg, "init_classifier", ""):
            assert cfg.pretrained == str(pretrain[0] / "encoder.safetensors")
        if "from_train" in CALLS[name][1]:  # the resolved statistics are recorded, not the preset's
            assert cfg.data.mean != config.DataConfig().mean


def test_second_call_reuses_every_run(calls, capsys):
    tmp, argvs = calls
    for name, argv in argvs.items():
        before = {p: p.stat().st_mtime_ns for p in (tmp / name).glob("*/test_results.json")}
        capsys.readouterr()
        compare.main(argv)
        events = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.split()]
        assert "running" not in events and "failed" not in events, name
        assert events.count("reused") == len(before) + 1  # every fine-tuning run and the pretraining
        assert {p: p.stat().st_mtime_ns for p in (tmp / name).glob("*/test_results.json")} == before


def test_data_derived_values_do_not_change_a_runs_directory(tmp_path):
    """data.normalize from_train sets data.mean / data.std from the images; the run directory the runner
    predicts from the config as given is the one the run writes after resolving them."""
    from livt.data import resolve_normalization

    root = npz_set(tmp_path / "set", False)
    argv = ["--data", "tiny", "--data.dataset", "npz", "--data.root", str(root), "--data.imbalance", "1",
            "--output_dir", str(tmp_path)]
    for stage in ("pretrain", "finetune"):
        cfg = config.parse_args(stage, [*argv, "--data.normalize", "from_train"])
        given = config.run_dir(cfg, stage)
        resolve_normalization(cfg)
        assert cfg.data.mean != config.parse_args(stage, argv).data.mean  # resolved from the images
        assert config.run_dir(cfg, stage) == given
    # a mean given by the user (normalize given) does name a different run
    plain = config.parse_args("finetune", argv)
    other = config.parse_args("finetune", [*argv, "--data.mean", "0.1,0.2,0.3"])
    assert config.run_dir(plain, "finetune") != config.run_dir(other, "finetune")
