"""Classifier heads: one plain dict `HEADS` of named variants, each mapping pooled features to logits.

A head is an `nn.Module` with `forward(features (B, D)) -> logits (B, C)` (what prediction, export and
evaluation use) and, when a loss needs more than the logits, `outputs(features) -> dict` with `logits`
and the extras (e.g. the cosine head's `cosine`). `livt.models.outputs` collects them.

    linear   nn.Linear (the backbone's own init; timm keys)
    cosine   logits = s * cos(w_c, x): the normalised classifier of LDAM (Cao et al., NeurIPS 2019);
             `cosine` = cos(w_c, x) is what margin losses subtract their margins from
    ncm      logits = -s/2 * ||u - c_k||^2 with u = (x - m) / ||x - m||: nearest class mean of centred,
             L2-normalised features (Kang et al.'s `cl2n` + `l2`); m and the centroids c_k come from
             `livt.stages.ncm`. s/2 makes s mean what it means for the cosine head: ||u - c||^2 =
             1 + ||c||^2 - 2 u.c, so the logits are s u.c up to a per-class offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineHead(nn.Module):
    """s * cos(w_c, x) for every class c; no bias. Weights uniform(-1/sqrt(D), 1/sqrt(D))."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be > 0, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def outputs(self, features: Tensor) -> dict[str, Tensor]:
        cosine = F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).t()  # (B, C)
        return {"logits": self.scale * cosine, "cosine": cosine}

    def forward(self, features: Tensor) -> Tensor:
        return self.outputs(features)["logits"]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class NCMHead(nn.Module):
    """-s/2 * squared Euclidean distance of the centred, L2-normalised feature to each class centroid."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"ncm head scale must be > 0, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features))  # (C, D) centroids c_k
        self.register_buffer("mean", torch.zeros(in_features))  # (D,) training-feature mean m

    def forward(self, features: Tensor) -> Tensor:
        u = F.normalize(features - self.mean, dim=-1)  # (B, D)
        dist = (u * u).sum(-1, keepdim=True) + (self.weight * self.weight).sum(-1) - 2 * u @ self.weight.t()
        return -0.5 * self.scale * dist  # (B, C)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


def linear_head(in_features: int, num_classes: int, scale: float = 30.0) -> nn.Linear:
    return nn.Linear(in_features, num_classes)


HEADS: dict[str, Callable[..., nn.Module]] = {
    "linear": linear_head,
    "cosine": CosineHead,
    "ncm": NCMHead,
}


def head_name(head: nn.Module) -> str:
    """The HEADS name of a head module."""
    if isinstance(head, CosineHead):
        return "cosine"
    if isinstance(head, NCMHead):
        return "ncm"
    if isinstance(head, nn.Linear):
        return "linear"
    raise TypeError(f"no HEADS entry for {type(head).__name__}")


def build_head(name: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    if name not in HEADS:
        raise ValueError(f"unknown head '{name}'; choose one of {', '.join(HEADS)}")
    return HEADS[name](in_features, num_classes, scale)
