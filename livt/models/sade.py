"""SADE's multi-expert model (Zhang et al., Self-Supervised Aggregation of Diverse Experts for Test-Agnostic
Long-Tailed Recognition, NeurIPS 2022): three experts over shared early layers.

`forward_outputs(x)` -> {logits: the equal-weight mean of the experts' logits (B, C), expert_logits
(3, B, C) in the order forward (head) expert, uniform expert, backward (tail) expert}; which expert is
which is set by the loss (`livt.losses.modules.sade`), test-time weights by `livt.aggregate`.

Where a backbone splits is one entry of `SPLITS` per backbone family, `split(backbone) -> (shared,
expert)`, both modules taken from one built backbone; each expert comes from its own independently
initialised backbone (whose shared part is dropped), as separately initialised experts are. Every
expert ends in a normalised linear classifier, 30 cos(w_c, x) (`CosineHead`), as in all official configs.
The CNN splits and widths are the official code's (Vanint/SADE-AgnosticLT, `expert_resnet_cifar.py`,
`Expert_ResNet.py`, `Expert_ResNeXt.py` with `reduce_dimension: true`, commit cba11b8):
- resnet32 (livt's CIFAR ResNet-32): shared = stem and the first stage; expert = the second and third
  stages at 24 / 48 channels (not 32 / 64), pooling, head.
- resnet (timm ResNet-50 / ResNeXt-50): shared = stem, layer1, layer2; expert = layer3 and layer4 at
  192 / 384 base channels (not 256 / 512), pooling, head.
- vit (no official ViT SADE; livt's choice): shared = patch embedding, position embedding and the first
  depth - depth // 3 blocks (at least one block per expert: vit_micro 3 + 1, ViT-B 8 + 4); expert = the
  remaining blocks at full width, fc_norm, pooling and head. Full width, so that each expert's blocks can
  start from the corresponding blocks of an MGP encoder (`load_vit`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer, global_pool_nlc
from torch import Tensor, nn

from livt.models.adapter import Adapter, forward_features
from livt.models.cnn import ResNetCifar
from livt.models.composite import Composite, backbone_groups
from livt.models.heads import CosineHead

NUM_EXPERTS = 3
EXPERT_SCALE = 30.0  # the official experts' logit scale s
# backbone family -> the build arguments of the experts' reduced widths (official `reduce_dimension`)
EXPERT_WIDTHS: dict[str, dict] = {
    "resnet32": {"widths": (16, 24, 48)},
    "resnet": {"channels": (64, 128, 192, 384)},
}


class ViTExpert(nn.Module):
    """The last blocks, final norm, pooling, fc_norm and head of a ViT: tokens (B, 1 + L, D) -> (B, C)."""

    def __init__(self, vit: VisionTransformer, first_block: int) -> None:
        super().__init__()
        self.blocks, self.norm, self.fc_norm = vit.blocks[first_block:], vit.norm, vit.fc_norm
        self.head_drop = vit.head_drop
        self.head = CosineHead(vit.num_features, vit.num_classes, EXPERT_SCALE)
        self.pool_type, self.num_prefix_tokens = vit.global_pool, vit.num_prefix_tokens

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.blocks(x))
        x = global_pool_nlc(x, pool_type=self.pool_type, num_prefix_tokens=self.num_prefix_tokens)  # (B, D)
        return self.head(self.head_drop(self.fc_norm(x)))


def shared_depth(depth: int) -> int:
    """ViT blocks before the experts: all but the last third (at least one block per expert)."""
    return depth - max(1, depth // 3)


def split_vit(vit: VisionTransformer) -> tuple[nn.Module, nn.Module]:
    k = shared_depth(len(vit.blocks))
    expert = ViTExpert(vit, k)
    vit.blocks, vit.norm, vit.fc_norm = vit.blocks[:k], nn.Identity(), nn.Identity()
    vit.reset_classifier(0)
    return Adapter(vit, forward_features), expert


def split_resnet(net: ResNet) -> tuple[nn.Module, nn.Module]:
    """timm ResNet: shared = stem, layer1, layer2; expert = layer3, layer4, pooling, head."""
    shared = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool, net.layer1, net.layer2)
    head = CosineHead(net.num_features, net.num_classes, EXPERT_SCALE)
    return shared, nn.Sequential(net.layer3, net.layer4, net.global_pool, head)  # pooling flattens to (B, D)


def split_resnet32(net: ResNetCifar) -> tuple[nn.Module, nn.Module]:
    """ResNet-32: shared = stem and the first stage; expert = the second and third stages, pooling, head."""
    shared = nn.Sequential(net.conv1, net.bn1, nn.ReLU(), net.layer1)
    head = CosineHead(net.num_features, net.num_classes, EXPERT_SCALE)
    return shared, nn.Sequential(net.layer2, net.layer3, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head)


# backbone family -> split(backbone) -> (shared, expert)
SPLITS: dict[str, Callable[[nn.Module], tuple[nn.Module, nn.Module]]] = {
    "vit": split_vit,
    "resnet": split_resnet,
    "resnet32": split_resnet32,
}
_FAMILIES = ((VisionTransformer, "vit"), (ResNet, "resnet"), (ResNetCifar, "resnet32"))


def family(backbone: nn.Module) -> str:
    for cls, name in _FAMILIES:
        if isinstance(backbone, cls):
            return name
    raise ValueError(f"SADE: no split for a {type(backbone).__name__} backbone; livt.models.sade.SPLITS "
                     f"knows {', '.join(SPLITS)}")


class SADEClassifier(Composite):
    """Shared layers and three experts; `forward(x)` -> the mean of the experts' logits (B, C)."""

    def __init__(self, build: Callable[..., nn.Module]) -> None:
        super().__init__()
        backbones = [build()]
        kind = family(backbones[0])
        if kind in EXPERT_WIDTHS:  # the experts' reduced widths; the shared stages keep theirs
            backbones = [build(**EXPERT_WIDTHS[kind]) for _ in range(NUM_EXPERTS)]
        else:
            backbones += [build() for _ in range(NUM_EXPERTS - 1)]
        groups = backbone_groups(backbones)
        split = SPLITS[kind]
        self.num_classes, self.num_features = backbones[0].num_classes, backbones[0].num_features
        parts = [split(b) for b in backbones]
        self.shared = parts[0][0]
        self.experts = nn.ModuleList(expert for _, expert in parts)
        self.carry_groups(groups)

    def forward_outputs(self, x: Tensor) -> dict[str, Tensor]:
        h = self.shared(x)
        expert_logits = torch.stack([expert(h) for expert in self.experts])  # (3, B, C)
        return {"logits": expert_logits.mean(0), "expert_logits": expert_logits}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_outputs(x)["logits"]

    def load_vit(self, vit: VisionTransformer) -> None:
        """Weights of a plain ViT of the same size (an MGP encoder loaded by `livt.checkpoint.load_encoder`):
        the shared layers take its embeddings and first blocks, every expert a copy of its remaining
        blocks; fc_norm and the experts' heads stay as built."""
        if not isinstance(self.shared, Adapter):
            raise TypeError(f"SADE.load_vit: the experts are not ViT blocks but {type(self.experts[0]).__name__}")
        state = vit.state_dict()
        shared = self.shared.model
        shared.load_state_dict({name: state[name] for name in shared.state_dict()})
        k = len(shared.blocks)
        for expert in self.experts:
            for j, block in enumerate(expert.blocks):
                block.load_state_dict(vit.blocks[k + j].state_dict())
