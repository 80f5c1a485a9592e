"""Result files of one evaluation: JSON, Markdown table, per-class and confusion CSVs, and the figures.

The dependencies run one way: results -> figures -> metrics (metrics computes, figures draws, this
module writes the files of a run).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from livt import figures
from livt.data.stats import shot_groups
from livt.metrics import TABLE_KEYS, ArrayLike, atomic_path, cell, format_table, is_scalar


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_scalar(v: object) -> object:
    if isinstance(v, (np.integer, np.floating)):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def write_results(run_dir: str | Path, results: dict, class_names: Sequence[str] | None,
                  train_counts: ArrayLike, prefix: str = "test", info: dict | None = None) -> None:
    """Write the files of one evaluation (from `evaluate_logits`) into `run_dir`, each atomically.

    <prefix>_results.json (the scalar entries, n/a as null, plus `info`: what chose the reported
    checkpoint, the budget, provenance), <prefix>_results.md (split, top1, top5, many, medium, few, ECE,
    MCE, then the `info` lines), <prefix>_per_class.csv (class, name, train_count, shot, n_test,
    accuracy), <prefix>_confusion.csv (rows true label, columns prediction), and the figures
    <prefix>_per_class_accuracy.png and <prefix>_reliability.png.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    train_counts = np.asarray(train_counts)
    names = class_names if class_names is not None else results["class_names"]

    scalars = {k: _json_scalar(v) for k, v in results.items() if is_scalar(v)}
    info = info or {}
    _write_text(run_dir / f"{prefix}_results.json", json.dumps({**scalars, **info}, indent=2) + "\n")
    row = {"split": results.get("split", prefix), **{k: results.get(k) for k in TABLE_KEYS[1:]}}
    lines = [f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in info.items()]
    _write_text(run_dir / f"{prefix}_results.md", format_table([row]) + "\n" + "".join(f"{x}\n" for x in lines))

    shot = np.empty(len(train_counts), dtype=object)
    for group, classes in shot_groups(train_counts).items():
        shot[classes] = group
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class", "name", "train_count", "shot", "n_test", "accuracy"])
    for c, acc in enumerate(results["per_class"]):
        w.writerow([c, names[c], int(train_counts[c]), shot[c],
                    int(results["test_counts"][c]), "" if np.isnan(acc) else f"{acc:.4f}"])
    _write_text(run_dir / f"{prefix}_per_class.csv", buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["true\\pred", *range(len(train_counts))])
    w.writerows([c, *counts] for c, counts in enumerate(results["confusion"].tolist()))
    _write_text(run_dir / f"{prefix}_confusion.csv", buf.getvalue())

    figures.plot_per_class_accuracy(results["per_class"], train_counts,
                                    run_dir / f"{prefix}_per_class_accuracy.png",
                                    title=f"{prefix}: top-1 {cell(results.get('top1'))}%")
    figures.plot_reliability_bins(results["reliability"], run_dir / f"{prefix}_reliability.png")


__all__ = ["write_results"]
