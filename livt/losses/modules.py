"""Losses of the module-improvement methods (survey Sec. 3.3): ResLT's branch losses and SADE's expert
losses. Pure functions in the `livt.losses` convention (parameters without a default are inputs, here
model outputs named `branch_logits` / `expert_logits`; with a default, options), registered in
`livt.losses.LOSSES`. Computed in float32 outside autocast, as the other losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import Counts, prior64


def _labels(targets: Tensor) -> Tensor:
    """Hard labels (B,): soft (mixup / smoothed) targets count as their largest-mass class."""
    return targets.argmax(-1) if targets.is_floating_point() else targets


def _targets(targets: Tensor) -> Tensor:
    return targets.float() if targets.is_floating_point() else targets.long()


def reslt_groups(class_counts: Counts) -> Tensor:
    """Group of each class (C,) int64: 0 head, 1 medium, 2 tail.

    The log-count range [log n_min, log n_max] is cut into three equal parts, so each group spans the
    same imbalance factor (n_max / n_min)^(1/3) (to the granularity of the classes: CIFAR-10-LT x100 gives
    3 / 3 / 4 classes with imbalance factors 2.8 / 2.8 / 4.6). Branch k learns the classes of group >= k:
    all, medium + tail, tail (ResLT Sec. 3.1-3.2). livt's shot thresholds are not used: they leave
    CIFAR-10-LT's tail empty.
    """
    log_n = torch.log(prior64(class_counts))  # log n_c - log N: the same cuts
    span = (log_n.max() - log_n.min()).item()
    if span == 0:
        raise ValueError("ResLT: every class has the same training count, so there is no head / medium / "
                         "tail split (an imbalanced training set is needed)")
    # - 1e-9: a class exactly on a cut (up to float rounding) stays in the group of larger counts
    third = ((log_n.max() - log_n) / span * 3 - 1e-9).floor().clamp(0, 2)
    return third.long()


def _reslt_tables(class_counts: Counts, alpha: float = 0.995) -> dict[str, Tensor]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"reslt alpha must lie in [0, 1], got {alpha}")
    return {"group": reslt_groups(class_counts)}


def _reslt_kernel(logits: Tensor, branch_logits: Tensor, targets: Tensor, group: Tensor,
                  alpha: float = 0.995) -> Tensor:
    if branch_logits.dim() != 3 or branch_logits.shape[1:] != logits.shape:
        raise ValueError(f"branch_logits must be (branches, B, C) matching logits {tuple(logits.shape)}, "
                         f"got {tuple(branch_logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        t = _targets(targets)
        sample_group = group.to(logits.device)[_labels(targets)]  # (B,)
        fused = F.cross_entropy(logits.float(), t)
        branch = logits.new_zeros((), dtype=torch.float32)
        for k, z in enumerate(branch_logits.float()):
            member = (sample_group >= k).float()  # (B,): the sample subset of branch k, no host sync
            per_sample = F.cross_entropy(z, t, reduction="none")  # (B,)
            branch = branch + (per_sample * member).sum() / member.sum().clamp(min=1.0)
        return (1.0 - alpha) * fused + alpha * branch


def reslt(logits: Tensor, branch_logits: Tensor, targets: Tensor, class_counts: Counts,
          alpha: float = 0.995) -> Tensor:
    """ResLT Eq. 3: (1 - alpha) CE(fused logits) + alpha * sum_k CE(branch k's logits over all classes),
    branch k's term the mean over the batch's samples whose class is in its group (`reslt_groups`), 0 when
    the batch has none. `logits` (B, C) is the fused sum, `branch_logits` (3, B, C)."""
    return _reslt_kernel(logits, branch_logits, targets, **_reslt_tables(class_counts, alpha), alpha=alpha)


def inverse_prior(class_counts: Counts) -> Tensor:
    """SADE's inverted training prior (C,) float32: the class with the r-th largest count gets the r-th
    smallest prior, by count rank, whatever the class order (ties keep the class order)."""
    pi = prior64(class_counts)
    order = torch.argsort(pi, descending=True, stable=True)  # classes by count, largest first
    inv = torch.empty_like(pi)
    inv[order] = torch.sort(pi).values  # r-th largest class <- r-th smallest prior
    return inv.float()


def _sade_tables(class_counts: Counts, lam: float = 2.0) -> dict[str, Tensor]:
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"sade lam must be a finite value >= 0, got {lam}")
    return {"log_pi": torch.log(prior64(class_counts)).float(), "log_inv": torch.log(inverse_prior(class_counts))}


def _sade_kernel(expert_logits: Tensor, targets: Tensor, log_pi: Tensor, log_inv: Tensor,
                 lam: float = 2.0) -> Tensor:
    if expert_logits.dim() != 3 or expert_logits.shape[0] != 3:
        raise ValueError(f"expert_logits must be (3, B, C), got {tuple(expert_logits.shape)}")
    with torch.autocast(device_type=expert_logits.device.type, enabled=False):
        t = _targets(targets)
        log_pi, log_inv = log_pi.to(expert_logits.device), log_inv.to(expert_logits.device)
        v = expert_logits.float()
        return (F.cross_entropy(v[0], t) + F.cross_entropy(v[1] + log_pi, t)
                + F.cross_entropy(v[2] + log_pi - lam * log_inv, t))


def sade(expert_logits: Tensor, targets: Tensor, class_counts: Counts, lam: float = 2.0) -> Tensor:
    """SADE's expertise-guided losses, summed: forward expert CE(v1), uniform expert CE(v2 + log pi)
    (Bal-CE), backward expert CE(v3 + log pi - lam * log pi_inv), `expert_logits` (3, B, C)."""
    return _sade_kernel(expert_logits, targets, **_sade_tables(class_counts, lam), lam=lam)


# per-class tables computed once by `livt.losses.Criterion` (the group of each class; log pi, log pi_inv)
TABLES = {"reslt": (_reslt_tables, _reslt_kernel), "sade": (_sade_tables, _sade_kernel)}
