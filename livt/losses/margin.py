"""Re-margining and per-class temperatures: LDAM with deferred re-weighting (on the cosine head) and
CDT. Margins and temperatures are training devices: prediction uses the head's logits (s * cos for
LDAM's cosine head, the raw z for CDT)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import Counts, cb_weights, check, counts64, float32, per_sample, weighted_mean


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


def _ldam_tables(class_counts: Counts, s: float = 30.0, max_margin: float = 0.5, drw_start: float = 0.8,
                 drw_beta: float = 0.9999) -> dict[str, Tensor]:
    check("s", s, s > 0, "> 0")
    check("drw_start", drw_start, drw_start >= 0, ">= 0 (a fraction of training; >= 1 = no DRW)")
    return {"margins": ldam_margins(class_counts, max_margin), "drw_weight": cb_weights(class_counts, drw_beta)}


def _cdt_tables(class_counts: Counts, gamma: float = 0.2) -> dict[str, Tensor]:
    return {"inv_temperature": 1.0 / cdt_temperatures(class_counts, gamma)}


@float32
def _ldam_kernel(cosine: Tensor, targets: Tensor, progress: float, margins: Tensor, drw_weight: Tensor,
                 s: float, drw_start: float) -> Tensor:
    logits = s * cosine  # (B, C)
    p = logits.softmax(-1)
    # loss were the label c: CE of s * (cos - m_c e_c) at c. Its log-partition is
    # logsumexp(s cos) + log(1 - p_c (1 - e^{-s m_c})), stable for any margin.
    per_class = (torch.logsumexp(logits, -1, keepdim=True) + torch.log1p(p * torch.expm1(-s * margins))
                 - (logits - s * margins))  # (B, C)
    losses = per_sample(per_class, targets)
    return weighted_mean(losses, drw_weight if progress >= drw_start else None, targets)


@float32
def _cdt_kernel(logits: Tensor, targets: Tensor, inv_temperature: Tensor) -> Tensor:
    return F.cross_entropy(logits * inv_temperature, targets)


def ldam(cosine: Tensor, targets: Tensor, class_counts: Counts, progress: float, s: float = 30.0,
         max_margin: float = 0.5, drw_start: float = 0.8, drw_beta: float = 0.9999) -> Tensor:
    """LDAM-DRW (Cao et al., NeurIPS 2019) on the cosine head's `cosine` output: CE(s (cos - m_y e_y), y)
    with margins from `ldam_margins`; from `drw_start` of training on (deferred re-weighting) each sample
    is weighted by the class-balanced w_y (beta `drw_beta`), before it plain; drw_start >= 1 = no DRW.
    Soft targets: sum_c t_c times the loss were the label c (and weight sum_c t_c w_c)."""
    return _ldam_kernel(cosine, targets, progress, **_ldam_tables(class_counts, s, max_margin, drw_start, drw_beta),
                        s=s, drw_start=drw_start)


def cdt(logits: Tensor, targets: Tensor, class_counts: Counts, gamma: float = 0.2) -> Tensor:
    """Class-dependent temperatures (Ye et al. 2020): CE on z_c / a_c, a_c from `cdt_temperatures`;
    gamma = 0 is CE. Predict with z."""
    return _cdt_kernel(logits, targets, **_cdt_tables(class_counts, gamma))


TABLES = {
    "ldam": (_ldam_tables, _ldam_kernel),
    "cdt": (_cdt_tables, _cdt_kernel),
}
