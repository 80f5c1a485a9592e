"""The model card (`README.md`) of a fine-tuning run directory, in the layout model hubs read.

YAML front matter (library_name, tags, datasets, metrics, pipeline_tag), then: the model, the data, the
method, a config summary (every non-default key and the layer that set it), the results table with
the selection rule and budget, the figures, how to load the weights (timm and livt) and provenance.
Written after the results files (`livt.tuning.report`), so a run folder can be shared as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from livt import config as config_lib
from livt.data.stats import describe
from livt.metrics import TABLE_KEYS, format_table
from livt.models.vit import VIT_SIZES

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
    """The card's Markdown text (see the module docstring)."""
    about = _about(cfg.method)
    timm_loadable = cfg.model.name in VIT_SIZES and cfg.model.head == "linear"
    front = {"library_name": "timm" if timm_loadable else "pytorch",
             "tags": ["image-classification", "long-tailed-recognition", "livt", cfg.model.name, cfg.loss.name]
             + ([cfg.method] if cfg.method else []),
             "datasets": [cfg.data.dataset], "metrics": ["accuracy"], "pipeline_tag": "image-classification"}
    d = cfg.data
    method = cfg.method or "none (config keys only)"
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
    lines += [f"- loss: `{cfg.loss.name}`, sampler `{d.sampler}`, optimizer `{cfg.optim.name}`, "
              f"{cfg.optim.epochs} epochs, batch {cfg.optim.batch_size}", "",
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


__all__ = ["model_card", "write_model_card"]
