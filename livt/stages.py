"""`livt stage2`: second stages on a frozen backbone, the decoupled classifiers of Kang et al. (ICLR 2020: cRT,
tau-norm, LWS, NCM), MiSLAS's re-training (Zhong et al., CVPR 2021) and GLAG's feature generator (`livt.afg`).

    livt finetune --data tiny --method ce --from_scratch --run_name s1                            # stage 1
    livt stage2 --data tiny --method crt --init_classifier checkpoints/s1/classifier.safetensors  # stage 2

Frozen means every parameter and buffer: the backbone runs in eval mode (`Adapter(frozen=True)`), except the
BatchNorm statistics under MiSLAS's `decoupled.shift_bn`. Trained stages run the fine-tuning Trainer on augmented
images; the others are solved from features. Each writes a whole classifier and the results of `livt.report`.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from livt import config as config_lib
from livt import engine, evaluate, tuning
from livt.checkpoint import arch_of, check_pretrained_matches, load_classifier, save_model
from livt.data import build_dataset, heldout_val, resolve_normalization
from livt.data.loading import Augmented, train_data
from livt.data.stats import class_counts, describe
from livt.data.transforms import eval_transform
from livt.metrics import class_accuracy
from livt.models import Adapter, batchnorms, build_head, pre_logits, set_head
from livt.models.heads import CosineHead, NCMHead


class ClassScales(nn.Module):
    """Logits f_c * head(x)_c, f (C,) learned from ones; the linear head frozen (LWS) or trained too, at
    `head_lr_scale` x the lr (MiSLAS)."""

    def __init__(self, head: nn.Linear, train_head: bool = False, head_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.head = head.requires_grad_(train_head)
        self.scale = nn.Parameter(torch.ones(head.out_features))
        self.head_lr_scale = head_lr_scale

    def lr_scales(self) -> dict[str, float]:
        """{parameter name prefix: lr factor} (livt.optim.split_by_lr_scale)."""
        return {"head.": self.head_lr_scale}

    def forward(self, features: Tensor) -> Tensor:
        return self.head(features) * self.scale  # (B, C)

    def folded(self) -> nn.Linear:
        """The same map as one nn.Linear: W <- f * W, b <- f * b."""
        w, b, f = self.head.weight, self.head.bias, self.scale.detach()
        linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None).to(w.device)
        with torch.no_grad():
            linear.weight.copy_(f[:, None] * w)
            if b is not None:
                linear.bias.copy_(f * b)
        return linear


# ---------------------------------------------------------------------------------------------
# What each method trains (`trainable(model, cfg, **options)` sets the head, returns (the module the Trainer
# runs, the module to optimise)); `shift_bn`: BatchNorm statistics re-estimated (module docstring)


def new_head(model: nn.Module, cfg: config_lib.Stage2Config, *,
             shift_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """cRT: a re-initialised head of the `model.head` kind, trained (class-balanced sampling: the recipe)."""
    head = build_head(cfg.model.head, model.num_features, model.num_classes, cfg.model.head_scale)
    set_head(model, head)
    return Adapter(model, frozen=True, shift_bn=shift_bn), head


def learned_scales(model: nn.Module, cfg: config_lib.Stage2Config, *,
                   shift_bn: bool = False) -> tuple[nn.Module, nn.Module]:
    """LWS: the stage-1 head frozen, a scale f_c per class learned from 1 (logits f_c * (w_c . x + b_c)),
    folded into a plain linear head when saved."""
    scaled = ClassScales(model.get_classifier())
    set_head(model, scaled)
    return Adapter(model, frozen=True, shift_bn=shift_bn), scaled


def scaled_stage1_head(model: nn.Module, cfg: config_lib.Stage2Config, *, shift_bn: bool = False,
                       head_lr_scale: float = 1.0) -> tuple[nn.Module, nn.Module]:
    """MiSLAS: the stage-1 head trained further with learned per-class scales (the official
    LearnableWeightScaling), the head at head_lr_scale x the lr (official lr_factor), label-aware smoothing
    (the recipe's loss). With shift_bn the BatchNorm statistics are re-estimated on the class-balanced
    batches (a ViT has none: nothing changes, and the results say so)."""
    if head_lr_scale <= 0:
        raise config_lib.ConfigError(f"--decoupled.head_lr_scale must be > 0, got {head_lr_scale}")
    scaled = ClassScales(model.get_classifier(), train_head=True, head_lr_scale=head_lr_scale)
    set_head(model, scaled)
    return Adapter(model, frozen=True, shift_bn=shift_bn), scaled


def fold_scales(model: nn.Module) -> nn.Module:
    """A copy of an LWS model with its scales folded into a plain linear head."""
    scaled = model.get_classifier()
    out = copy.copy(model)  # shallow: shares the (frozen) backbone modules, gets its own head
    out._modules = dict(model._modules)
    set_head(out, scaled.folded())
    return out


# ---------------------------------------------------------------------------------------------
# Methods computed from features (`solve(accelerator, model, cfg, run_dir, train, val, **options)` ->
# engine.Fitted: head, selection, log rows, budget)


def features(accelerator, model: nn.Module, cfg: config_lib.Stage2Config, dataset) -> tuple[Tensor, Tensor]:
    """(features (N, D) float32, labels (N,)) of every image of `dataset` through the evaluation transform."""
    d = cfg.data
    data = Augmented(dataset, eval_transform(d.img_size, d.mean, d.std, d.eval_crop), cfg.seed, d.skip_bad_images)
    return engine.predict(accelerator, Adapter(model, pre_logits), data, d.batch_size, d.num_workers)


def tau_normalised(weight: Tensor, tau: float) -> Tensor:
    """w_c / ||w_c||^tau for each class row of `weight` (C, D)."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


def mean_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    """Mean over the classes present of per-class top-1, in percent (= top-1 on a balanced split)."""
    acc = class_accuracy(logits, labels, num_classes)
    return float(acc[~acc.isnan()].mean() * 100)


def tau_grid(tau_min: float, tau_max: float, tau_steps: int) -> list[float]:
    if tau_steps < 1 or tau_min > tau_max:
        raise config_lib.ConfigError(f"--decoupled.tau_min/tau_max/tau_steps: need tau_min <= tau_max and "
                                     f"tau_steps >= 1, got {tau_min}, {tau_max}, {tau_steps}")
    if tau_steps == 1:
        return [tau_min]
    step = (tau_max - tau_min) / (tau_steps - 1)
    return [round(tau_min + i * step, 10) for i in range(tau_steps)]


def choose_tau(weight: Tensor, val_features: Tensor, val_labels: Tensor,
               taus: list[float]) -> tuple[float, list[dict[str, float]]]:
    """The tau of the best val mean per-class accuracy (the smallest on ties) and every tau's row."""
    rows = []
    for tau in taus:
        logits = val_features @ tau_normalised(weight, tau).t()  # (N, C), no bias
        rows.append({"tau": tau, "val_mean_class_acc": mean_class_accuracy(logits, val_labels, weight.shape[0])})
    best = max(rows, key=lambda r: r["val_mean_class_acc"])  # first maximum: the smallest tau
    return best["tau"], rows


def tau_norm(accelerator, model: nn.Module, cfg: config_lib.Stage2Config, run_dir: Path, train, val, *,
             tau_min: float = 0.0, tau_max: float = 2.0, tau_steps: int = 21) -> engine.Fitted:
    """tau-norm: w_c / ||w_c||^tau with the bias dropped; tau swept over tau_steps evenly spaced values in
    [tau_min, tau_max] (21: steps of 0.1 over [0, 2]), chosen on the held-out val split by mean per-class
    accuracy."""
    weight = model.get_classifier().weight.detach().float().cpu()
    val_features, val_labels = features(accelerator, model, cfg, val)
    tau, rows = choose_tau(weight, val_features, val_labels, tau_grid(tau_min, tau_max, tau_steps))
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(tau_normalised(weight, tau))
        head.bias.zero_()  # Kang et al. drop the bias
    return engine.Fitted(head, {"rule": "tau with the best val mean per-class accuracy", "tau": tau}, rows,
                         {"epochs": 0, "steps": 0, "images_seen": len(val)})


NcmMetric = Literal["l2", "cosine"]
NCM_METRICS = typing.get_args(NcmMetric)


def class_means(feats: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, D) mean of the features of each class."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, labels, feats)
    return sums / torch.bincount(labels, minlength=num_classes)[:, None]


def ncm_head(feats: Tensor, labels: Tensor, num_classes: int, metric: NcmMetric, scale: float) -> nn.Module:
    """The NCM head of `metric` (decoupled.ncm_metric) from training features (N, D) and labels (N,)."""
    if metric == "l2":  # the official `cl2n` centroids: class means of the centred, normalised features
        head, mean = NCMHead(feats.shape[1], num_classes, scale), feats.mean(0)
        centres = class_means(F.normalize(feats - mean, dim=1), labels, num_classes)
        with torch.no_grad():
            head.mean.copy_(mean)
    elif metric == "cosine":
        head = CosineHead(feats.shape[1], num_classes, scale)
        centres = F.normalize(class_means(F.normalize(feats, dim=1), labels, num_classes), dim=1)
    else:
        raise config_lib.ConfigError(f"--decoupled.ncm_metric: no metric '{metric}'; choose one of "
                                     f"{', '.join(NCM_METRICS)}")
    with torch.no_grad():
        head.weight.copy_(centres)
    return head


def ncm(accelerator, model: nn.Module, cfg: config_lib.Stage2Config, run_dir: Path, train, val, *,
        ncm_metric: NcmMetric = "l2") -> engine.Fitted:
    """NCM: nearest class mean of the training features (eval transform). `ncm_metric`: l2 (the official code's:
    centred, L2-normalised features, squared distance) | cosine (the paper's wording), see `ncm_head`;
    model.head_scale sets the confidence (ECE) only."""
    feats, labels = features(accelerator, model, cfg, train)
    head = ncm_head(feats, labels, model.num_classes, ncm_metric, cfg.model.head_scale)
    return engine.Fitted(head, {"rule": "none: class means of the training features"}, [],
                         {"epochs": 0, "steps": 0, "images_seen": len(train)})


def afg(accelerator, model: nn.Module, cfg: config_lib.Stage2Config, run_dir: Path, train, val, *, tukey: float = 0.5,
        support: int = 2, gamma: float = 0.0, beta: float = 0.6, beta_step: float = 0.05, head_min_count: int = 101,
        kd_temperature: float = 1.0, gbl_s: float = 1.0, gbl_c: float = 2.0) -> engine.Fitted:
    """GLAG stage 2 (livt.afg): the stage-1 head re-trained on real + generated features. Options: Tukey power
    lambda of the features (1 = none); support classes per tail sample (K, 2-3 in the paper); gamma added to
    the calibrated covariance's diagonal (Eq. 9; 0 or 0.1); initial confidence beta of every tail class (0.4
    in the paper's ablation) and its change per epoch as the class's val accuracy rises or falls; classes
    with at least head_min_count training images are head classes (many-shot: > 100); the temperature of
    the distillation from the stage-1 head, weighted by alpha(t) = gbl_s (gbl_c^t - 1). Its state is saved
    after every epoch in the run directory; --resume continues from it."""
    from livt import afg as afg_lib

    train_x, train_y = features(accelerator, model, cfg, train)
    val_x, val_y = features(accelerator, model, cfg, val)
    head = copy.deepcopy(model.get_classifier()).cpu().requires_grad_(True)
    start = engine.load_loop_state(cfg.resume, run_dir)
    accelerator.wait_for_everyone()  # read by every process before the main one saves again

    def save(step: int, state: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            engine.save_loop_state(run_dir, step, state, cfg.keep_last)
    return afg_lib.train_afg(head, train_x, train_y, val_x, val_y, cfg, tukey_lambda=tukey, support=support,
                             gamma=gamma, beta=beta, beta_step=beta_step, head_min_count=head_min_count,
                             kd_temperature=kd_temperature, gbl_s=gbl_s, gbl_c=gbl_c, start=start, save=save)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class SecondStage:
    """One second stage: `trainable` makes the head what the method trains and returns (the module the
    Trainer runs, the module to optimise), or `solve` computes the head from features -> engine.Fitted;
    `export` turns the trained model into a plain classifier; `linear_head`: needs a stage-1 linear head;
    `needs_val`: uses a held-out val split. The keyword-only parameters of `trainable` or `solve` are the
    stage's options, `--decoupled.<option>` (checked against that signature by
    livt.config)."""

    summary: str
    trainable: Callable[[nn.Module, config_lib.Stage2Config], nn.Module] | None = None
    solve: Callable[..., engine.Fitted] | None = None
    export: Callable[[nn.Module], nn.Module] = lambda m: m
    linear_head: bool = False
    needs_val: bool = False


STAGES2: dict[str, SecondStage] = {
    "crt": SecondStage("classifier re-initialised and re-trained", trainable=new_head),
    "lws": SecondStage("per-class scales of the stage-1 head learned", trainable=learned_scales,
                       export=fold_scales, linear_head=True),
    "mislas": SecondStage("stage-1 head re-trained with learned per-class scales, label-aware smoothing",
                          trainable=scaled_stage1_head, export=fold_scales, linear_head=True),
    "tau_norm": SecondStage("stage-1 head rescaled w / ||w||^tau, tau chosen on val", solve=tau_norm,
                            linear_head=True, needs_val=True),
    "ncm": SecondStage("nearest class mean of normalised features", solve=ncm),
    "afg": SecondStage("GLAG: stage-1 head re-trained on real + generated (calibrated Gaussian) features, "
                       "KD on head classes", solve=afg, linear_head=True, needs_val=True),
}


# ---------------------------------------------------------------------------------------------
# The stage


def options(name: str) -> dict[str, tuple[type, object]]:
    """{option: (type, default)} of the second stage `name`: the keyword-only parameters of its function,
    typed by the default (Literal choices by the annotation)."""
    fn = STAGES2[name].trainable or STAGES2[name].solve
    hints = typing.get_type_hints(fn)
    return {p.name: (hints[p.name] if typing.get_origin(hints.get(p.name)) is Literal else type(p.default),
                     p.default)
            for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_request(cfg: config_lib.Stage2Config) -> SecondStage:
    if not cfg.stage2:
        raise config_lib.ConfigError(f"livt stage2: name the second stage with a recipe (--method crt, ...) or "
                                     f"--stage2 NAME ({', '.join(STAGES2)})")
    if not cfg.init_classifier:
        raise config_lib.ConfigError(
            f"--stage2 {cfg.stage2}: needs --init_classifier <stage-1 run>/classifier.safetensors")
    stage = STAGES2[cfg.stage2]
    if stage.trainable is not None and cfg.optim.layer_decay != 1.0:
        raise config_lib.ConfigError(f"--stage2 {cfg.stage2} trains only the head: --optim.layer_decay must be 1, "
                                     f"got {cfg.optim.layer_decay}")
    return stage


def check_stage1(model: nn.Module, meta: dict, cfg: config_lib.Stage2Config, num_classes: int,
                 counts: np.ndarray) -> None:
    """The stage-1 file must fit this stage's data: its classes, resolution, backbone, normalisation and val
    carve."""
    path, d, arch = cfg.init_classifier, cfg.data, meta.get("arch", {})
    if model.num_classes != num_classes:
        raise config_lib.ConfigError(f"--init_classifier {path}: {model.num_classes} classes, the data {num_classes}")
    for key, mine, theirs in (("data.img_size", d.img_size, arch.get("img_size")),
                              ("model.name", cfg.model.name, arch.get("name"))):
        if theirs is not None and mine != theirs:
            raise config_lib.ConfigError(f"--init_classifier {path} has {key.split('.')[1]} {theirs}, this stage "
                                         f"--{key} {mine}; give the stage-1 value")
    check_pretrained_matches(meta, d.dataset, counts, path, d.val_from_train)
    stage1_data = meta.get("config", {}).get("data", {})
    for key in ("mean", "std"):  # the frozen backbone must see the images normalised as in stage 1
        theirs = stage1_data.get(key)
        if theirs is not None and not np.allclose(theirs, getattr(d, key), rtol=0, atol=1e-6):
            raise config_lib.ConfigError(
                f"--init_classifier {path} was trained with data.{key} {list(theirs)}, this stage has "
                f"{list(getattr(d, key))}: its frozen backbone would see differently normalised images; run both "
                f"stages with the same data.normalize / data.mean / data.std")
    carved = meta.get("config", {}).get("data", {}).get("val_from_train", 0.0)
    if meta.get("dataset") == d.dataset and carved != d.val_from_train:
        raise config_lib.ConfigError(
            f"--init_classifier {path} was trained with data.val_from_train {carved}, this stage has "
            f"{d.val_from_train}: the val split would overlap stage 1's training images; run both stages with "
            f"the same --data.val_from_train")
    if STAGES2[cfg.stage2].linear_head and not isinstance(model.get_classifier(), nn.Linear):
        raise config_lib.ConfigError(f"--stage2 {cfg.stage2} needs a linear stage-1 head; {path} has a "
                                     f"{type(model.get_classifier()).__name__}")


def build_trainer(cfg: config_lib.Stage2Config, accelerator, run_dir: Path, model: nn.Module, train,
                  counts: np.ndarray) -> engine.Trainer:
    """The Trainer of a trained second stage: `model`'s backbone frozen, its head set up by the method,
    the recipe's loss on augmented training images through the backbone."""
    stage = STAGES2[cfg.stage2]
    model.requires_grad_(False)
    net, optimize = stage.trainable(model, cfg, **cfg.decoupled.options)
    return engine.Trainer(cfg, "finetune", accelerator, run_dir, net,
                          train_data(cfg, "finetune", train, accelerator.device), train.targets, train.num_classes,
                          tuning.classifier_forward(cfg, counts, train.num_classes), optimize=optimize)


def run_stage2(cfg: config_lib.Stage2Config) -> Path:
    """`livt stage2`: the second stage `cfg.stage2` on the frozen backbone of `cfg.init_classifier` (module
    docstring)."""
    evaluate.check_evaluation(cfg)
    resolve_normalization(cfg)  # a second stage sees the images as its stage 1 did
    stage = check_request(cfg)
    accelerator, run_dir = engine.start(cfg, "stage2")
    d = cfg.data
    train, val, test = (build_dataset(d, split) for split in ("train", "val", "test"))
    counts = class_counts(train.targets, train.num_classes)
    accelerator.print(describe(counts, train.name))
    model, meta1 = load_classifier(cfg.init_classifier)
    check_stage1(model, meta1, cfg, train.num_classes, counts)
    shift_bn = cfg.decoupled.options.get("shift_bn", False)  # an option of the trained stages
    n_bn = len(batchnorms(model)) if shift_bn else 0
    if shift_bn:
        accelerator.print(f"shifted BN: re-estimating the statistics of {n_bn} BatchNorm layers" if n_bn else
                          "shifted BN: the backbone has no BatchNorm layer (a ViT's LayerNorm keeps no "
                          "statistics), so nothing is re-estimated")
    info = {"stage2": {"name": cfg.stage2, "summary": stage.summary, "init_classifier": cfg.init_classifier,
                       "stage1_method": meta1.get("config", {}).get("method") or None,
                       **({"shifted_bn_layers": n_bn} if shift_bn else {})}}
    meta = engine.run_meta(cfg, train, counts)
    if stage.solve is not None:
        return solve_and_report(cfg, stage, accelerator, run_dir, model, train, val, test, counts, meta, info)

    rule, val_split = evaluate.selection_rule(cfg, val, test)
    accelerator.print(f"reported epoch: {rule} (val: {val_split})")
    trainer = build_trainer(cfg, accelerator, run_dir, model, train, counts)
    tuning.fit_and_report(cfg, accelerator, run_dir, trainer, lambda: trainer.unwrapped.model, rule, val_split,
                            val, test, counts, meta, export=stage.export, info=info)
    return run_dir


def solve_and_report(cfg: config_lib.Stage2Config, stage: SecondStage, accelerator, run_dir: Path,
                     model: nn.Module, train, val, test, counts: np.ndarray, meta: dict[str, Any],
                     info: dict[str, Any]) -> Path:
    """A second stage without training: the head from features, saved and evaluated on test once."""
    held = heldout_val(val, test)
    if stage.needs_val and not held:
        raise config_lib.ConfigError(
            f"--stage2 {cfg.stage2} uses a held-out val split; the val split of '{cfg.data.dataset}' is its "
            f"test split: run both stages with --data.val_from_train 0.1")
    engine.write_config(cfg, run_dir, accelerator)
    model.to(accelerator.device)
    t0 = time.perf_counter()
    fitted = stage.solve(accelerator, model, cfg, run_dir, train, val, **cfg.decoupled.options)
    seconds = time.perf_counter() - t0
    set_head(model, fitted.head.to(accelerator.device))
    log = engine.MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process)
    if accelerator.is_main_process:  # the whole run's rows (a resumed afg's include the restored epochs)
        log.path.unlink(missing_ok=True)
    for row in fitted.rows:
        log.write(**row)
    if accelerator.is_main_process:
        save_model(model, run_dir / "classifier.safetensors", "classifier", arch_of(model), **meta)
    accelerator.wait_for_everyone()
    _, val_split = evaluate.selection_rule(cfg, val, test) if held else ("", "none: val is the test split")
    selection = {"epoch": None, **fitted.selection, "val": val_split if stage.needs_val else "not used",
                 "select": cfg.select}
    evaluate.end_run(cfg, accelerator, run_dir, model, val, test, counts, selection,
                   {**fitted.budget, "train_seconds": round(seconds, 1)}, info, posthoc=False)
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    return run_stage2(config_lib.parse_args("stage2", sys.argv[1:] if argv is None else argv))
