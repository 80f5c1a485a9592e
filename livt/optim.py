"""Optimizers (AdamW, SGD), parameter groups (weight decay, layer-wise lr decay) and the lr schedule.

The learning rate is a pure function of the optimizer step: `lr_at(step, ...)`. It is written into
every parameter group before each step (times the group's `lr_scale`), so resuming needs only the
step count, never a scheduler state. Schedules: per-step linear warmup, then a half-cycle cosine
(the ViT recipes) or steps (the CNN recipes: x gamma at each milestone epoch, LDAM-DRW's 160 / 180).
"""

from __future__ import annotations

import math
import typing
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from livt.config import Optimizer, Schedule

OPTIMIZERS, SCHEDULES = typing.get_args(Optimizer), typing.get_args(Schedule)


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 decay_all: bool = False) -> list[dict]:
    """Groups with no decay on biases, norms and tokens; `lr_scale` from BEiT-style layer decay.

    With layer decay, ids are 0 for cls/pos/patch-embed, i + 1 for blocks.i and depth + 1 for
    everything after the blocks; scale = layer_decay ** (depth + 1 - id) (timm's grouping).
    `decay_all` puts every trainable parameter in one decayed group (the CNN recipes' plain SGD).
    """
    if decay_all:
        if layer_decay < 1.0:
            raise ValueError("optim.decay_all with optim.layer_decay < 1 is not supported; pick one")
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    else:
        no_decay = sorted(getattr(model, "no_weight_decay", lambda: set())())
        if layer_decay < 1.0:
            groups = param_groups_layer_decay(
                model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
        else:
            groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return split_by_lr_scale(groups, model)


def split_by_lr_scale(groups: list[dict], model: nn.Module) -> list[dict]:
    """Each group split by the lr factors of `model.lr_scales()` ({parameter name prefix: factor}, if any),
    which multiply the group's `lr_scale`."""
    prefixes = getattr(model, "lr_scales", dict)()
    if not prefixes:
        return groups
    factor = {id(p): f for name, p in model.named_parameters() for prefix, f in prefixes.items()
              if name.startswith(prefix)}
    out = []
    for g in groups:
        for f in sorted({factor.get(id(p), 1.0) for p in g["params"]}):
            params = [p for p in g["params"] if factor.get(id(p), 1.0) == f]
            out.append({**g, "params": params, "lr_scale": g["lr_scale"] * f})
    return out


def build_optimizer(model: nn.Module, optim: Any, lr: float) -> torch.optim.Optimizer:
    """The optimizer that `optim` (an OptimConfig) names, over `model`'s trainable parameters."""
    if optim.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optim.name}'; choose one of {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, optim.weight_decay, optim.layer_decay, optim.decay_all)
    groups = [g for g in groups if g["params"]]
    # fused kernels (CPU and CUDA): one launch per step, and they honour `optimizer.found_inf`, through
    # which livt.engine.Trainer skips a non-finite step on the device without waiting for the host
    if optim.name == "sgd":
        sgd = torch.optim.SGD(groups, lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, fused=True)
        if optim.momentum:
            # fused SGD fills the momentum buffers on its first step, which is left uninitialised when that
            # step is skipped; zero buffers give the same first update (0 * momentum + grad = grad, exactly)
            for p in (p for g in groups for p in g["params"]):
                sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return sgd
    return torch.optim.AdamW(groups, lr=lr, betas=optim.betas, fused=True)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0,
          schedule: str = "cosine", milestones: tuple[int, ...] = (), gamma: float = 0.1) -> float:
    """Per-step linear warmup from 0 to `peak_lr`, then a half-cycle cosine down to `min_lr`, or
    ('step') `peak_lr * gamma**k` after the k-th of `milestones` (optimizer steps)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "step":
        return peak_lr * gamma ** sum(step >= m for m in milestones)
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
