"""RESULTS.md's CPU-scale CIFAR-10-LT study, end to end on a small stand-in: the study's own command (the
`cifar10_lt_cpu` presets, MGP once, ViT rows from it and from scratch, a CNN recipe, compressed schedules)
on a generated 32 px CIFAR-format set (200 training images per class before the imbalance-100 profile)."""

import json
from pathlib import Path

import numpy as np
import yaml

from livt import compare


def test_cpu_study_command_end_to_end(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("test", 4)):
        labels = np.repeat(np.arange(10), n)
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8),
                 labels=labels)
    out = compare.main([
        "--data", "cifar10_lt_cpu", "--pretrained", "mgp", "--seeds", "0", "--epochs", "1",
        "--methods", "bal_bce,bal_bce@scratch,resnet_bal_ce", "--output_dir", str(tmp_path / "runs"),
        "--out", str(tmp_path / "table"), "--pretrain-args", "--optim.epochs 1 --optim.warmup_epochs 0",
        "--", "--data.root", str(root), "--aug.pad", "2", "--data.batch_size", "32", "--optim.batch_size", "32"])
    table = {e["method"]: e for e in json.loads((out / "comparison.json").read_text())}
    assert set(table) == {"bal_bce", "bal_bce@scratch", "resnet_bal_ce"}
    for name, e in table.items():
        assert e["n_failed"] == 0 and 0 <= e["top1"] <= 100 and e["epochs"] == 1, (name, e)
    (pretrain,) = (tmp_path / "runs").glob("pretrain-*")
    assert (pretrain / "encoder.safetensors").is_file()
    cfgs = {name: yaml.safe_load((Path(e["run_dirs"][0]) / "config.yaml").read_text()) for name, e in table.items()}
    assert cfgs["bal_bce"]["pretrained"] == str(pretrain / "encoder.safetensors")
    assert cfgs["bal_bce@scratch"]["from_scratch"] and cfgs["resnet_bal_ce"]["from_scratch"]
    for cfg in cfgs.values():  # every split at 16 px, held in memory
        assert cfg["data"]["stored_size"] == cfg["data"]["img_size"] == 16 and cfg["data"]["on_device"]
    cnn = cfgs["resnet_bal_ce"]
    assert cnn["model"]["name"] == "resnet32" and cnn["optim"]["step_epochs"] == [1, 1]  # 160, 180 of 200
    assert cfgs["bal_bce"]["model"] == {**cfgs["bal_bce"]["model"], "name": "vit_micro", "patch_size": 4}
    md = (out / "comparison.md").read_text()
    assert "| few | head | tail |" in md  # CIFAR-10-LT x100 has no few-shot class: head / tail halves too
