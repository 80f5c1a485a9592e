"""Classifier heads: one plain dict `HEADS` of named variants, each mapping pooled features to logits.

A head is an `nn.Module` with `forward(features (B, D)) -> logits (B, C)` (what prediction, export and
evaluation use) and, when a loss needs more than the logits, `outputs(features) -> dict` with `logits`
and the extras (e.g. the cosine head's `cosine`). `livt.models.outputs` collects them.

    linear   nn.Linear (the backbone's own init; timm keys)
    cosine   logits = s * cos(w_c, x): the normalised classifier of LDAM (Cao et al., NeurIPS 2019);
             `cosine` = cos(w_c, x) is what margin losses subtract their margins from
    ncm      logits = -s * ||(x - m) / ||x - m|| - w_c||^2: the nearest class mean of Kang et al. (ICLR 2020)
             as their official code computes it (`cl2n` features, `l2` distance); m the training mean
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CosineHead(nn.Module):
    """s * cos(w_c, x) for every class c; no bias. Each class vector w_c starts uniform(-1, 1) scaled to unit
    norm, as the official LDAM-DRW normalised linear layer (its `renorm` to 1): the norm sets the head's
    effective learning rate under SGD with weight decay, since the cosine ignores it."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be > 0, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def outputs(self, features: Tensor) -> dict[str, Tensor]:
        cosine = F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).t()  # (B, C)
        return {"logits": self.scale * cosine, "cosine": cosine}

    def forward(self, features: Tensor) -> Tensor:
        return self.outputs(features)["logits"]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class NCMHead(nn.Module):
    """-s * squared Euclidean distance of the centred, L2-normalised feature (x - m) / ||x - m|| to each class
    centre w_c (C, D); `mean` m (D,). Set by `livt.stages.ncm` (w_c: the mean of the centred, normalised
    training features of class c; m: the mean training feature); s sets the confidence only (official: 1)."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 1.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"ncm head scale must be > 0, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, num_classes, float(scale)
        self.weight = nn.Parameter(torch.zeros(num_classes, in_features))
        self.mean = nn.Parameter(torch.zeros(in_features))

    def forward(self, features: Tensor) -> Tensor:
        unit = F.normalize(features - self.mean, dim=-1)
        dist = unit.pow(2).sum(-1, keepdim=True) + self.weight.pow(2).sum(-1) - 2 * unit @ self.weight.t()
        return -self.scale * dist  # (B, C)

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
