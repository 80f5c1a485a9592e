"""AdamW parameter groups (weight decay, layer-wise lr decay) and the lr schedule.

The learning rate is a pure function of the optimizer step: `lr_at(step, ...)`. It is written into
every parameter group before each step (times the group's `lr_scale`), so resuming needs only the
step count, never a scheduler state.
"""

from __future__ import annotations

import math

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Groups with no decay on biases, norms and tokens; `lr_scale` from BEiT-style layer decay.

    With layer decay, ids are 0 for cls/pos/patch-embed, i + 1 for blocks.i and depth + 1 for
    everything after the blocks; scale = layer_decay ** (depth + 1 - id) (timm's grouping).
    """
    no_decay = sorted(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay < 1.0:
        groups = param_groups_layer_decay(
            model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay)
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Per-step linear warmup from 0 to `peak_lr`, then half-cycle cosine down to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
