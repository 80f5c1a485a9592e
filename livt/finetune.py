"""`livt finetune`: Balanced Fine-Tuning (stage 2 of LiVT) and every fine-tuning method, from a pretrained
encoder or from scratch. Second stages on a frozen backbone are `livt stage2` (`livt.stages`), the evaluation
of a saved classifier `livt evaluate` (`livt.evaluate`).

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
from livt import engine
from livt.checkpoint import check_pretrained_matches, load_encoder, load_file_with_meta
from livt.data import build_dataset, resolve_normalization
from livt.data.loading import train_data
from livt.data.stats import class_counts, describe
from livt.evaluate import check_evaluation, selection_rule
from livt.export import pretrained_cfg
from livt.models import Adapter, build_classifier, build_model, is_cnn
from livt.models.sade import SADEClassifier
from livt.tuning import classifier_forward, fit_and_report


def run(cfg: config_lib.FinetuneConfig) -> Path:
    check_evaluation(cfg)
    resolve_normalization(cfg)  # recorded in config.yaml; not part of the run's name (config.data_derived)
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


def main(argv: list[str] | None = None) -> Path:
    return run(config_lib.parse_args("finetune", sys.argv[1:] if argv is None else argv))
