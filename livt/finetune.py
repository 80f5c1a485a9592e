"""Fine-tuning: Balanced Fine-Tuning (stage 2 of LiVT) and every fine-tuning method, second stages on a
frozen backbone (`--stage2`, `livt.stages`), and evaluation of saved classifiers (`--eval_only`).

Training is `livt.tuning`'s, evaluation `livt.evaluate`'s, the results files `livt.report`'s. Outputs in
the run directory: classifier.safetensors (reported), classifier_last.safetensors, test_results.{json,md},
per-class accuracy and confusion CSVs, two figures, a model card (README.md), config.yaml, metrics.jsonl,
training states.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from livt import config as config_lib
from livt import engine, stages
from livt.checkpoint import check_pretrained_matches, load_classifier, load_encoder, load_file_with_meta
from livt.data import build_dataset, resolve_normalization, train_class_counts
from livt.data.loading import train_data
from livt.data.stats import class_counts, describe
from livt.evaluate import check_tta, selection_rule
from livt.export import pretrained_cfg
from livt.models import Adapter, build_classifier, build_model, is_cnn
from livt.models.sade import SADEClassifier
from livt.tuning import classifier_forward, end_run, fit_and_report


def run(cfg: config_lib.FinetuneConfig) -> Path:
    if cfg.test_prior_imbalance and cfg.test_prior_imbalance < 1:
        raise config_lib.ConfigError(
            f"--test_prior_imbalance: expected 0 (off) or an imbalance >= 1, got {cfg.test_prior_imbalance}")
    check_tta(cfg)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg)
    resolve_normalization(cfg)  # recorded in config.yaml; not part of the run's name (config.data_derived)
    if cfg.stage2 or cfg.init_classifier:  # a second stage sees the images as its stage 1 did
        return stages.run_stage2(cfg)
    if bool(cfg.pretrained) == cfg.from_scratch:
        raise config_lib.ConfigError(
            "finetune: give exactly one of --pretrained FILE.safetensors or --from_scratch")
    if cfg.pretrained and is_cnn(cfg.model.name):
        raise config_lib.ConfigError(
            f"--pretrained: model.name '{cfg.model.name}' is a CNN, which livt trains from random "
            "initialisation (the pretraining stage makes ViT encoders only); use --from_scratch")
    accelerator, run_dir = engine.start(cfg, "finetune")
    d = cfg.data
    train, val, test = (build_dataset(d, split) for split in ("train", "val", "test"))  # all checked up front
    rule, val_split = selection_rule(cfg, val, test)
    counts = class_counts(train.targets, train.num_classes)
    accelerator.print(describe(counts, train.name))
    accelerator.print(f"reported epoch: {rule} (val: {val_split})")

    model = build_model(cfg, train.num_classes)
    if is_cnn(cfg.model.name) and accelerator.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # NHWC: the fast layout of cuDNN convolutions
    if cfg.pretrained:
        _, meta = load_file_with_meta(cfg.pretrained)
        check_pretrained_matches(meta, d.dataset, counts, cfg.pretrained, d.val_from_train)
        load_pretrained(model, cfg.pretrained)
    trainer = engine.Trainer(cfg, "finetune", accelerator, run_dir, Adapter(model),
                             train_data(cfg, "finetune", train, accelerator.device), train.targets, train.num_classes,
                             classifier_forward(cfg, counts, train.num_classes), optimize=model)
    meta = engine.run_meta(cfg, train, counts,
                           pretrained_cfg=pretrained_cfg(model, d.img_size, d.mean, d.std, d.eval_crop))
    fit_and_report(cfg, accelerator, run_dir, trainer, lambda: trainer.unwrapped.model, rule, val_split, val, test,
                   counts, meta)
    return run_dir


def load_pretrained(model: torch.nn.Module, path: str) -> None:
    """An encoder file into a classifier: ResLT's into its backbone (its branches and shared head stay fresh);
    SADE's into a plain ViT of the same size, copied into the shared layers and each expert's blocks."""
    if isinstance(model, SADEClassifier):
        a = model.arch
        vit = build_classifier(a["name"], a["img_size"], a["patch_size"], a["num_classes"])
        load_encoder(vit, path)
        model.load_vit(vit)
    else:
        load_encoder(getattr(model, "backbone", model), path)


def evaluate_checkpoint(cfg: config_lib.FinetuneConfig) -> Path:
    """`--eval_only --checkpoint FILE`: the test split of `cfg.data`, counts from the train split or
    from `data.class_counts_file`."""
    if not cfg.checkpoint:
        raise config_lib.ConfigError("--eval_only needs --checkpoint FILE.safetensors")
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
    return run(config_lib.parse_args("finetune", sys.argv[1:] if argv is None else argv))
