"""The machinery every fine-tuning run shares (ordinary fine-tuning in `livt.finetune`, second stages in
`livt.stages`): the training loss, training targets and data, the selection rule, evaluation (raw, post-hoc
adjusted, shifted test priors, SADE's transductive rows), training with the reported epoch kept, and the
results files.

Which epoch is reported (`--select`): the best val top-1 where the val split is held out (its own
split, or one carved from train with `--data.val_from_train`), else the last epoch; the rule and the
epoch are written into the results. The test split is evaluated once, at the end, and never chooses
anything; where val is the test split (CIFAR, iNat18) it is not even evaluated during training.
`--posthoc` adds post-hoc logit adjustment z - tau log pi beside the raw result (key "posthoc" of
test_results.json, a line of test_results.md): tau is the best val top-1 over `POSTHOC_TAUS` where the
val split is held out, else fixed at 1, and the file says which.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup

from livt import config as config_lib
from livt import engine
from livt.checkpoint import arch_of, load_file_with_meta, save_model
from livt.data.device import OnDevice, check_finetune_aug
from livt.data.errors import DataError
from livt.data.loading import Augmented
from livt.data.stats import read_class_counts
from livt.data.transforms import finetune_transform
from livt.evaluate import evaluate_split, posthoc_tau
from livt.losses import LOSSES, Criterion, build_loss, signature
from livt.models import build_classifier
from livt.report import report


def make_criterion(cfg: config_lib.LossConfig, counts: np.ndarray) -> Criterion:
    """The training loss of `cfg.name` with its options (settled by the config against its signature); a
    known test prior file becomes the `test_prior` option of a loss that takes one (bal_bce)."""
    options = dict(cfg.options)
    if cfg.test_prior_file and "test_prior" in signature(LOSSES[cfg.name].fn)[1]:
        prior = read_class_counts(cfg.test_prior_file)
        options["test_prior"] = torch.as_tensor(prior / prior.sum(), dtype=torch.float32)
    return build_loss(cfg.name, counts, **options)


def classifier_forward(cfg: config_lib.FinetuneConfig, counts: np.ndarray, num_classes: int,
                       progress: Callable[[int], float]) -> Callable[..., torch.Tensor]:
    """`forward(net, images, labels, indices, step) -> loss` of classifier training (ordinary fine-tuning, a
    trained second stage, the benchmark): the recipe's loss on mixup / smoothed targets at `progress(step)`."""
    criterion = make_criterion(cfg.loss, counts)
    targets = TargetMaker(cfg.aug, cfg.loss.label_smoothing, num_classes)

    def forward(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, indices, step: int) -> torch.Tensor:
        images, target = targets(images, labels)
        return criterion(net(images), target, progress(step))
    return forward


class TargetMaker:
    """Mixup / CutMix (timm) with label smoothing; hard labels become soft targets.

    timm's Mixup needs an even batch: with an odd one, the last sample is left unmixed (smoothed
    one-hot target only).
    """

    def __init__(self, aug: config_lib.AugConfig, label_smoothing: float, num_classes: int) -> None:
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, switch_prob=aug.switch_prob,
                               mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)

    def smooth(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        return torch.full((len(labels), self.num_classes), off, device=labels.device).scatter_(
            1, labels[:, None], 1.0 - self.smoothing + off)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None and self.smoothing == 0:
            return images, labels  # hard labels (the CNN recipes; losses that refuse soft targets)
        if self.mixup is None:
            return images, self.smooth(labels)
        even = len(images) - len(images) % 2
        if even == 0:
            return images, self.smooth(labels)
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        if even == len(images):
            return mixed, targets
        return (torch.cat([mixed, images[even:]]),
                torch.cat([targets, self.smooth(labels[even:])]))


def check_pretrained_matches(meta: dict, dataset_name: str, counts: np.ndarray, path: str,
                             val_from_train: float = 0.0) -> None:
    """A pretraining file made on this same dataset must have seen the same classes (the same counts,
    unless one of the stages carved a val split from train)."""
    if meta.get("dataset") != dataset_name or meta.get("class_counts") is None:
        return
    pre = np.asarray(meta["class_counts"])
    same_carve = meta.get("config", {}).get("data", {}).get("val_from_train", 0.0) == val_from_train
    if len(pre) != len(counts) or (same_carve and not np.array_equal(pre, counts)):
        raise DataError(
            f"{path} was pretrained on '{dataset_name}' with {len(pre)} classes "
            f"({int(pre.sum())} images), but the fine-tuning data '{dataset_name}' has {len(counts)} classes "
            f"({int(counts.sum())} images): the split files or --data settings differ between the stages")


def build_model(cfg: config_lib.FinetuneConfig, num_classes: int) -> torch.nn.Module:
    m = cfg.model
    return build_classifier(m.name, cfg.data.img_size, m.patch_size, num_classes, m.drop_path_rate, m.head,
                            m.head_scale)


def train_data(cfg: config_lib.FinetuneConfig, train, device: torch.device):
    """The augmented training set of `cfg`: held on the device with batched crop / flip (`data.on_device`),
    or per-sample transforms in loader workers (crop, RandAugment, random erasing; mixup is in
    `TargetMaker`)."""
    d, a = cfg.data, cfg.aug
    if d.on_device:
        check_finetune_aug(a)
        return OnDevice(train, d.img_size, d.mean, d.std, cfg.seed, device, a.crop, a.crop_scale, a.pad)
    transform = finetune_transform(d.img_size, d.mean, d.std, a.rand_augment, a.reprob, a.color_jitter,
                                   a.crop_scale, a.crop, a.pad)
    return Augmented(train, transform, cfg.seed, d.skip_bad_images)


def fit_and_report(cfg: config_lib.FinetuneConfig, accelerator, run_dir: Path, trainer: engine.Trainer,
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
    tau = posthoc_tau(accelerator, reported, cfg, val, test, counts)
    results = evaluate_split(accelerator, reported, cfg, test, counts, cfg.loss.name, tau, final=True)
    results["selection"] = {"rule": rule, "epoch": trainer.state.best_epoch, "val": val_split,
                            "select": cfg.select}
    results["budget"] = {"epochs": cfg.optim.epochs, "steps": trainer.state.step,
                         "images_seen": trainer.state.step * trainer.plan.micro_batch * trainer.plan.accum
                         * trainer.plan.world, "train_seconds": round(trainer.state.train_seconds, 1)}
    results.update(info or {})
    report(accelerator, run_dir, results, test.class_names, counts, f"{cfg.stage2 or cfg.loss.name}, test", cfg)
    accelerator.end_training()
