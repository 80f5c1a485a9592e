"""What a model assembled from parts of timm backbones needs from them: each parameter keeps the layer id
(layer-wise lr decay) and the no-weight-decay mark it had in its own backbone, under its new name.

ResLT (`livt.models.reslt`) and SADE (`livt.models.sade`) are such models. Parameters the assembly adds
(branches, a shared classifier) take the backbone's top layer id, with its head and final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from timm.models import group_parameters
from torch import nn


def backbone_groups(backbones: Iterable[nn.Module]) -> tuple[dict[int, int], set[int]]:
    """({id(parameter): layer id}, {id(parameter) without weight decay}) of whole backbones, read before
    they are taken apart (their `group_matcher` speaks of their own module names)."""
    layer_of, no_decay = {}, set()
    for backbone in backbones:
        ids = group_parameters(backbone, backbone.group_matcher(coarse=False), reverse=True)
        skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
        for name, p in backbone.named_parameters():
            layer_of[id(p)] = ids[name]
            if name in skip:
                no_decay.add(id(p))
    return layer_of, no_decay


class Composite(nn.Module):
    """Base of the assembled models: `group_matcher` and `no_weight_decay` under the new names."""

    def carry_groups(self, groups: tuple[dict[int, int], set[int]]) -> None:
        """Call at the end of `__init__` with `backbone_groups(...)` of the parts' backbones."""
        layer_of, no_decay = groups
        top = max(layer_of.values())
        params = dict(self.named_parameters())
        self._layer_ids = {n: layer_of.get(id(p), top) for n, p in params.items()}
        self._no_decay = {n for n, p in params.items() if id(p) in no_decay}

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        return lambda name: self._layer_ids[name]

    def no_weight_decay(self) -> set[str]:
        return set(self._no_decay)
