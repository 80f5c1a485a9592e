"""Metrics, result files and figures on hand-computed examples."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from livt import figures
from livt.metrics import (
    ece_mce,
    evaluate_logits,
    long_tailed_test_prior,
    posthoc_adjust,
    reliability_bins,
    subsample_to_prior,
)
from livt.report import format_table, write_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Four samples, C = 2; bins of width 1/15 on (0, 1]:
#   A conf .95 correct -> bin 14 (.933, 1];  B conf .94 wrong -> bin 14
#   C conf .70 correct -> bin 10 (.667, .733];  D conf .55 wrong -> bin 8 (.533, .600]
# bin 14: acc .5, conf .945, gap .445 (2 samples); bin 10: gap .3; bin 8: gap .55
# ECE = (2 * .445 + .3 + .55) / 4 = .435 -> 43.5 %;  MCE = .55 -> 55.0 %
CAL_PROBS = torch.tensor([[0.95, 0.05], [0.06, 0.94], [0.3, 0.7], [0.55, 0.45]])
CAL_LABELS = torch.tensor([0, 0, 1, 1])

# Shot groups by training count: many {0, 1}, medium {2}, few {3}.
TRAIN_COUNTS = np.array([150, 150, 50, 10])
LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
PREDS = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 3, 0, 2])
CONFUSION = [[3, 1, 0, 0],
             [1, 2, 1, 0],
             [0, 0, 1, 1],
             [1, 0, 1, 0]]
NAMES = ["cat", "dog", "owl", "yak"]


def toy_logits(preds=PREDS, num_classes=4):
    return 5.0 * torch.eye(num_classes)[torch.as_tensor(preds)]


def test_ece_mce_by_hand():
    ece, mce = ece_mce(CAL_PROBS, CAL_LABELS)
    assert ece == pytest.approx(43.5, abs=1e-4) and mce == pytest.approx(55.0, abs=1e-4)
    # logits (log p plus a per-row constant) give the same confidences
    assert ece_mce(CAL_PROBS.log() + 3.0, CAL_LABELS) == pytest.approx((ece, mce), abs=1e-4)
    bins = reliability_bins(CAL_PROBS, CAL_LABELS)
    assert bins["counts"].tolist() == [0] * 8 + [1, 0, 1, 0, 0, 0, 2]
    assert bins["accuracy"][14] == 0.5 and math.isnan(bins["accuracy"][0])


def test_evaluate_shot_groups_by_hand():
    r = evaluate_logits(toy_logits(), LABELS, TRAIN_COUNTS, NAMES)
    assert r["n"] == 12 and r["top1"] == pytest.approx(50.0)  # 6 of 12
    assert r["per_class"].tolist() == [75.0, 50.0, 50.0, 0.0]
    assert r["many"] == pytest.approx(62.5) and r["medium"] == pytest.approx(50.0)
    assert r["few"] == 0.0  # a real 0, not "empty"
    assert r["top5"] == 100.0  # C = 4 < 5: top-4 always hits
    assert r["confusion"].tolist() == CONFUSION and r["confusion"].dtype == np.int64
    assert r["test_counts"].tolist() == [4, 4, 2, 2]
    # correct: log(e^5 + 3) - 5 = log(1 + 3 e^-5) = 0.0200123; wrong: 5.0200123
    assert r["nll"] == pytest.approx(2.5200123, abs=1e-5)


def test_top5_with_more_classes():
    z = torch.arange(6.0).repeat(2, 1)  # ranking 5 > 4 > ... > 0
    r = evaluate_logits(z, [0, 1], [200] * 6)  # class 0 is 6th (miss), class 1 is 5th (hit)
    assert r["top1"] == 0.0 and r["top5"] == 50.0


def test_empty_and_absent_groups_are_none():
    r = evaluate_logits(toy_logits(PREDS[:10] % 3, 3), LABELS[:10], [150, 150, 50])
    assert r["few"] is None and r["many"] is not None
    absent = evaluate_logits(toy_logits(PREDS[:10]), LABELS[:10], TRAIN_COUNTS)  # class 3 not in test
    assert math.isnan(absent["per_class"][3]) and absent["few"] is None
    table = format_table([{"split": "val", **r}])
    header, _, row = (line.strip("| ").split(" | ") for line in table.splitlines())
    assert dict(zip(header, row, strict=True))["few"] == "n/a"
    assert header == ["split", "n", "top1", "top5", "many", "medium", "few", "ECE", "MCE", "NLL"]  # no arrays


def test_format_table():
    table = format_table([{"loss": "ce", "top1": 49.5, "few": None},
                          {"loss": "bal_bce", "top1": 54.06, "ece": 4.8}])
    assert table.splitlines() == [
        "| loss | top1 | few | ECE |",
        "|---|---|---|---|",
        "| ce | 49.50 | n/a | n/a |",
        "| bal_bce | 54.06 | n/a | 4.80 |",
    ]


def test_posthoc_adjust_by_hand():
    z = torch.tensor([[0.5, 0.3, 0.0]])
    # BCE: logit(pi_t) - logit(1/3) = [log(.25/.5), log((3/7)/.5), log(1/.5)] = [-.6931, -.1542, .6931]
    bce_adj = posthoc_adjust(z, [6, 3, 1], [0.2, 0.3, 0.5], "bal_bce")
    assert torch.allclose(bce_adj - z, torch.tensor([-0.6931472, -0.1541507, 0.6931472]), atol=1e-6)
    # CE: log pi_t = [-1.6094, -1.2040, -.6931]; test prior given as counts
    ce_adj = posthoc_adjust(z, [6, 3, 1], [20, 30, 50], "ce")
    assert torch.allclose(ce_adj - z, torch.tensor([-1.6094379, -1.2039728, -0.6931472]), atol=1e-6)
    assert z.argmax().item() == 0 and bce_adj.argmax().item() == 2 and ce_adj.argmax().item() == 2
    zz = torch.randn(5, 3)
    for loss in ("bce", "bal_ce"):  # uniform test prior: a constant shift, argmax unchanged
        shift = posthoc_adjust(zz, [6, 3, 1], [1, 1, 1], loss) - zz
        assert float(shift.max() - shift.min()) < 1e-6
    assert posthoc_adjust(zz, [6, 3, 1], [1, 1, 1], "bce").sub(zz).abs().max() < 1e-6
    with pytest.raises(ValueError, match="bal_bce"):
        posthoc_adjust(zz, [6, 3, 1], [1, 1, 1], "mislas")


def test_long_tailed_test_prior_and_subsample():
    # profile [1, 1/5, 1/25] / 1.24
    assert np.allclose(long_tailed_test_prior(3, 25), [0.8064516, 0.1612903, 0.0322581])
    assert np.allclose(long_tailed_test_prior(3, 25, reverse=True), [0.0322581, 0.1612903, 0.8064516])
    assert np.allclose(long_tailed_test_prior(4, 1), 0.25)
    labels = np.repeat(np.arange(3), 10)  # balanced, 10 per class
    idx = subsample_to_prior(labels, long_tailed_test_prior(3, 4), seed=0)  # ratios 1, 1/2, 1/4
    assert np.bincount(labels[idx], minlength=3).tolist() == [10, 5, 2]
    assert np.array_equal(idx, np.unique(idx))
    assert np.array_equal(idx, subsample_to_prior(labels, long_tailed_test_prior(3, 4), seed=0))
    back = subsample_to_prior(labels, long_tailed_test_prior(3, 5, reverse=True), seed=1)  # 1/5, 1/sqrt5, 1
    assert np.bincount(labels[back], minlength=3).tolist() == [2, 4, 10]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_write_results(tmp_path):
    r = evaluate_logits(toy_logits(), LABELS, TRAIN_COUNTS, NAMES)
    r["best_epoch"] = 3
    write_results(tmp_path / "run", r, None, TRAIN_COUNTS, prefix="test")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == [
        "test_confusion.csv", "test_per_class.csv", "test_per_class_accuracy.png", "test_reliability.png",
        "test_results.json", "test_results.md"]  # and no temporary files left behind
    scalars = json.loads((run / "test_results.json").read_text())
    assert scalars["top1"] == 50.0 and scalars["many"] == 62.5 and scalars["few"] == 0.0
    assert scalars["best_epoch"] == 3 and scalars["n"] == 12 and "per_class" not in scalars
    md = (run / "test_results.md").read_text().splitlines()
    assert md[0] == "| split | top1 | top5 | many | medium | few | ECE | MCE |"
    assert md[2].startswith("| test | 50.00 | 100.00 | 62.50 | 50.00 | 0.00 |")
    rows = read_csv(run / "test_per_class.csv")
    assert rows[0] == ["class", "name", "train_count", "shot", "n_test", "accuracy"]
    assert rows[1] == ["0", "cat", "150", "many", "4", "75.0000"]
    assert rows[3] == ["2", "owl", "50", "medium", "2", "50.0000"]
    assert rows[4] == ["3", "yak", "10", "few", "2", "0.0000"]
    conf = read_csv(run / "test_confusion.csv")
    assert conf[0] == ["true\\pred", "0", "1", "2", "3"]
    assert [[int(v) for v in row[1:]] for row in conf[1:]] == CONFUSION
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE

    # an empty group and a class absent from the test set: null in JSON, blank accuracy in the CSV
    r = evaluate_logits(toy_logits(PREDS[:10]), LABELS[:10], TRAIN_COUNTS)
    write_results(run, r, NAMES, TRAIN_COUNTS, prefix="val")
    assert json.loads((run / "val_results.json").read_text())["few"] is None
    assert "| n/a |" in (run / "val_results.md").read_text()
    assert read_csv(run / "val_per_class.csv")[4] == ["3", "yak", "10", "few", "0", ""]


def test_figures_write_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(2, 3, 16, 16, generator=g) for _ in range(3)]
    figures.plot_reconstructions(*imgs, tmp_path / "rec.png")
    figures.plot_reconstructions(*(x[..., :12] for x in imgs), tmp_path / "rec_wide.png", cell_px=115)
    figures.plot_reliability(CAL_PROBS, CAL_LABELS, tmp_path / "rel.png")
    figures.plot_per_class_accuracy([75.0, 50.0, 50.0, math.nan], TRAIN_COUNTS, tmp_path / "acc.png", "toy")
    # 16 x 12 images at cell_px 115: cells round(115 * 12 / 16) = 86 wide -> 30 + 2 * 86 = 202
    expected = {"rec.png": (30 + 150 * 2, 450), "rec_wide.png": (202, 3 * 115),
                "rel.png": (500, 600), "acc.png": (1000, 400)}
    for name, size in expected.items():
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as im:
            assert im.size == size, name
    with pytest.raises(ValueError, match="one shape"):
        figures.plot_reconstructions(imgs[0], imgs[1][:1], imgs[2], tmp_path / "bad.png")
