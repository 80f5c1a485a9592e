"""Training a classifier, shared by fine-tuning (`livt.finetune`), the trained second stages (`livt.stages`) and
the benchmark: the loss and the forward, training that keeps the reported epoch (`--select`), and the end of a
run (the test split evaluated once, then `livt.report`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from livt import config as config_lib
from livt import engine
from livt.checkpoint import arch_of, load_file_with_meta, save_model
from livt.data.stats import read_class_counts
from livt.data.transforms import TargetMaker
from livt.evaluate import end_run, evaluate_split
from livt.losses import Criterion, build_loss


def make_criterion(cfg: config_lib.LossConfig, counts: np.ndarray) -> Criterion:
    """The training loss of `cfg.name` with its options (settled by the config against its signature); a
    known test prior file becomes its `test_prior` option (the config refuses the file for a loss without one)."""
    options = dict(cfg.options)
    if cfg.test_prior_file:
        prior = read_class_counts(cfg.test_prior_file)
        options["test_prior"] = torch.as_tensor(prior / prior.sum(), dtype=torch.float32)
    return build_loss(cfg.name, counts, **options)


def classifier_forward(cfg: config_lib.TrainClassifierConfig, counts: np.ndarray,
                       num_classes: int) -> Callable[[torch.nn.Module, engine.Batch, float], torch.Tensor]:
    """`forward(net, batch, progress) -> loss` of classifier training (ordinary fine-tuning, a trained second
    stage, the benchmark): the recipe's loss on mixup / smoothed targets at training progress `progress`."""
    criterion = make_criterion(cfg.loss, counts)
    targets = TargetMaker(cfg.aug, cfg.loss.label_smoothing, num_classes)

    def forward(net: torch.nn.Module, batch: engine.Batch, progress: float) -> torch.Tensor:
        images, target = targets(batch.images, batch.labels)
        return criterion(net(images), target, progress)
    return forward


def fit_and_report(cfg: config_lib.TrainClassifierConfig, accelerator, run_dir: Path, trainer: engine.Trainer,
                   classifier: Callable[[], torch.nn.Module], rule: str, val_split: str, val, test,
                   counts: np.ndarray, meta: dict[str, Any],
                   export: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
                   info: dict[str, Any] | None = None) -> None:
    """Train, keep the reported epoch by `rule` (val evaluations on the way), evaluate it on test once and
    write the results files (plus the entries of `info`). `classifier()` is the trained classifier inside
    the trainer; `export` turns it into the plain classifier that is saved (a second stage folds its extra
    parameters into the head)."""
    reported_path = run_dir / "classifier.safetensors"

    def save(path: Path, **extra: Any) -> None:
        model = export(classifier())
        save_model(model, path, "classifier", arch_of(model), **extra, **meta)

    def end_of_epoch(epoch: int) -> dict[str, float]:
        last = epoch + 1 == cfg.optim.epochs
        if rule == "best_val" and ((epoch + 1) % cfg.eval_every == 0 or last):
            val_results = evaluate_split(accelerator, trainer.model, cfg, val, counts, cfg.loss.name)
            trainer.model.train()
            row = {f"val_{k}": val_results[k] for k in ("top1", "many", "medium", "few", "ece")}
            accelerator.print(f"epoch {epoch + 1}: " + ", ".join(
                f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in row.items()))
            if val_results["top1"] > trainer.state.best_metric:
                trainer.state.best_metric, trainer.state.best_epoch = val_results["top1"], epoch + 1
                if accelerator.is_main_process:
                    save(reported_path, best_epoch=epoch + 1)
            return row
        if rule == "last" and last:
            trainer.state.best_epoch = epoch + 1
        return {}

    trainer.fit(end_of_epoch)

    if accelerator.is_main_process:
        save(run_dir / "classifier_last.safetensors")
        if rule == "last":
            save(reported_path, best_epoch=cfg.optim.epochs)
    accelerator.wait_for_everyone()
    state, _ = load_file_with_meta(reported_path)
    reported = export(classifier())
    reported.load_state_dict(state)
    selection = {"rule": rule, "epoch": trainer.state.best_epoch, "val": val_split, "select": cfg.select}
    budget = {"epochs": cfg.optim.epochs, "steps": trainer.state.step,
              "images_seen": trainer.state.step * trainer.plan.micro_batch * trainer.plan.accum * trainer.plan.world,
              "train_seconds": round(trainer.state.train_seconds, 1)}
    end_run(cfg, accelerator, run_dir, reported, val, test, counts, selection, budget, info)
