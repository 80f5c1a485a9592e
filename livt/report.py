"""What a run writes: the results files of an evaluation (JSON, Markdown, per-class and confusion CSVs,
figures), the model card (`README.md`, in the layout model hubs read) and the printed tables."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from livt import config as config_lib
from livt import engine, figures, tracking
from livt.data.stats import describe, shot_groups
from livt.metrics import ArrayLike, atomic_path
from livt.models.vit import VIT_SIZES

_HEADERS = {"ece": "ECE", "mce": "MCE", "nll": "NLL"}
TABLE_KEYS = ("split", "top1", "top5", "many", "medium", "few", "ece", "mce")


def cell(v: object) -> str:
    """A table cell: floats to 2 decimals, None / NaN as n/a."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (float, np.floating)):
        return f"{v:.2f}"
    return str(v)


def is_scalar(v: object) -> bool:
    """Whether a results entry is a table / JSON scalar (not an array, list or dict)."""
    return v is None or isinstance(v, (int, float, str, np.integer, np.floating))


def format_table(rows: list[dict]) -> str:
    """Markdown table of `rows`; columns in first-appearance order, floats to 2 decimals, None/NaN as
    n/a. Non-scalar entries (arrays, lists, dicts, e.g. an `evaluate_logits` result's) are left out."""
    keys = list(dict.fromkeys(k for row in rows for k, v in row.items() if is_scalar(v)))
    lines = ["| " + " | ".join(_HEADERS.get(k, k) for k in keys) + " |",
             "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Results files


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


# ---------------------------------------------------------------------------------------------
# Model card

FIGURES = {"test_per_class_accuracy.png": "per-class test accuracy, head to tail",
           "test_reliability.png": "reliability diagram (test)"}


def _about(method: str) -> dict[str, Any]:
    """The `about:` block of a built-in method recipe ({} for none or a recipe file of one's own)."""
    if method not in config_lib.methods():
        return {}
    return config_lib.read_method(method)[2]


def _how_to_load(cfg: Any, weights: str) -> list[str]:
    lines = ["## How to load", ""]
    if cfg.model.name in VIT_SIZES and cfg.model.head == "linear":
        lines += ["With timm (the file holds timm's keys and a `pretrained_cfg` entry with the architecture):", "",
                  "```python", "from livt.export import timm_model", f"model = timm_model({weights!r})",
                  "import timm.data",
                  "transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))",
                  "```", "",
                  "or with timm alone: `VisionTransformer(**model_args)` (timm.models.vision_transformer), "
                  "`model_args` from the file's `pretrained_cfg` metadata, then "
                  "`load_state_dict(safetensors.torch.load_file(path))`.", ""]
    else:
        lines += [f"The {cfg.model.head} head / {cfg.model.name} backbone does not fold into a plain timm "
                  "model; load it with livt's constructor.", ""]
    lines += ["With livt:", "", "```python", "from livt.checkpoint import load_classifier",
              f"model, meta = load_classifier({weights!r})  # eval mode; meta: config, class_names, ...", "```",
              "", f"From the command line: `livt predict {weights} IMAGE.jpg`.", ""]
    return lines


def model_card(run_dir: Path, cfg: Any, results: dict, info: dict, counts: np.ndarray,
               weights: str = "classifier.safetensors") -> str:
    """The card's Markdown text: YAML front matter (library_name, tags, datasets, metrics, pipeline_tag), then
    the model, the data, the method, a config summary (every non-default key and the layer that set it), the
    results with the selection rule and budget, the figures, how to load the weights, and provenance."""
    recipe = getattr(cfg, "method", "")  # `livt evaluate` names none
    about = _about(recipe)
    timm_loadable = cfg.model.name in VIT_SIZES and cfg.model.head == "linear"
    front = {"library_name": "timm" if timm_loadable else "pytorch",
             "tags": ["image-classification", "long-tailed-recognition", "livt", cfg.model.name, cfg.loss.name]
             + ([recipe] if recipe else []),
             "datasets": [cfg.data.dataset], "metrics": ["accuracy"], "pipeline_tag": "image-classification"}
    d = cfg.data
    method = recipe or "none (config keys only)"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {run_dir.name}", "",
             f"A {cfg.model.name} classifier ({cfg.model.head} head, patch {cfg.model.patch_size}, "
             f"{d.img_size} px) trained with livt, method `{method}`, loss `{cfg.loss.name}`.", "",
             "## Data", "",
             f"- dataset: `{d.dataset}`" + (f" (root `{d.root}`)" if d.root else ""),
             f"- {describe(counts, 'train')}",
             f"- val: {info.get('selection', {}).get('val', 'n/a')}",
             f"- test images: {results.get('n', 'n/a')}",
             f"- input: {d.img_size} px, eval crop {d.eval_crop:g}, mean {list(d.mean)}, std {list(d.std)} "
             f"(normalize: {d.normalize})", "",
             "## Method", "", f"- method: `{method}`"]
    if about:
        lines += [f"- {k}: {v}" for k, v in about.items()]
    training = (f", optimizer `{cfg.optim.name}`, {cfg.optim.epochs} epochs, batch {cfg.optim.batch_size}"
                if hasattr(cfg, "optim") else "")
    lines += [f"- loss: `{cfg.loss.name}`, sampler `{d.sampler}`{training}", "",
              "## Config summary", "", "Every key that differs from livt's defaults, and the layer that set it "
              "(the full resolved config is `config.yaml`):", "", "| key | value | set by |", "|---|---|---|"]
    current = config_lib.flatten(config_lib.to_dict(cfg))
    lines += [f"| {k} | {json.dumps(current[k])} | {src} |" for k, src in config_lib.non_default_sources(cfg).items()]
    row = {"split": results.get("split", "test"), **{k: results.get(k) for k in TABLE_KEYS[1:]}}
    lines += ["", "## Results", "", format_table([row]), ""]
    for key in ("selection", "budget"):
        if key in info:
            lines.append(f"- {key}: " + ", ".join(f"{k} {v}" for k, v in info[key].items()))
    lines += ["", "Accuracies and ECE / MCE in percent; many / medium / few: classes with > 100, 20-100, < 20 "
              "training images. Per class: `test_per_class.csv`; confusion: `test_confusion.csv`.", ""]
    shown = [(name, what) for name, what in FIGURES.items() if (run_dir / name).is_file()]
    if shown:
        lines += ["## Figures", ""] + [f"![{what}]({name})" for name, what in shown] + [""]
    lines += _how_to_load(cfg, weights)
    prov = info.get("provenance") or {}
    if prov:
        lines += ["## Provenance", "", f"- git commit: {prov.get('git_commit')} (dirty: {prov.get('git_dirty')})",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()), ""]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, cfg: Any, results: dict, info: dict, counts: np.ndarray,
                     weights: str = "classifier.safetensors") -> Path:
    """Write `run_dir/README.md`; returns its path."""
    path = Path(run_dir) / "README.md"
    path.write_text(model_card(Path(run_dir), cfg, results, info, counts, weights))
    return path


# ---------------------------------------------------------------------------------------------
# The end of a run


def run_info(cfg: config_lib.ClassifierConfig, run_dir: Path) -> dict[str, Any]:
    """What every results file records besides the metrics: the run, its method and seed, and provenance."""
    return {"run": run_dir.name, "method": getattr(cfg, "method", ""), "loss": cfg.loss.name, "model": cfg.model.name,
            "dataset": cfg.data.dataset, "seed": cfg.seed, "config_hash": config_lib.config_hash(cfg),
            "provenance": engine.provenance()}


def report(accelerator, run_dir: Path, results: dict, class_names, counts, label: str,
           cfg: config_lib.ClassifierConfig) -> None:
    if accelerator.is_main_process:
        shifted = results.pop("shifted", None)
        keys = ("selection", "budget", "posthoc", "transductive", "stage2")
        info = {**run_info(cfg, run_dir), **{k: results.pop(k) for k in keys if k in results}}
        write_results(run_dir, results, class_names, counts, prefix="test", info=info)
        weights = "classifier.safetensors" if (run_dir / "classifier.safetensors").is_file() else cfg.checkpoint
        write_model_card(run_dir, cfg, results, info, counts, weights)
        step = info.get("budget", {}).get("steps", 0)
        tracking.log_scalars(accelerator, results, step, prefix="test/")
        tracking.log_figures(accelerator, {f"test/{name}": run_dir / f"test_{name}.png"
                                           for name in ("per_class_accuracy", "reliability")}, step)
        rows = [{"run": label, **results}]
        if "posthoc" in info:
            metrics = {k: v for k, v in info["posthoc"].items() if k not in ("tau", "chosen_on")}
            rows.append({"run": f"{label}, post-hoc tau {info['posthoc']['tau']:g}", **metrics})
        if "transductive" in info:
            rows.append({"run": f"{label}, SADE aggregation (transductive)", **info["transductive"]})
        accelerator.print(format_table(rows))
        if shifted:
            (run_dir / "test_prior_results.json").write_text(json.dumps(shifted, indent=1))
            accelerator.print(format_table(shifted))
        accelerator.print(f"results in {run_dir}")
