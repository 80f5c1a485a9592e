"""ResLT (Cui et al., Residual Learning for Long-tailed Recognition, TPAMI 2022): three feature branches
over one backbone feed ONE shared linear classifier; the prediction is the sum of the branches' logits.

Which classes each branch learns (all / medium + tail / tail) is the loss's business
(`livt.losses.modules.reslt`); the model only has three parameter-specialised branches:

- CNN (4-D `forward_features` map, (B, D, H, W)): the paper's single 1x1 convolution with 3 groups,
  fed the map three times so each branch sees all D channels (ResNet-32 has 64, not a multiple of 3),
  + BN + ReLU, then the backbone's own pooling.
- ViT (tokens, (B, 1 + L, D)): the backbone's own pooling and fc_norm, then a grouped linear (3 D x D
  blocks) + LayerNorm + GELU per branch: a 1x1 convolution on a map is a linear map per position, and a
  ViT has one pooled feature to apply it to, its norm and activation being the ViT's kinds.

The shared classifier is the backbone's own head (its initialisation, e.g. the ViT head's std 2e-5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from livt.models.composite import Composite, backbone_groups

NUM_BRANCHES = 3


class MapBranches(nn.Module):
    """(B, D, H, W) -> (3, B, D, H, W): one 1x1 convolution with 3 groups, BN, ReLU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(NUM_BRANCHES * dim, NUM_BRANCHES * dim, 1, groups=NUM_BRANCHES, bias=False)
        self.bn = nn.BatchNorm2d(NUM_BRANCHES * dim)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w = x.shape
        x = F.relu(self.bn(self.conv(x.repeat(1, NUM_BRANCHES, 1, 1))))  # (B, 3D, H, W)
        return x.view(b, NUM_BRANCHES, d, h, w).transpose(0, 1)  # (3, B, D, H, W)


class TokenBranches(nn.Module):
    """(B, D) pooled token -> (3, B, D): a grouped linear (one D x D block per branch), LayerNorm, GELU."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(NUM_BRANCHES, dim, dim))  # (3, D_out, D_in)
        self.bias = nn.Parameter(torch.zeros(NUM_BRANCHES, 1, dim))
        self.norm_weight = nn.Parameter(torch.ones(NUM_BRANCHES, 1, dim))
        self.norm_bias = nn.Parameter(torch.zeros(NUM_BRANCHES, 1, dim))
        for w in self.weight:
            nn.init.xavier_uniform_(w)  # the ViT's Linear init

    def forward(self, x: Tensor) -> Tensor:
        x = torch.einsum("kod,bd->kbo", self.weight, x) + self.bias  # (3, B, D)
        x = F.layer_norm(x, x.shape[-1:], eps=1e-6) * self.norm_weight + self.norm_bias
        return F.gelu(x)


class ResLTClassifier(Composite):
    """`forward(x)` -> fused logits (B, C); `forward_outputs(x)` -> {logits, branch_logits (3, B, C),
    features (B, D)}; `features` is the sum of the branch features, so logits = W features + 3 b."""

    def __init__(self, build: Callable[[], nn.Module]) -> None:
        super().__init__()
        backbone = build()
        groups = backbone_groups([backbone])
        self.num_classes, self.num_features = backbone.num_classes, backbone.num_features
        self.head = backbone.get_classifier()  # the shared classifier
        backbone.reset_classifier(0)  # the backbone's head becomes Identity; its pooling stays
        self.backbone = backbone
        self.tokens = isinstance(backbone, VisionTransformer)
        self.branches = (TokenBranches if self.tokens else MapBranches)(self.num_features)
        self.carry_groups(groups)

    def get_classifier(self) -> nn.Module:
        return self.head

    def branch_features(self, x: Tensor) -> Tensor:
        """(3, B, D) pooled features of the three branches."""
        x = self.backbone.forward_features(x)
        if self.tokens:  # (B, 1 + L, D)
            return self.branches(self.backbone.forward_head(x, pre_logits=True))
        x = self.branches(x)  # (3, B, D, H, W)
        pooled = self.backbone.forward_head(x.flatten(0, 1), pre_logits=True)  # (3B, D)
        return pooled.view(NUM_BRANCHES, -1, pooled.shape[-1])

    def forward_outputs(self, x: Tensor) -> dict[str, Tensor]:
        features = self.branch_features(x)  # (3, B, D)
        branch_logits = self.head(features)  # (3, B, C): one shared classifier
        return {"logits": branch_logits.sum(0), "branch_logits": branch_logits, "features": features.sum(0)}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_outputs(x)["logits"]
