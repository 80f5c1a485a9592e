"""Classification losses for Balanced Fine-Tuning and the long-tailed baselines.

Every loss is a pure function `loss(logits, targets, [class_counts,] **options) -> scalar`. Its
signature says what it needs: parameters WITHOUT a default are inputs (`targets`, `class_counts`,
`progress` = training progress in [0, 1), or any entry of the model-output dict such as `logits`,
`features`, `cosine`), parameters WITH a default are options. `build_loss` turns one into the
`Criterion` the training loop calls as `criterion(outputs, targets, progress)`, so a new loss is a new
function in `LOSSES` and nothing in the loop changes.

- `logits`: (B, C), any float dtype; the loss is computed in float32 outside autocast, because a
  Bal-BCE bias near log(999) ~ 6.9 loses ~0.03 to bf16 rounding.
- `targets`: hard labels (B,) int64, or soft targets (B, C) float (timm's Mixup/CutMix with label
  smoothing). Every loss accepts both; a one-hot soft target gives the same value as its hard label.
- `class_counts`: training images per class (C,); every class needs at least one (its prior is logged).

The logit biases of Bal-CE and Bal-BCE are a training device only: prediction and evaluation use the
raw logits z (see `livt.metrics.posthoc_adjust` for a known non-uniform test prior).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Counts = Sequence[int] | np.ndarray | Tensor
BIAS_VARIANTS = ("eq10", "eq6")


# ---------------------------------------------------------------------------------------------
# Priors and logit biases (computed in float64 on the CPU, returned as float32)


def _prior64(class_counts: Counts, what: str = "class_counts") -> Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu")
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"{what}: expected a 1-D sequence of at least 2 classes, "
                         f"got shape {tuple(counts.shape)}")
    bad = torch.nonzero(counts <= 0).flatten().tolist()
    if bad:
        shown = ", ".join(str(c) for c in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{what}: class {shown} has count {counts[bad[0]].item():g}; every class needs a "
                         f"positive count (its prior enters a log)")
    return counts / counts.sum()


def prior(class_counts: Counts) -> Tensor:
    """Training prior pi_c = n_c / N, (C,) float32; a zero-count class raises ValueError naming it."""
    return _prior64(class_counts).float()


def bal_bce_bias(class_counts: Counts, variant: str = "eq10", test_prior: Counts | None = None) -> Tensor:
    """Bal-BCE logit bias B (C,) float32, added to the logits during training only.

    - 'eq10' (default, balanced test set): B_c = log pi_c - log(1 - pi_c) + log(C - 1).
    - 'eq6' (Theorem 2, what the official code trains with): B_c = log pi_c - log(1 - pi_c).
    - `test_prior` (Theorem 3; counts or probabilities, normalised here; only with 'eq10'):
      B_c = (log pi_s - log pi_t) - (log(1 - pi_s) - log(1 - pi_t)); a uniform pi_t gives Eq. 10.
    """
    if variant not in BIAS_VARIANTS:
        raise ValueError(f"unknown Bal-BCE bias variant '{variant}'; "
                         f"choose one of {', '.join(BIAS_VARIANTS)}")
    pi_s = _prior64(class_counts)
    bias = torch.log(pi_s) - torch.log1p(-pi_s)
    if test_prior is not None:
        if variant != "eq10":
            raise ValueError(f"a test prior (Theorem 3) generalises Eq. 10; "
                             f"it cannot be combined with '{variant}'")
        pi_t = _prior64(test_prior, "test_prior")
        if pi_t.numel() != pi_s.numel():
            raise ValueError(f"test_prior has {pi_t.numel()} classes, class_counts {pi_s.numel()}")
        bias = bias - (torch.log(pi_t) - torch.log1p(-pi_t))
    elif variant == "eq10":
        bias = bias + math.log(pi_s.numel() - 1)
    return bias.float()


def cb_weights(class_counts: Counts, beta: float = 0.9999) -> Tensor:
    """Effective-number weights (1 - beta) / (1 - beta^n_c) normalised to sum C, (C,) float32."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"cb beta must lie in [0, 1), got {beta}")
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu")
    _prior64(counts)  # same validation as the other count-based losses
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (w * counts.numel() / w.sum()).float()


def _bal_ce_offset(class_counts: Counts, tau: float = 1.0) -> Tensor:
    return (tau * torch.log(_prior64(class_counts))).float()


def _bal_bce_offset(class_counts: Counts, tau: float = 1.0, variant: str = "eq10",
                    test_prior: Counts | None = None) -> Tensor:
    return tau * bal_bce_bias(class_counts, variant, test_prior)  # tau scales the whole bias (Alg. 1 l. 16)


# ---------------------------------------------------------------------------------------------
# Kernels: float32, outside autocast


def _float32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run `fn(logits, targets, *rest)` in float32 with autocast off; checks the target format."""

    @functools.wraps(fn)
    def wrapper(logits: Tensor, targets: Tensor, *rest: Tensor | None, **kw: float) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
        hard = targets.dim() == 1 and not targets.is_floating_point()
        if not hard and not (targets.is_floating_point() and targets.shape == logits.shape):
            raise ValueError(f"targets must be hard labels (B,) int64 or soft targets (B, C) float matching "
                             f"logits {tuple(logits.shape)}; got {tuple(targets.shape)} {targets.dtype}")
        for t in rest:
            if t is not None and t.shape != logits.shape[-1:]:
                raise ValueError(f"class_counts has {t.shape[0]} classes, logits have {logits.shape[-1]}")
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return fn(logits.float(), targets.long() if hard else targets.float(), *rest, **kw)

    return wrapper


def _probs(targets: Tensor, num_classes: int) -> Tensor:
    """(B, C) float32 target distribution from hard or soft targets."""
    if targets.is_floating_point():
        return targets
    return F.one_hot(targets, num_classes).float()


@_float32
def _ce(logits: Tensor, targets: Tensor, offset: Tensor | None = None) -> Tensor:
    z = logits if offset is None else logits + offset  # (B, C)
    return F.cross_entropy(z, targets)  # soft targets: -sum_c t_c log softmax(z)_c, batch mean


@_float32
def _bce(logits: Tensor, targets: Tensor, offset: Tensor | None = None) -> Tensor:
    z = logits if offset is None else logits + offset  # (B, C)
    t = _probs(targets, z.shape[1])
    return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]  # sum over C, mean over B


@_float32
def _weighted_ce(logits: Tensor, targets: Tensor, weight: Tensor) -> Tensor:
    per_sample = F.cross_entropy(logits, targets, reduction="none")  # (B,)
    w = weight[targets] if not targets.is_floating_point() else targets @ weight  # (B,) = sum_c t_c w_c
    # Batch mean of w_i * CE_i, not F.cross_entropy(weight=...)'s division by the summed weights.
    return (w * per_sample).mean()


@_float32
def _focal(logits: Tensor, targets: Tensor, gamma: float) -> Tensor:
    log_p = F.log_softmax(logits, dim=-1)  # (B, C)
    t = _probs(targets, logits.shape[1])
    return -(t * (1.0 - log_p.exp()).pow(gamma) * log_p).sum(-1).mean()


LAS_SHAPES = ("linear", "concave", "convex")
LAS_SPREADS = ("paper", "code")


def las_epsilons(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: str = "linear") -> Tensor:
    """MiSLAS's per-class smoothing eps_y = f(n_y), (C,) float32: `head` for the largest class, `tail` for
    the smallest, in between by x = (n_y - n_min) / (n_max - n_min): linear tail + (head - tail) x,
    concave tail + (head - tail) sin(pi x / 2), convex head - (head - tail) cos(pi x / 2).
    Equal counts (x undefined) give every class `head`: plain smoothing."""
    if shape not in LAS_SHAPES:
        raise ValueError(f"unknown label-aware smoothing shape '{shape}'; choose one of {', '.join(LAS_SHAPES)}")
    for name, eps in (("las_head", head), ("las_tail", tail)):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"label-aware smoothing {name} must be in [0, 1), got {eps}")
    n = _prior64(class_counts)  # proportional to the counts; validates them
    span = n.max() - n.min()
    x = (n - n.min()) / span if span > 0 else torch.ones_like(n)
    f = {"linear": x, "concave": torch.sin(math.pi * x / 2), "convex": 1 - torch.cos(math.pi * x / 2)}[shape]
    return (tail + (head - tail) * f).float()


def las_off_target(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: str = "linear",
                   spread: str = "paper") -> Tensor:
    """(C,) float32: the target mass label-aware smoothing puts on each other class for a sample of class y,
    eps_y / (K - 1) ('paper') or eps_y / K ('code'); the true class gets the rest, 1 - (K - 1) * that."""
    if spread not in LAS_SPREADS:
        raise ValueError(f"unknown label-aware smoothing spread '{spread}'; choose one of {', '.join(LAS_SPREADS)}")
    eps = las_epsilons(class_counts, head, tail, shape)
    return eps / (len(eps) - 1) if spread == "paper" else eps / len(eps)


@_float32
def _las(logits: Tensor, targets: Tensor, off_target: Tensor) -> Tensor:
    num_classes = logits.shape[1]
    off = off_target[:, None].expand(-1, num_classes)  # (C, C): row y is the smoothed target of class y
    rows = off.diagonal_scatter(1.0 - (num_classes - 1) * off_target)
    t = targets @ rows if targets.is_floating_point() else rows[targets]  # soft: the mixture of the rows
    return F.cross_entropy(logits, t)


# ---------------------------------------------------------------------------------------------
# Public losses


def ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy, batch mean."""
    return _ce(logits, targets)


def bce(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE with logits against one-hot/soft targets, summed over classes, batch mean (Eq. 5, w = 1)."""
    return _bce(logits, targets)


def bal_ce(logits: Tensor, targets: Tensor, class_counts: Counts, tau: float = 1.0) -> Tensor:
    """Balanced softmax / logit-adjusted CE: CE on z + tau * log pi. Predict with the raw logits z."""
    return _ce(logits, targets, _bal_ce_offset(class_counts, tau).to(logits.device))


def bal_bce(logits: Tensor, targets: Tensor, class_counts: Counts, tau: float = 1.0,
            variant: str = "eq10", test_prior: Counts | None = None) -> Tensor:
    """Bal-BCE: BCE on z + tau * B with B from `bal_bce_bias` (Algorithm 1). Predict with the raw logits z."""
    return _bce(logits, targets, _bal_bce_offset(class_counts, tau, variant, test_prior).to(logits.device))


def focal(logits: Tensor, targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Softmax focal loss -sum_c t_c (1 - p_c)^gamma log p_c, batch mean; gamma = 0 is CE."""
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    return _focal(logits, targets, gamma=float(gamma))


def cb_ce(logits: Tensor, targets: Tensor, class_counts: Counts, beta: float = 0.9999) -> Tensor:
    """Class-balanced CE: per-sample weight w_y (soft: sum_c t_c w_c) from `cb_weights`, batch mean."""
    return _weighted_ce(logits, targets, cb_weights(class_counts, beta).to(logits.device))


def label_aware_smoothing(logits: Tensor, targets: Tensor, class_counts: Counts, head: float = 0.3,
                          tail: float = 0.0, shape: str = "linear", spread: str = "paper") -> Tensor:
    """MiSLAS (Zhong et al., CVPR 2021) label-aware smoothing: CE against 1 - eps_y on the true class and
    eps_y / (K - 1) on each other class (paper; spread 'code': eps_y / K on every class, as the official
    code), eps_y from `las_epsilons`. A soft target t (mixup) gets sum_c t_c * (the smoothed target of c),
    so add no other smoothing (loss.label_smoothing 0)."""
    return _las(logits, targets, las_off_target(class_counts, head, tail, shape, spread).to(logits.device))


LOSSES: dict[str, Callable[..., Tensor]] = {
    "ce": ce,
    "bce": bce,
    "bal_ce": bal_ce,
    "bal_bce": bal_bce,
    "focal": focal,
    "cb_ce": cb_ce,
    "label_aware_smoothing": label_aware_smoothing,
}

# Count-based losses: (per-class tensor from counts and options, kernel), so that `build_loss`
# computes the bias/weights once and copies them to each device once rather than every step.
_PER_CLASS = {
    "bal_ce": (_bal_ce_offset, _ce),
    "bal_bce": (_bal_bce_offset, _bce),
    "cb_ce": (cb_weights, _weighted_ce),
    "label_aware_smoothing": (las_off_target, _las),
}


INPUTS = ("targets", "class_counts", "progress")  # what the loop supplies besides the model outputs


def signature(fn: Callable[..., Tensor]) -> tuple[list[str], list[str]]:
    """(inputs, options) of a loss: its parameters without and with a default."""
    params = inspect.signature(fn).parameters.values()
    return ([p.name for p in params if p.default is inspect.Parameter.empty],
            [p.name for p in params if p.default is not inspect.Parameter.empty])


class Criterion:
    """`criterion(outputs, targets, progress=0.0) -> scalar` for one named loss and its options.

    `outputs` is the model-output dict (`livt.models.outputs`: logits, features, a head's extras) or a
    bare logits tensor. Per-class tensors (biases, weights) are computed once, on the CPU, at build
    time, and copied to each device once.
    """

    def __init__(self, name: str, class_counts: Counts, **options: object) -> None:
        if name not in LOSSES:
            raise ValueError(f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}")
        self.name, self.options = name, options
        inputs, accepted = signature(LOSSES[name])
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"loss '{name}' takes no option {', '.join(unknown)}; "
                             f"it accepts: {', '.join(accepted) or 'none'}")
        self.needs = [i for i in inputs if i not in INPUTS]  # model outputs, e.g. ['logits']
        if name in _PER_CLASS:
            make, self._kernel = _PER_CLASS[name]
            self._table = make(class_counts, **options)  # (C,) float32, CPU; raises now, not at step 1
            self._on_device: dict[torch.device, Tensor] = {}
        else:
            self._kernel = None
            self._counts = torch.as_tensor(class_counts) if "class_counts" in inputs else None
            if self._counts is not None:
                _prior64(self._counts)  # validate now

    def __call__(self, outputs: dict[str, Tensor] | Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        if isinstance(outputs, Tensor):
            outputs = {"logits": outputs}
        missing = [k for k in self.needs if k not in outputs]
        if missing:
            raise ValueError(f"loss '{self.name}' needs the model output(s) {missing}; this model gives "
                             f"{sorted(outputs)} (a loss on 'cosine' needs --model.head cosine)")
        if self._kernel is not None:
            logits = outputs["logits"]
            t = self._on_device.get(logits.device)
            if t is None:
                t = self._on_device[logits.device] = self._table.to(logits.device)
            return self._kernel(logits, targets, t)
        supplied = {"targets": targets, "progress": float(progress), "class_counts": self._counts}
        inputs, _ = signature(LOSSES[self.name])
        kwargs = {k: supplied[k] if k in INPUTS else outputs[k] for k in inputs}
        return LOSSES[self.name](**kwargs, **self.options)


def build_loss(name: str, class_counts: Counts, **options: object) -> Criterion:
    """The `Criterion` of the named loss; `class_counts` is ignored by losses that do not take it.

    Unknown names and options the loss does not take raise ValueError listing the valid ones.
    """
    return Criterion(name, class_counts, **options)


__all__ = ["LOSSES", "BIAS_VARIANTS", "Criterion", "signature", "prior", "bal_bce_bias", "cb_weights", "ce", "bce", "bal_ce", "bal_bce",
           "focal", "cb_ce", "label_aware_smoothing", "las_epsilons", "build_loss"]
