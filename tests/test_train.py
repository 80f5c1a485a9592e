"""End-to-end runs of both entry points on the tiny preset, in temporary directories."""

import json
import math

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from livt import evaluate, finetune, pretrain
from livt.checkpoint import load_file_with_meta
from livt.engine import RunDirError


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_pretrain(out, *extra):
    return pretrain.main(["--data", "tiny", "--output_dir", str(out), "--run_name", "mgp", *extra])


def run_finetune(out, *extra):
    return finetune.main(["--data", "tiny", "--output_dir", str(out), "--run_name", "bft", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    run_dir = run_pretrain(out)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return run_dir


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_outputs(pretrained):
    state, meta = load_file_with_meta(pretrained / "encoder.safetensors")
    assert meta["kind"] == "encoder" and meta["dataset"] == "synthetic"
    assert meta["config"]["model"]["name"] == "vit_micro" and len(meta["class_counts"]) == 5
    assert "norm.weight" in state and not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    full, full_meta = load_file_with_meta(pretrained / "mae.safetensors")
    assert full_meta["kind"] == "mae" and any(k.startswith("decoder") for k in full)
    rows = [r for r in read_metrics(pretrained) if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in rows)
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    resolved = (pretrained / "config.yaml").read_text()
    assert "lr: 9.375e-06" in resolved  # blr 1.5e-4 x 16 / 256, recorded once
    pngs = sorted(pretrained.glob("reconstruction_epoch*.png"))
    assert [p.name for p in pngs] == ["reconstruction_epoch0001.png", "reconstruction_epoch0002.png"]
    with Image.open(pngs[-1]) as im:
        assert im.format == "PNG" and im.size == (1230, 450)  # 30 + 8 images x 150 px, 3 rows of 150 px
    assert len(list((pretrained / "state").glob("step_*"))) == 2  # keep_last


def test_finetune_from_pretraining_and_evaluate(pretrained, tmp_path):
    run_dir = run_finetune(tmp_path, "--pretrained", str(pretrained / "encoder.safetensors"))
    results = json.loads((run_dir / "test_results.json").read_text())
    assert results["n"] == 5 * 20 and 0 <= results["top1"] <= 100
    assert results["many"] is None  # tiny has no class above 100 images: "n/a", never 0
    assert "n/a" in (run_dir / "test_results.md").read_text()
    for name in ("classifier.safetensors", "classifier_last.safetensors", "test_per_class.csv"):
        assert (run_dir / name).is_file()
    assert len(list(run_dir.glob("*.png"))) == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    again = evaluate.main(["--data", "tiny", "--output_dir", str(tmp_path), "--run_name", "eval",
                           "--checkpoint", str(run_dir / "classifier.safetensors"),
                           "--test_prior_imbalance", "10"])
    assert json.loads((again / "test_results.json").read_text())["top1"] == pytest.approx(results["top1"])
    shifted = json.loads((again / "test_prior_results.json").read_text())
    assert [(r["test set"], r["post-hoc"]) for r in shifted] == [
        ("forward x10", "no"), ("forward x10", "yes"), ("backward x10", "no"), ("backward x10", "yes")]
    assert shifted[0]["n"] == 20 + 11 + 6 + 3 + 2  # 20 per class x 10^(-i/4), floored

    from livt.predict import main as predict_main
    from livt.predict import predict

    images = []
    for i, colour in enumerate([(255, 0, 0), (0, 90, 200)]):
        images.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 40), colour).save(images[-1])
    preds = predict(run_dir / "classifier.safetensors", images, topk=3)
    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    for p in preds:
        probs = [prob for _, prob in p]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(name.startswith("class_") for name, _ in p)
    predict_main([str(run_dir / "classifier.safetensors"), str(images[0]), "--topk", "2", "--device", "cpu"])


def test_finetune_needs_a_start(tmp_path):
    from livt.config import ConfigError

    with pytest.raises(ConfigError, match="--pretrained"):
        run_finetune(tmp_path)
    with pytest.raises(ConfigError, match="--test_prior_imbalance: expected 0 .* got 0.5"):
        run_finetune(tmp_path, "--from_scratch", "--test_prior_imbalance", "0.5")
    assert not (tmp_path / "bft").exists()  # refused before the run directory is made


def test_run_dir_holding_another_run_is_refused(tmp_path):
    run_finetune(tmp_path, "--from_scratch", "--optim.epochs", "1")
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(RunDirError, match="already holds this run.*--resume auto"):
        run_finetune(tmp_path, "--from_scratch", "--optim.epochs", "1")
    with pytest.raises(RunDirError, match="holds a different run.*optim.blr"):
        run_finetune(tmp_path, "--from_scratch", "--optim.epochs", "1", "--optim.blr", "5e-3")
    # Nothing of the first run was lost by the refusals.
    assert (tmp_path / "bft" / "classifier.safetensors").is_file()


def test_transferred_encoder_tensors_are_equal(pretrained, tmp_path):
    from livt.checkpoint import load_encoder
    from livt.models.vit import create_vit

    encoder, _ = load_file_with_meta(pretrained / "encoder.safetensors")
    model = create_vit("vit_micro", 32, 8, num_classes=5, global_pool="avg")
    load_encoder(model, pretrained / "encoder.safetensors")
    sd = model.state_dict()
    for k, v in encoder.items():
        if k != "norm.weight" and k != "norm.bias":
            assert torch.equal(sd[k], v), k
    assert np.allclose(sd["fc_norm.weight"].numpy(), 1.0)


def test_pretrain_reads_an_imagenet_lt_split_file_over_an_image_tree(tmp_path):
    """The standard ImageNet-LT file names and line format, over JPEG files made here."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for split, per_class in (("train", (5, 3, 2)), ("val", (1, 1, 1)), ("test", (1, 1, 1))):
        lines = []
        for c, n in enumerate(per_class):
            wnid = f"n{c:08d}"
            for i in range(n):
                rel = f"{'train' if split != 'test' else 'val'}/{wnid}/{wnid}_{split}{i}.JPEG"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / rel, "JPEG")
                lines.append(f"{rel} {c}")
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines) + "\n")
    run_dir = pretrain.main(["--data", "imagenet_lt", "--data.root", str(root), "--data.num_classes", "3",
                             "--data.img_size", "32", "--model.name", "vit_micro", "--model.patch_size", "8",
                             "--mae.decoder_embed_dim", "32", "--mae.decoder_depth", "1",
                             "--mae.decoder_num_heads", "2", "--data.batch_size", "5", "--optim.batch_size", "5",
                             "--optim.epochs", "1", "--optim.warmup_epochs", "0", "--data.num_workers", "0",
                             "--output_dir", str(tmp_path / "runs"), "--run_name", "inlt"])
    _, meta = load_file_with_meta(run_dir / "encoder.safetensors")
    assert meta["dataset"] == "imagenet_lt" and meta["class_counts"] == [5, 3, 2]
    assert [json.loads(r)["step"] for r in (run_dir / "metrics.jsonl").read_text().splitlines()] == [2]


@pytest.mark.parametrize("batch", [1, 4, 5])
def test_mixup_targets_with_odd_and_even_batches(batch):
    from livt.config import AugConfig
    from livt.data.transforms import TargetMaker

    torch.manual_seed(0)
    np.random.seed(0)
    make = TargetMaker(AugConfig(), label_smoothing=0.1, num_classes=4)
    images, labels = torch.rand(batch, 3, 8, 8), torch.tensor([0, 1, 2, 3, 1][:batch])
    mixed, targets = make(images, labels)
    assert mixed.shape == images.shape and targets.shape == (batch, 4)
    assert torch.allclose(targets.sum(1), torch.ones(batch))
    if batch % 2:  # the odd one out keeps its image and a smoothed one-hot target
        assert torch.equal(mixed[-1], images[-1])
        expected = torch.full((4,), 0.025)
        expected[labels[-1]] = 0.925
        assert torch.allclose(targets[-1], expected)
