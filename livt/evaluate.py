"""Evaluation of a classifier on a split: raw, post-hoc adjusted (tau chosen on held-out val), on shifted
test priors, SADE's transductive rows; and the selection rule (which epoch is reported: best val top-1 where
the val split is held out, else the last). The test split never chooses anything: tau and the epoch come from
a held-out val split, else tau is fixed at 1. `livt evaluate` (`main`): a saved classifier on the test split."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livt import aggregate, engine
from livt import config as config_lib
from livt.checkpoint import load_classifier
from livt.data import build_dataset, heldout_val, train_class_counts
from livt.data.loading import Augmented
from livt.data.transforms import eval_transform
from livt.metrics import (
    POSTHOC_TAUS,
    choose_posthoc_tau,
    evaluate_logits,
    logit_adjust,
    long_tailed_test_prior,
    posthoc_adjust,
    subsample_to_prior,
)
from livt.report import report


def predict_split(accelerator, model, cfg, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every image of `dataset` through the evaluation transform."""
    d = cfg.data
    data = Augmented(dataset, eval_transform(d.img_size, d.mean, d.std, d.eval_crop), cfg.seed, d.skip_bad_images)
    return engine.predict(accelerator, model, data, d.batch_size, d.num_workers)


def evaluate_split(accelerator, model, cfg, dataset, counts: np.ndarray, trained_with: str,
                   posthoc: tuple[float, str] | None = None, final: bool = False) -> dict:
    """Metrics of `dataset`; with `posthoc` = (tau, how it was chosen), `results['posthoc']` the metrics of
    z - tau log pi. `final` marks the one evaluation of the test split that is reported; only it adds,
    with cfg.test_prior_imbalance, `results['shifted']` (the rows of the forward / backward long-tailed
    test sets built from it, raw and post-hoc adjusted to their prior) and, with cfg.tta_aggregate,
    `results['transductive']` and transductive shifted rows (livt.aggregate)."""
    logits, labels = predict_split(accelerator, model, cfg, dataset)
    results = evaluate_logits(logits, labels, counts, dataset.class_names)
    if cfg.test_prior_imbalance and final:  # the val passes of training never report these rows
        results["shifted"] = shifted_prior_rows(logits, labels, counts, cfg.test_prior_imbalance,
                                                trained_with, cfg.seed)
    if cfg.tta_aggregate and final:  # transductive rows beside the inductive ones (livt.aggregate)
        results["transductive"], rows = aggregate.transductive(accelerator, model, cfg, dataset, counts,
                                                               cfg.test_prior_imbalance)
        for row in results.get("shifted", []):
            row["transductive"] = "no"
        results.get("shifted", []).extend(rows)
    if posthoc is not None:
        tau, chosen_on = posthoc
        adjusted = evaluate_logits(logit_adjust(logits, counts, tau), labels, counts)
        results["posthoc"] = {"tau": tau, "chosen_on": chosen_on,
                              **{k: adjusted[k] for k in ("top1", "many", "medium", "few", "ece", "mce", "nll")}}
    return results


def posthoc_tau(accelerator, model, cfg, val, test, counts: np.ndarray) -> tuple[float, str] | None:
    """(tau, how it was chosen) of post-hoc logit adjustment when `cfg.posthoc`: the best val top-1 over
    `POSTHOC_TAUS` where the val split is held out, else tau = 1 (never chosen on the test split)."""
    if not cfg.posthoc:
        return None
    if not heldout_val(val, test):
        return 1.0, "fixed at 1: no held-out val split (val is the test split)"
    logits, labels = predict_split(accelerator, model, cfg, val)
    grid = f"{POSTHOC_TAUS[0]:g}..{POSTHOC_TAUS[-1]:g} step {POSTHOC_TAUS[1] - POSTHOC_TAUS[0]:g}"
    return (choose_posthoc_tau(logits, labels, counts),
            f"{val.name} ({len(val)} images): best top-1 over tau {grid}")


def shifted_prior_rows(logits: torch.Tensor, labels: torch.Tensor, counts: np.ndarray, imbalance: float,
                       trained_with: str, seed: int) -> list[dict]:
    """Test-agnostic evaluation (SADE's protocol): subsample the balanced test set to a forward or
    backward long-tailed prior and evaluate the raw logits and the logits adjusted to that prior."""
    rows = []
    for direction, reverse in (("forward", False), ("backward", True)):
        prior = long_tailed_test_prior(len(counts), imbalance, reverse=reverse)
        idx = torch.as_tensor(subsample_to_prior(labels.numpy(), prior, seed))
        for adjusted in (False, True):
            z = posthoc_adjust(logits[idx], counts, prior, trained_with) if adjusted else logits[idx]
            r = evaluate_logits(z, labels[idx], counts)
            rows.append({"test set": f"{direction} x{imbalance:g}", "post-hoc": "yes" if adjusted else "no",
                         **{k: r[k] for k in ("n", "top1", "many", "medium", "few", "ece")}})
    return rows


def selection_rule(cfg: config_lib.TrainClassifierConfig, val, test) -> tuple[str, str]:
    """(rule, val split description): which epoch is reported, and what val is."""
    held = heldout_val(val, test)
    what = (f"{cfg.data.val_from_train:g} of train, carved (stratified)" if cfg.data.val_from_train
            else f"{val.name} ({len(val)} images)" if held else "none: val is the test split")
    if cfg.select == "best_val" and not held:
        raise config_lib.ConfigError(
            f"--select best_val: the val split of '{cfg.data.dataset}' is its test split ({val.source}), so the "
            f"reported epoch would be chosen on the test set; use --select last, or carve a val split from "
            f"train with --data.val_from_train 0.1")
    rule = "best_val" if held and cfg.select != "last" else "last"
    if rule == "best_val" and len(val) == 0:
        raise config_lib.ConfigError(
            f"the val split of '{cfg.data.dataset}' ({val.name}) is empty, so no epoch can be selected on it "
            f"(synthetic: data.test_per_class gives val a fifth of it; a carve needs classes of 2+ images); "
            f"enlarge it or use --select last")
    return rule, what


def check_evaluation(cfg: config_lib.ClassifierConfig) -> None:
    """The evaluation keys every classifier command shares, checked before anything runs (the head of a
    saved checkpoint is known once it is loaded)."""
    if cfg.test_prior_imbalance and cfg.test_prior_imbalance < 1:
        raise config_lib.ConfigError(
            f"--test_prior_imbalance: expected 0 (off) or an imbalance >= 1, got {cfg.test_prior_imbalance}")
    if cfg.tta_aggregate and cfg.tta_epochs < 1:
        raise config_lib.ConfigError(f"--tta_epochs: expected >= 1 with --tta_aggregate, got {cfg.tta_epochs}")
    if cfg.tta_aggregate and not isinstance(cfg, config_lib.EvaluateConfig) and cfg.model.head != "sade":
        raise config_lib.ConfigError(f"--tta_aggregate: the test-time aggregation weighs experts; it needs "
                                     f"--model.head sade, not '{cfg.model.head}'")


# ---------------------------------------------------------------------------------------------
# `livt evaluate`


def end_run(cfg: config_lib.ClassifierConfig, accelerator, run_dir: Path, model: torch.nn.Module, val, test,
            counts: np.ndarray, selection: dict[str, Any], budget: dict[str, Any] | None, info: dict[str, Any] | None,
            posthoc: bool = True, trained_with: str | None = None, label: str | None = None) -> None:
    """The end of a run (fine-tuning, every second stage, `livt evaluate`): the saved, reported `model` evaluated on
    test once (with `posthoc`, also post-hoc adjusted, tau from val), its selection, budget and `info`
    recorded, the results files written. `trained_with`: the loss the model was trained with (default this
    run's); `label`: the results table's row (default the method, test)."""
    tau = posthoc_tau(accelerator, model, cfg, val, test, counts) if posthoc else None
    results = evaluate_split(accelerator, model, cfg, test, counts, trained_with or cfg.loss.name, tau, final=True)
    results["selection"] = selection
    if budget is not None:
        results["budget"] = budget
    results.update(info or {})
    label = label or f"{getattr(cfg, 'stage2', '') or cfg.loss.name}, test"  # a second stage, else the loss
    report(accelerator, run_dir, results, test.class_names, counts, label, cfg)
    # every rank done before the process group is destroyed: a rank that left while rank 0 still wrote
    # its results has aborted in gloo's teardown (SIGABRT after "Results in ...")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def evaluate_checkpoint(cfg: config_lib.EvaluateConfig) -> Path:
    """`livt evaluate --checkpoint FILE`: the test split of `cfg.data`, counts from the train split or
    from `data.class_counts_file`."""
    check_evaluation(cfg)
    if not cfg.checkpoint:
        raise config_lib.ConfigError("livt evaluate needs --checkpoint FILE.safetensors")
    accelerator, run_dir = engine.start(cfg, "eval")
    model, meta = load_classifier(cfg.checkpoint)
    model.to(accelerator.device)
    counts = train_class_counts(cfg.data)
    if meta.get("arch", {}).get("num_classes") not in (None, len(counts)):
        raise config_lib.ConfigError(
            f"{cfg.checkpoint} has {meta['arch']['num_classes']} classes, the data {len(counts)}")
    model = accelerator.prepare(model)
    test = build_dataset(cfg.data, "test")
    trained_with = meta.get("config", {}).get("loss", {}).get("name", cfg.loss.name)
    val = build_dataset(cfg.data, "val") if cfg.posthoc else None  # for post-hoc tau only
    selection = {"rule": "given checkpoint", "epoch": meta.get("best_epoch"), "val": "not used", "select": "n/a"}
    end_run(cfg, accelerator, run_dir, model, val, test, counts, selection, None, None, trained_with=trained_with,
            label=Path(cfg.checkpoint).name)
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    return evaluate_checkpoint(config_lib.parse_args("evaluate", sys.argv[1:] if argv is None else argv))
