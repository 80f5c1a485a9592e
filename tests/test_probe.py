"""livt probe: the weighted kNN classifier (DINO's protocol), the linear probe on cached features, and the
figure the demo's random-init encoder gives (the monitor's exact resume is in test_resume.py)."""

import json
import math

import numpy as np
import pytest
import torch

from livt import config
from livt.probe import knn_scores, linear_probe_logits, load_vit, main, probe


def separable(n_per_class=30, num_classes=4, dim=16, seed=0):
    """Clusters around orthogonal directions: nearest neighbours always share the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = torch.eye(dim)[labels] * 5 + 0.3 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_knn_is_perfect_on_separable_features():
    train, labels = separable()
    query, qlabels = separable(n_per_class=10, seed=1)
    scores = knn_scores(train, labels, query, 4)  # k = 20 < 30 per class: every neighbour from the same class
    assert torch.equal(scores.argmax(1), qlabels)


def test_knn_votes_by_hand():
    # one query, k = 2 of 3 train points; cosine similarities 1, 0.6, -1 -> the top two vote exp(sim / T)
    train = torch.tensor([[2.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_scores(train, labels, torch.tensor([[3.0, 0.0]]), 3, k=2, temperature=0.5)
    assert scores[0].tolist() == pytest.approx([math.exp(2.0), math.exp(1.2), 0.0], rel=1e-6)


def test_linear_probe_is_perfect_on_separable_features():
    train, labels = separable()
    query, qlabels = separable(n_per_class=10, seed=1)
    counts = np.bincount(labels.numpy())
    for loss in ("ce", "bal_ce"):
        logits = linear_probe_logits(train, labels, query, counts, loss, epochs=20)
        assert torch.equal(logits.argmax(1), qlabels), loss


def test_random_init_demo_figure(one_thread, tmp_path):
    """The demo's random-init ViT-micro (seed 0), kNN on the val split: measured 12.0 / 12.0 top-1 (cls / mean;
    chance 10; many-shot 24, medium and few 0: the bank is long-tailed), 2026-12-05 on the 2-core VM."""
    out = tmp_path / "p.json"
    results = main(["random", "--data", "demo", "--no_linear", "--out", str(out)])
    rows = {r["feature"]: r for r in results["rows"]}
    assert rows["cls"]["top1"] == pytest.approx(12.0, abs=1.0)
    assert rows["mean"]["top1"] == pytest.approx(12.0, abs=1.0)
    assert rows["cls"]["few"] == pytest.approx(0.0, abs=2.5)
    assert json.loads(out.read_text())["val"].startswith("synthetic_val (200 images)")


def test_probe_reads_encoder_and_classifier_files(one_thread, tmp_path):
    """A saved encoder, MAE and classifier file give the features of the weights they hold."""
    from livt.checkpoint import arch_of, save_model
    from livt.models.mae import create_mae
    from livt.models.vit import create_vit

    cfg = config.parse_args("pretrain", ["--data", "tiny"])
    mae = create_mae(cfg.model, cfg.mae, cfg.data.img_size)
    save_model(mae.encoder, tmp_path / "encoder.safetensors", "encoder", arch_of(mae.encoder))
    save_model(mae, tmp_path / "mae.safetensors", "mae", arch_of(mae.encoder))
    classifier = create_vit("vit_micro", 32, 8, num_classes=5, global_pool="avg")
    save_model(classifier, tmp_path / "classifier.safetensors", "classifier", arch_of(classifier))
    x = torch.randn(2, 3, 32, 32)
    for name in ("encoder", "mae"):
        vit = load_vit(str(tmp_path / f"{name}.safetensors"), cfg).eval()
        assert torch.equal(vit.forward_features(x), mae.encoder.eval().forward_features(x)), name
    vit = load_vit(str(tmp_path / "classifier.safetensors"), cfg).eval()
    assert torch.equal(vit.forward_head(vit.forward_features(x), pre_logits=True),
                       classifier.eval().forward_head(classifier.forward_features(x), pre_logits=True))
    results = probe(vit, cfg, linear=False)
    assert [r["feature"] for r in results["rows"]] == ["cls", "mean"]
    with pytest.raises(config.ConfigError, match="neither 'random' nor"):
        load_vit(str(tmp_path / "missing.safetensors"), cfg)


@pytest.mark.parametrize("preset, every", [("tiny", 1), ("demo", 10), ("cifar10_lt_cpu", 5), ("cifar10_lt", 0),
                                           ("cifar10_lt_gpu", 0), ("cifar100_lt", 0), ("imagenet_lt", 0),
                                           ("places_lt", 0), ("inat18", 0)])
def test_monitor_is_on_for_the_small_presets_only(preset, every):
    """The kNN monitor runs a few times per run on the CPU-sized presets (issue 22) and stays off on the large ones,
    where a probe of 10,000 train images every few epochs is not free."""
    assert config.parse_args("pretrain", ["--data", preset]).monitor.every == every
