"""Logit adjustment by the training prior: Bal-CE, Bal-BCE (LiVT), GLAG's Gradual Balanced Loss, LADE.
Each adjusts the logits during training only; prediction uses the raw logits z."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import Counts, check, float32, prior64, probs, soft_ce

BiasVariant = Literal["eq10", "eq6"]
BIAS_VARIANTS = get_args(BiasVariant)


def bal_bce_bias(class_counts: Counts, variant: BiasVariant = "eq10", test_prior: Counts | None = None) -> Tensor:
    """Bal-BCE logit bias B (C,) float32, added to the logits during training only.

    - 'eq10' (default, balanced test set): B_c = log pi_c - log(1 - pi_c) + log(C - 1).
    - 'eq6' (Theorem 2, what the official code trains with): B_c = log pi_c - log(1 - pi_c).
    - `test_prior` (Theorem 3; counts or probabilities, normalised here; only with 'eq10'):
      B_c = (log pi_s - log pi_t) - (log(1 - pi_s) - log(1 - pi_t)); a uniform pi_t gives Eq. 10.
    """
    if variant not in BIAS_VARIANTS:
        raise ValueError(f"unknown Bal-BCE bias variant '{variant}'; "
                         f"choose one of {', '.join(BIAS_VARIANTS)}")
    pi_s = prior64(class_counts)
    bias = torch.log(pi_s) - torch.log1p(-pi_s)
    if test_prior is not None:
        if variant != "eq10":
            raise ValueError(f"a test prior (Theorem 3) generalises Eq. 10; "
                             f"it cannot be combined with '{variant}'")
        pi_t = prior64(test_prior, "test_prior")
        if pi_t.numel() != pi_s.numel():
            raise ValueError(f"test_prior has {pi_t.numel()} classes, class_counts {pi_s.numel()}")
        bias = bias - (torch.log(pi_t) - torch.log1p(-pi_t))
    elif variant == "eq10":
        bias = bias + math.log(pi_s.numel() - 1)
    return bias.float()


def gbl_alpha(progress: float, s: float = 1.0, c: float = 2.0) -> float:
    """GLAG Eq. 3, alpha = s (c^ep - 1), with ep = training progress per optimizer step (a smooth
    form of the paper's per-epoch T / T_max): 0 at the start, s (c - 1) at the end."""
    return s * (c ** progress - 1.0)


# ---------------------------------------------------------------------------------------------
# Per-class tables (computed once by the Criterion) and kernels


def _bal_ce_tables(class_counts: Counts, tau: float = 1.0) -> dict[str, Tensor]:
    return {"offset": (tau * torch.log(prior64(class_counts))).float()}


def _bal_bce_tables(class_counts: Counts, tau: float = 1.0, variant: BiasVariant = "eq10",
                    test_prior: Counts | None = None) -> dict[str, Tensor]:
    return {"offset": tau * bal_bce_bias(class_counts, variant, test_prior)}  # tau scales the whole bias


def _log_prior_tables(class_counts: Counts, **options: float) -> dict[str, Tensor]:
    for name, value in options.items():
        check(name, value, value >= 0 if name != "c" else value > 0, ">= 0" if name != "c" else "> 0")
    return {"log_prior": torch.log(prior64(class_counts)).float()}


@float32
def ce_kernel(logits: Tensor, targets: Tensor, offset: Tensor | None = None) -> Tensor:
    z = logits if offset is None else logits + offset  # (B, C)
    return F.cross_entropy(z, targets)  # soft targets: -sum_c t_c log softmax(z)_c, batch mean


@float32
def bce_kernel(logits: Tensor, targets: Tensor, offset: Tensor | None = None) -> Tensor:
    z = logits if offset is None else logits + offset  # (B, C)
    t = probs(targets, z.shape[1], z.dtype)
    return F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]  # sum over C, mean over B


@float32
def _gbl_kernel(logits: Tensor, targets: Tensor, progress: float, log_prior: Tensor, s: float,
                c: float) -> Tensor:
    return F.cross_entropy(logits + gbl_alpha(progress, s, c) * log_prior, targets)


@float32
def _lade_kernel(logits: Tensor, targets: Tensor, log_prior: Tensor, alpha: float, lam: float) -> Tensor:
    pc_softmax = soft_ce(logits + log_prior, targets).mean()
    t = probs(targets, logits.shape[1], logits.dtype)  # (B, C)
    n = t.sum(0)  # (C,) samples (target mass) of each class in the batch
    first = (t * logits).sum(0) / n.clamp_min(1e-12)  # mean of z_y over the batch's samples of y; 0 if none
    # log (1/B) sum_i exp(z_iy - log pi_y + log 1/C): the DV bound's partition term on balanced logits
    second = torch.logsumexp(logits - log_prior - math.log(logits.shape[1]), dim=0) - math.log(logits.shape[0])
    bound = first - second - lam * second ** 2  # (C,) ReMINE: DV bound minus lambda * (log Z)^2
    regulariser = -(log_prior.exp() * bound).sum()  # every class, absent ones too (as the official code)
    return pc_softmax + alpha * regulariser


# ---------------------------------------------------------------------------------------------
# Public losses


def bal_ce(logits: Tensor, targets: Tensor, class_counts: Counts, tau: float = 1.0) -> Tensor:
    """Balanced softmax / logit-adjusted CE: CE on z + tau * log pi. Predict with the raw logits z."""
    return ce_kernel(logits, targets, **_bal_ce_tables(class_counts, tau))


def bal_bce(logits: Tensor, targets: Tensor, class_counts: Counts, tau: float = 1.0,
            variant: BiasVariant = "eq10", test_prior: Counts | None = None) -> Tensor:
    """Bal-BCE: BCE on z + tau * B with B from `bal_bce_bias` (Algorithm 1). Predict with the raw logits z."""
    return bce_kernel(logits, targets, **_bal_bce_tables(class_counts, tau, variant, test_prior))


def gbl(logits: Tensor, targets: Tensor, class_counts: Counts, progress: float, s: float = 1.0,
        c: float = 2.0) -> Tensor:
    """GLAG's Gradual Balanced Loss (Eq. 4): CE on z + alpha(progress) * log pi, alpha from `gbl_alpha`.
    With s = 1, c = 2 it moves from CE (progress 0) to Bal-CE (progress 1). Predict with z."""
    return _gbl_kernel(logits, targets, progress, **_log_prior_tables(class_counts, s=s, c=c), s=s, c=c)


def lade(logits: Tensor, targets: Tensor, class_counts: Counts, alpha: float = 0.1, lam: float = 0.1) -> Tensor:
    """LADE (Hong et al., CVPR 2021): PC-softmax CE on z + log pi plus alpha times the LADER regulariser
    -sum_y pi_y [mean_{i: y_i = y} z_iy - log mean_i e^{z_iy - log pi_y - log C} - lam (log mean_i ...)^2]
    over all C classes, as the official code (hyperconnect/LADE): a class absent from the batch has first
    term 0 but its partition and lambda terms count (soft targets: memberships weighted by t_iy). The
    partition term's shift to balanced logits follows the official code. Predict with z (uniform test
    prior)."""
    return _lade_kernel(logits, targets, **_log_prior_tables(class_counts, alpha=alpha, lam=lam),
                        alpha=alpha, lam=lam)
