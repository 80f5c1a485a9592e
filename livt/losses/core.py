"""What every loss shares: priors and weights from class counts (float64 on the CPU), the float32
kernel wrapper, target handling, and the one re-weighting convention (see `livt.losses`)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Counts = Sequence[int] | np.ndarray | Tensor


def counts64(class_counts: Counts, what: str = "class_counts") -> Tensor:
    """(C,) float64 CPU counts, validated: 1-D, at least 2 classes, every count positive."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64, device="cpu")
    if counts.dim() != 1 or counts.numel() < 2:
        raise ValueError(f"{what}: expected a 1-D sequence of at least 2 classes, "
                         f"got shape {tuple(counts.shape)}")
    bad = torch.nonzero(counts <= 0).flatten().tolist()
    if bad:
        shown = ", ".join(str(c) for c in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(f"{what}: class {shown} has count {counts[bad[0]].item():g}; every class needs a "
                         f"positive count (its prior enters a log)")
    return counts


def prior64(class_counts: Counts, what: str = "class_counts") -> Tensor:
    counts = counts64(class_counts, what)
    return counts / counts.sum()


def prior(class_counts: Counts) -> Tensor:
    """Training prior pi_c = n_c / N, (C,) float32; a zero-count class raises ValueError naming it."""
    return prior64(class_counts).float()


def normalised(w: Tensor) -> Tensor:
    """Per-class weights scaled to sum C (mean 1 over classes, so the lr keeps its meaning), float32."""
    return (w * w.numel() / w.sum()).float()


def cb_weights(class_counts: Counts, beta: float = 0.9999) -> Tensor:
    """Effective-number weights (1 - beta) / (1 - beta^n_c) normalised to sum C, (C,) float32."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"cb beta must lie in [0, 1), got {beta}")
    counts = counts64(class_counts)
    return normalised((1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts)))


def inverse_frequency_weights(class_counts: Counts) -> Tensor:
    """w_c = 1 / pi_c normalised to sum C, (C,) float32 (weighted softmax; IB's lambda_c)."""
    return normalised(1.0 / prior64(class_counts))


def check(name: str, value: float, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"loss option {name} must be {what}, got {value}")


def float32(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run a kernel `fn(scores, targets, ...)` with autocast off and every floating tensor at least
    float32 (float64 stays float64, for gradcheck). Checks the target format and that every 1-D
    per-class tensor matches the C of `scores` (B, C)."""
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def wrapper(*args: object, **kw: object) -> Tensor:
        kw.update(zip(names, args))
        scores, targets = kw[names[0]], kw["targets"]
        if scores.dim() != 2:
            raise ValueError(f"{names[0]} must be (B, C), got shape {tuple(scores.shape)}")
        hard = targets.dim() == 1 and not targets.is_floating_point()
        if not hard and not (targets.is_floating_point() and targets.shape == scores.shape):
            raise ValueError(f"targets must be hard labels (B,) int64 or soft targets (B, C) float matching "
                             f"{names[0]} {tuple(scores.shape)}; got {tuple(targets.shape)} {targets.dtype}")
        num_classes = scores.shape[-1]
        for key, v in kw.items():
            if key != "targets" and isinstance(v, Tensor) and v.dim() == 1 and v.shape[0] != num_classes:
                raise ValueError(f"class_counts has {v.shape[0]} classes, logits have {num_classes}")
        wide = scores.dtype if scores.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=scores.device.type, enabled=False):
            kw = {k: v.to(wide) if isinstance(v, Tensor) and v.is_floating_point() and k != "targets" else v
                  for k, v in kw.items()}
            kw["targets"] = targets.long() if hard else targets.to(wide)
            return fn(**kw)

    return wrapper


def probs(targets: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, C) target distribution from hard or soft targets."""
    if targets.is_floating_point():
        return targets
    return F.one_hot(targets, num_classes).to(dtype)


def per_sample(per_class: Tensor, targets: Tensor) -> Tensor:
    """(B,) loss of each sample from (B, C) losses `per_class[i, c]` = the loss were the label c:
    the entry of the label, or for soft targets the target-weighted sum sum_c t_c per_class[:, c]."""
    if targets.is_floating_point():
        return (targets * per_class).sum(-1)
    return per_class.gather(1, targets[:, None])[:, 0]


def sample_weight(weight: Tensor, targets: Tensor) -> Tensor:
    """(B,) per-sample weight w_y; soft targets: sum_c t_c w_c."""
    return targets @ weight if targets.is_floating_point() else weight[targets]


def weighted_mean(losses: Tensor, weight: Tensor | None, targets: Tensor) -> Tensor:
    """THE re-weighting convention: the plain batch mean of w_i * loss_i (weights normalised to sum C),
    not PyTorch's weighted mean sum_i w_i loss_i / sum_i w_i."""
    return losses.mean() if weight is None else (sample_weight(weight, targets) * losses).mean()


def lse_without(logits: Tensor) -> Tensor:
    """(B, C): log sum_{k != c} e^{z_k} for every class c, without cancellation. For c other than the
    row's argmax p_c <= 1/2, so logsumexp(z) + log(1 - p_c) is exact to a few ulps; for the argmax, where
    1 - p_c may cancel to 0, the logsumexp of the row with that entry left out."""
    top = logits.argmax(-1, keepdim=True)  # (B, 1)
    is_top = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
    p = logits.softmax(-1).masked_fill(is_top, 0.0)  # 0 at the argmax: no log(0) and no NaN gradient
    others = torch.logsumexp(logits, -1, keepdim=True) + torch.log1p(-p)
    without_top = torch.logsumexp(logits.masked_fill(is_top, float("-inf")), -1, keepdim=True)  # (B, 1)
    return torch.where(is_top, without_top, others)


def soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """(B,) softmax CE of each sample: -sum_c t_c log softmax(z)_c (hard: -log softmax(z)_y)."""
    return per_sample(-F.log_softmax(logits, dim=-1), targets)
