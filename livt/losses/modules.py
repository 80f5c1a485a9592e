"""Losses of the module-improvement methods (survey Sec. 3.3): ResLT's branch losses and SADE's expert
losses. Pure functions in the `livt.losses` convention (parameters without a default are inputs, here
model outputs named `branch_logits` / `expert_logits`; with a default, options), registered in
`livt.losses.LOSSES`. Computed in float32 (float64 stays float64) outside autocast, as the other losses.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import Counts, prior64


def _labels(targets: Tensor) -> Tensor:
    """Hard labels (B,): soft (mixup / smoothed) targets count as their largest-mass class."""
    return targets.argmax(-1) if targets.is_floating_point() else targets


def _wide(x: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck, the float32 property test); anything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _targets(targets: Tensor, dtype: torch.dtype) -> Tensor:
    return targets.to(dtype) if targets.is_floating_point() else targets.long()


ResltGroups = Literal["rank", "log_count"]
RESLT_GROUPS = get_args(ResltGroups)


def reslt_groups(class_counts: Counts, groups: ResltGroups = "rank",
                 split: tuple[float, float] = (0.35, 0.35)) -> Tensor:
    """Group of each class (C,) int64: 0 head, 1 medium, 2 tail. Branch k learns the classes of group >= k:
    all, medium + tail, tail (ResLT Sec. 3.1-3.2).

    - 'rank' (default, the official code): fixed slices of the classes sorted by count, largest first
      (ties in class order): the first round(split[0] C) are head, the next round(split[1] C) medium, the
      rest tail. The official slices are 2 / 2 / 6 classes on CIFAR-10-LT (split 0.2, 0.2), 35 / 35 / 30 on
      CIFAR-100-LT (0.35, 0.35, the default), 175 / 605 / 220 on ImageNet-LT (0.175, 0.605), and on
      iNaturalist 2018 1542 head classes and no tail group (two branches).
    - 'log_count' (the paper's reading, "groups of equal imbalance factor"): the log-count range
      [log n_min, log n_max] cut into three equal parts, so each group spans the imbalance factor
      (n_max / n_min)^(1/3) (to the granularity of the classes: CIFAR-10-LT x100 gives 3 / 3 / 4 classes
      with imbalance factors 2.8 / 2.8 / 4.6); `split` is not used.
    """
    if groups not in RESLT_GROUPS:
        raise ValueError(f"unknown reslt groups '{groups}'; choose one of {', '.join(RESLT_GROUPS)}")
    log_n = torch.log(prior64(class_counts))  # log n_c - log N: the same cuts
    if groups == "rank":
        head, medium = (float(f) for f in split)
        if not (0 <= head and 0 <= medium and head + medium <= 1):
            raise ValueError(f"reslt split (head, medium) must be fractions of the classes >= 0 summing to "
                             f"<= 1, got {tuple(split)}")
        num_classes = len(log_n)
        bounds = torch.tensor([round(head * num_classes), round(head * num_classes) + round(medium * num_classes)])
        order = torch.argsort(-log_n, stable=True)  # classes by count, largest first
        group = torch.empty(num_classes, dtype=torch.long)
        group[order] = torch.bucketize(torch.arange(num_classes), bounds, right=True).clamp(max=2)
        return group
    span = (log_n.max() - log_n.min()).item()
    if span == 0:
        raise ValueError("ResLT: every class has the same training count, so there is no head / medium / "
                         "tail split of equal imbalance factor (an imbalanced training set is needed)")
    # - 1e-9: a class exactly on a cut (up to float rounding) stays in the group of larger counts
    third = ((log_n.max() - log_n) / span * 3 - 1e-9).floor().clamp(0, 2)
    return third.long()


def _reslt_tables(class_counts: Counts, alpha: float = 0.995, groups: ResltGroups = "rank",
                  split: tuple[float, float] = (0.35, 0.35)) -> dict[str, Tensor]:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"reslt alpha must lie in [0, 1], got {alpha}")
    return {"group": reslt_groups(class_counts, groups, split)}


def _reslt_kernel(logits: Tensor, branch_logits: Tensor, targets: Tensor, group: Tensor,
                  alpha: float = 0.995) -> Tensor:
    if branch_logits.dim() != 3 or branch_logits.shape[1:] != logits.shape:
        raise ValueError(f"branch_logits must be (branches, B, C) matching logits {tuple(logits.shape)}, "
                         f"got {tuple(branch_logits.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        dtype = _wide(logits)
        t = _targets(targets, dtype)
        sample_group = group.to(logits.device)[_labels(targets)]  # (B,)
        fused = F.cross_entropy(logits.to(dtype), t)
        summed = logits.new_zeros((), dtype=dtype)
        members = logits.new_zeros((), dtype=dtype)
        for k, z in enumerate(branch_logits.to(dtype)):
            member = (sample_group >= k).to(dtype)  # (B,): the sample subset of branch k, no host sync
            summed = summed + (F.cross_entropy(z, t, reduction="none") * member).sum()
            members = members + member.sum()
        # one pooled mean over every (branch, sample) pair, as the official code; >= B (branch 0 has all)
        return (1.0 - alpha) * fused + alpha * summed / members


def reslt(logits: Tensor, branch_logits: Tensor, targets: Tensor, class_counts: Counts,
          alpha: float = 0.995, groups: ResltGroups = "rank", split: tuple[float, float] = (0.35, 0.35)) -> Tensor:
    """ResLT (official code, jiequancui/ResLT): (1 - alpha) CE(fused logits) + alpha * the branch loss,
    sum_k sum_{i in S_k} CE(branch k's logits over all classes)_i / sum_k |S_k|, S_k the batch's samples
    whose class is in branch k's group (`reslt_groups`): ONE mean over the pooled (branch, sample) pairs,
    not one mean per branch. `logits` (B, C) is the fused sum, `branch_logits` (3, B, C)."""
    return _reslt_kernel(logits, branch_logits, targets, **_reslt_tables(class_counts, alpha, groups, split),
                         alpha=alpha)


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
        dtype = _wide(expert_logits)
        t = _targets(targets, dtype)
        log_pi, log_inv = log_pi.to(expert_logits.device, dtype), log_inv.to(expert_logits.device, dtype)
        v = expert_logits.to(dtype)
        return (F.cross_entropy(v[0], t) + F.cross_entropy(v[1] + log_pi, t)
                + F.cross_entropy(v[2] + log_pi - lam * log_inv, t))


def sade(expert_logits: Tensor, targets: Tensor, class_counts: Counts, lam: float = 2.0) -> Tensor:
    """SADE's expertise-guided losses, summed: forward expert CE(v1), uniform expert CE(v2 + log pi)
    (Bal-CE), backward expert CE(v3 + log pi - lam * log pi_inv), `expert_logits` (3, B, C)."""
    return _sade_kernel(expert_logits, targets, **_sade_tables(class_counts, lam), lam=lam)
