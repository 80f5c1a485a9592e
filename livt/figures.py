"""Figures of a run: per-class accuracy by shot group, reliability diagram, MAE reconstructions.

Drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch) and
written atomically as PNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from livt.data.stats import shot_groups
from livt.metrics import ArrayLike, atomic_path, reliability_bins

GROUP_COLORS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
DPI = 100
LABEL_PX = 30  # left margin of the reconstruction grid, for the row labels


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)


def plot_per_class_accuracy(per_class_acc: ArrayLike, train_counts: ArrayLike, path: str | Path,
                            title: str = "") -> None:
    """Accuracy bars (percent) of the classes sorted head to tail by training count, the training count
    on a log secondary axis, the many / medium / few regions shaded and labelled."""
    acc = np.asarray(per_class_acc, dtype=np.float64)
    counts = np.asarray(train_counts)
    order = np.argsort(-counts, kind="stable")
    x = np.arange(len(counts))
    fig = Figure(figsize=(10, 4), dpi=DPI)  # 1000 x 400 px
    ax = fig.add_subplot()
    for group, pos in shot_groups(counts[order]).items():  # contiguous positions once sorted
        if len(pos):
            ax.axvspan(pos[0] - 0.5, pos[-1] + 0.5, color=GROUP_COLORS[group], alpha=0.12, lw=0)
            ax.text((pos[0] + pos[-1]) / 2, 104, f"{group} ({len(pos)})", ha="center", va="center",
                    color=GROUP_COLORS[group])
    # One step patch rather than C bars (8,142 bars take seconds); NaN (absent from the test set) is a gap.
    ax.stairs(acc[order], np.arange(len(counts) + 1) - 0.5, fill=True, color="0.35")
    ax.set(xlim=(-0.5, len(counts) - 0.5), ylim=(0, 110), xlabel="class (sorted by training count)",
           ylabel="accuracy (%)", title=title)
    ax2 = ax.twinx()
    ax2.plot(x, counts[order], color="k", lw=1.2)
    ax2.set_yscale("log", nonpositive="mask")
    ax2.set_ylabel("training images")
    fig.tight_layout()
    _save(fig, path)


def plot_reliability_bins(bins: dict, path: str | Path) -> None:
    """Reliability diagram from `livt.metrics.reliability_bins` output: accuracy per confidence bin
    against the diagonal, gaps shaded, bin counts below, ECE and MCE in the title."""
    counts, acc, conf = bins["counts"], bins["accuracy"], bins["confidence"]
    n_bins = len(counts)
    left = np.arange(n_bins) / n_bins
    width = 1.0 / n_bins
    fig = Figure(figsize=(5, 6), dpi=DPI)  # 500 x 600 px
    ax, ax_counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    filled = counts > 0
    ax.bar(left[filled], acc[filled], width, align="edge", color="tab:blue", edgecolor="k", label="accuracy")
    ax.bar(left[filled], (conf - acc)[filled], width, bottom=acc[filled], align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "--", color="0.4", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"ECE {bins['ece']:.2f}%   MCE {bins['mce']:.2f}%")
    ax.legend(loc="upper left")
    ax_counts.bar(left, counts, width, align="edge", color="0.5", edgecolor="k")
    ax_counts.set(xlabel="confidence (max softmax probability)", ylabel="count")
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(logits_or_probs: ArrayLike, labels: ArrayLike, path: str | Path,
                     n_bins: int = 15) -> None:
    """Reliability diagram of (N, C) raw logits or probabilities (see `plot_reliability_bins`)."""
    plot_reliability_bins(reliability_bins(logits_or_probs, labels, n_bins), path)


def plot_reconstructions(original: Tensor, masked: Tensor, reconstructed: Tensor, path: str | Path,
                         cell_px: int = 150) -> None:
    """Grid with rows original / masked / reconstruction of N images, each (N, 3, H, W) in [0, 1].

    Fixed pixel layout (dpi 100, no tight bounding box): each image cell is `cell_px` high and
    round(cell_px * W / H) wide, after a LABEL_PX (30) column of row labels, so the PNG is
    (30 + N * round(cell_px * W / H)) x (3 * cell_px) pixels; square images, default: (30 + 150 N) x 450.
    """
    rows = {"original": original, "masked": masked, "reconstruction": reconstructed}
    shapes = {tuple(t.shape) for t in rows.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1] != 3:
        raise ValueError(f"expected three (N, 3, H, W) tensors of one shape, got {sorted(shapes)}")
    n, _, h, w = next(iter(shapes))
    cell_w = round(cell_px * w / h)
    width, height = LABEL_PX + n * cell_w, 3 * cell_px
    # Agg truncates figsize * dpi to whole pixels; the half pixel keeps e.g. 1.15 * 100 from giving 114.
    fig = Figure(figsize=((width + 0.5) / DPI, (height + 0.5) / DPI), dpi=DPI)
    pad = max(1, cell_px // 50)  # white margin around each image, pixels
    for r, (name, images) in enumerate(rows.items()):
        top = r * cell_px
        fig.text(LABEL_PX / 2 / width, 1 - (top + cell_px / 2) / height, name, rotation=90, ha="center",
                 va="center", fontsize=8)
        for i, img in enumerate(images.detach().float().clamp(0, 1).cpu()):
            left = LABEL_PX + i * cell_w
            ax = fig.add_axes(((left + pad) / width, 1 - (top + cell_px - pad) / height,  # figure fractions
                               (cell_w - 2 * pad) / width, (cell_px - 2 * pad) / height))
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)
            ax.set_axis_off()
    _save(fig, path)


def plot_training_curves(metrics_jsonl: str | Path, path: str | Path) -> None:
    """Pretraining curves from a run's metrics.jsonl: the training loss against epoch, and beside it the kNN
    probe's val top-1 of both features against epoch (`livt.probe.monitor`; 'not monitored' when absent)."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    loss = [(r["epoch"], r["loss"]) for r in rows if "loss" in r]
    fig = Figure(figsize=(10, 4), dpi=DPI)
    ax_loss, ax_probe = fig.subplots(1, 2)
    if loss:
        ax_loss.plot(*zip(*loss), color="0.2", lw=1.2)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for feature, color in (("cls", "tab:blue"), ("mean", "tab:orange")):
        points = [(r["epoch"], r[f"knn_{feature}_top1"]) for r in rows if f"knn_{feature}_top1" in r]
        if points:
            ax_probe.plot(*zip(*points), marker="o", ms=3, color=color, label=f"{feature} token" if feature ==
                          "cls" else "mean of patch tokens")
    if ax_probe.lines:
        ax_probe.legend(fontsize="small")
    else:
        ax_probe.text(0.5, 0.5, "not monitored (--monitor.every 0)", ha="center", va="center",
                      transform=ax_probe.transAxes)
    ax_probe.set(xlabel="epoch", ylabel="kNN top-1 on val (%)", title="kNN probe of the encoder")
    fig.tight_layout()
    _save(fig, path)


__all__ = ["plot_per_class_accuracy", "plot_reliability", "plot_reliability_bins", "plot_reconstructions",
           "plot_training_curves"]


def plot_comparison(table: list[dict], groups_path: str | Path, per_class_path: str | Path) -> None:
    """The comparison figures of `livt compare`: accuracy per shot group per method (grouped bars, mean
    over seeds), and per-class accuracy against training count (first seed's run of each method)."""
    import csv
    import io

    rows = [e for e in table if e.get("top1") is not None]
    keys = ("top1", "many", "medium", "few")
    fig = Figure(figsize=(max(6, 1.2 * len(rows) + 2), 4), dpi=DPI)
    ax = fig.add_subplot()
    width = 0.8 / len(keys)
    x = np.arange(len(rows))
    for i, (k, color) in enumerate(zip(keys, ("0.3", *GROUP_COLORS.values()))):
        vals = [e[k] if e[k] is not None else np.nan for e in rows]
        errs = [e.get(k + "_std") or 0 for e in rows]
        ax.bar(x + (i - 1.5) * width, vals, width, yerr=errs, color=color, label=k)
    ax.set_xticks(x, [e["method"] for e in rows], rotation=30, ha="right")
    ax.set(ylabel="accuracy (%)", ylim=(0, 105), title="accuracy per shot group (mean over seeds)")
    ax.legend(ncols=4, loc="upper right", fontsize="small")
    fig.tight_layout()
    _save(fig, groups_path)

    fig = Figure(figsize=(8, 4), dpi=DPI)
    ax = fig.add_subplot()
    for e in rows:
        try:
            text = (Path(e["run_dirs"][0]) / "test_per_class.csv").read_text()
        except (OSError, IndexError):
            continue
        per = sorted(csv.DictReader(io.StringIO(text)), key=lambda r: -int(r["train_count"]))
        counts = [int(r["train_count"]) for r in per]
        acc = [float(r["accuracy"]) if r["accuracy"] else np.nan for r in per]
        ax.plot(counts, acc, marker="o", ms=3, lw=1, label=e["method"])
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set(xlabel="training images of the class (log)", ylabel="accuracy (%)", ylim=(0, 105),
           title="per-class accuracy against training count")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, per_class_path)
