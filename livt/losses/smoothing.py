"""Label-aware smoothing (MiSLAS, Zhong et al., CVPR 2021): the loss of MiSLAS's second stage.

CE against eps_y / K on every class and 1 - eps_y more on the true class y ('code', the official
code's; 'paper': 1 - eps_y on y and eps_y / (K - 1) on each other class), with eps_y = f(n_y) from
`las_epsilons` (the official code's shape: concave): `head` for the largest class, `tail` for the
smallest. A soft target t (mixup) gets sum_c t_c * (the smoothed target of
c), so add no other smoothing (loss.label_smoothing 0).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from livt.losses.core import Counts, float32, prior64

LasShape = Literal["concave", "linear", "convex"]
LasSpread = Literal["code", "paper"]
LAS_SHAPES, LAS_SPREADS = get_args(LasShape), get_args(LasSpread)


def las_epsilons(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: LasShape = "concave") -> Tensor:
    """Per-class smoothing eps_y = f(n_y), (C,) float32: in between `tail` and `head` by
    x = (n_y - n_min) / (n_max - n_min): linear tail + (head - tail) x, concave tail + (head - tail)
    sin(pi x / 2), convex head - (head - tail) cos(pi x / 2). Equal counts give every class `head`."""
    if shape not in LAS_SHAPES:
        raise ValueError(f"unknown label-aware smoothing shape '{shape}'; choose one of {', '.join(LAS_SHAPES)}")
    for name, eps in (("head", head), ("tail", tail)):
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"label-aware smoothing {name} must be in [0, 1), got {eps}")
    n = prior64(class_counts)  # proportional to the counts; validates them
    span = n.max() - n.min()
    x = (n - n.min()) / span if span > 0 else torch.ones_like(n)
    f = {"linear": x, "concave": torch.sin(math.pi * x / 2), "convex": 1 - torch.cos(math.pi * x / 2)}[shape]
    return (tail + (head - tail) * f).float()


def las_off_target(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: LasShape = "concave",
                   spread: LasSpread = "code") -> Tensor:
    """(C,) float32: the target mass put on each other class for a sample of class y, eps_y / (K - 1)
    ('paper') or eps_y / K ('code'); the true class gets the rest, 1 - (K - 1) * that."""
    if spread not in LAS_SPREADS:
        raise ValueError(f"unknown label-aware smoothing spread '{spread}'; choose one of {', '.join(LAS_SPREADS)}")
    eps = las_epsilons(class_counts, head, tail, shape)
    return eps / (len(eps) - 1) if spread == "paper" else eps / len(eps)


def _las_tables(class_counts: Counts, head: float = 0.3, tail: float = 0.0, shape: LasShape = "concave",
                spread: LasSpread = "code") -> dict[str, Tensor]:
    return {"off_target": las_off_target(class_counts, head, tail, shape, spread)}


@float32
def _las_kernel(logits: Tensor, targets: Tensor, off_target: Tensor) -> Tensor:
    num_classes = logits.shape[1]
    off = off_target[:, None].expand(-1, num_classes)  # (C, C): row y is the smoothed target of class y
    rows = off.diagonal_scatter(1.0 - (num_classes - 1) * off_target)
    t = targets @ rows if targets.is_floating_point() else rows[targets]  # soft: the mixture of the rows
    return F.cross_entropy(logits, t)


def label_aware_smoothing(logits: Tensor, targets: Tensor, class_counts: Counts, head: float = 0.3,
                          tail: float = 0.0, shape: LasShape = "concave", spread: LasSpread = "code") -> Tensor:
    """MiSLAS label-aware smoothing (module docstring), batch mean."""
    return _las_kernel(logits, targets, **_las_tables(class_counts, head, tail, shape, spread))
