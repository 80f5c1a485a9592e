"""Re-margining and per-class temperatures: LDAM with deferred re-weighting (on the cosine head) and
CDT. Margins and temperatures are training devices: prediction uses the head's logits (s * cos for
LDAM's cosine head, the raw z for CDT)."""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import (
    Counts,
    cb_weights,
    check,
    counts64,
    float32,
    lse_without,
    per_sample,
    sample_weight,
    weighted_mean,
)


def ldam_margins(class_counts: Counts, max_margin: float = 0.5) -> Tensor:
    """m_c = C' / n_c^(1/4) with C' such that the largest margin (the rarest class) is `max_margin`."""
    check("max_margin", max_margin, max_margin >= 0, ">= 0")
    m = counts64(class_counts).pow(-0.25)
    return (m * (max_margin / m.max())).float()


def cdt_temperatures(class_counts: Counts, gamma: float = 0.2) -> Tensor:
    """a_c = (n_max / n_c)^gamma (Ye et al. 2020): 1 for the largest class, growing towards the tail."""
    check("gamma", gamma, gamma >= 0, ">= 0")
    counts = counts64(class_counts)
    return (counts.max() / counts).pow(gamma).float()


DrwMean = Literal["weighted", "plain"]
DRW_MEANS = get_args(DrwMean)


def _ldam_tables(class_counts: Counts, s: float = 30.0, max_margin: float = 0.5, drw_start: float = 0.8,
                 drw_beta: float = 0.9999, drw_mean: DrwMean = "weighted") -> dict[str, Tensor]:
    check("s", s, s > 0, "> 0")
    if drw_mean not in DRW_MEANS:
        raise ValueError(f"unknown ldam drw_mean '{drw_mean}'; choose one of {', '.join(DRW_MEANS)}")
    check("drw_start", drw_start, drw_start >= 0, ">= 0 (a fraction of training; >= 1 = no DRW)")
    return {"margins": ldam_margins(class_counts, max_margin), "drw_weight": cb_weights(class_counts, drw_beta)}


def _cdt_tables(class_counts: Counts, gamma: float = 0.2) -> dict[str, Tensor]:
    return {"inv_temperature": 1.0 / cdt_temperatures(class_counts, gamma)}


@float32
def _ldam_kernel(cosine: Tensor, targets: Tensor, progress: float, margins: Tensor, drw_weight: Tensor,
                 s: float, drw_start: float, drw_mean: DrwMean) -> Tensor:
    logits = s * cosine  # (B, C)
    if targets.is_floating_point():
        # loss were the label c: CE of s (cos - m_c e_c) at c = log(sum_{k != c} e^{z_k} + e^{z_c - s m_c})
        # - (z_c - s m_c), summed with the target weights t_c
        shifted = logits - s * margins  # (B, C): z_c - s m_c
        losses = per_sample(torch.logaddexp(lse_without(logits), shifted) - shifted, targets)
    else:
        margin = torch.zeros_like(logits).scatter_(1, targets[:, None], (s * margins)[targets][:, None])
        losses = F.cross_entropy(logits - margin, targets, reduction="none")  # CE of s (cos - m_y e_y)
    if progress < drw_start:
        return losses.mean()
    if drw_mean == "plain":
        return weighted_mean(losses, drw_weight, targets)
    w = sample_weight(drw_weight, targets)  # "weighted": PyTorch's weighted mean, as the official code
    return (w * losses).sum() / w.sum()


@float32
def _cdt_kernel(logits: Tensor, targets: Tensor, inv_temperature: Tensor) -> Tensor:
    return F.cross_entropy(logits * inv_temperature, targets)


def ldam(cosine: Tensor, targets: Tensor, class_counts: Counts, progress: float, s: float = 30.0,
         max_margin: float = 0.5, drw_start: float = 0.8, drw_beta: float = 0.9999,
         drw_mean: DrwMean = "weighted") -> Tensor:
    """LDAM-DRW (Cao et al., NeurIPS 2019) on the cosine head's `cosine` output: CE(s (cos - m_y e_y), y)
    with margins from `ldam_margins`; from `drw_start` of training on (deferred re-weighting) each sample
    is weighted by the class-balanced w_y (beta `drw_beta`), before it the plain batch mean; drw_start >= 1
    = no DRW. `drw_mean`: 'weighted' (default, the official code's PyTorch weighted mean
    sum_i w_i loss_i / sum_i w_i) | 'plain' (livt's re-weighting convention, (1/B) sum_i w_i loss_i).
    Soft targets: sum_c t_c times the loss were the label c (and weight sum_c t_c w_c)."""
    return _ldam_kernel(cosine, targets, progress,
                        **_ldam_tables(class_counts, s, max_margin, drw_start, drw_beta, drw_mean),
                        s=s, drw_start=drw_start, drw_mean=drw_mean)


def cdt(logits: Tensor, targets: Tensor, class_counts: Counts, gamma: float = 0.2) -> Tensor:
    """Class-dependent temperatures (Ye et al. 2020): CE on z_c / a_c, a_c from `cdt_temperatures`;
    gamma = 0 is CE. Predict with z."""
    return _cdt_kernel(logits, targets, **_cdt_tables(class_counts, gamma))
