"""CNN backbones of the long-tailed baselines: ResNet-32 for 32 px images, timm's ResNet-50 / ResNeXt-50
for the large sets. All three train from random initialisation and follow the timm protocol the rest of
livt relies on (`forward_features`, `forward_head(x, pre_logits)`, `get_classifier()` -> `fc`,
`num_features`, `num_classes`).

ResNet-32 (He et al., CVPR 2016, Sec. 4.2; the CIFAR network of LDAM-DRW, BBN, RIDE, MiSLAS): a 3x3 conv
with 16 channels, three stages of five BasicBlocks at 16 / 32 / 64 channels (strides 1, 2, 2), global
average pooling and a linear classifier; 464,154 parameters at 10 classes. Shortcuts are "option A":
identity, and where the shape changes, the input subsampled by 2 and zero-padded to the new width, so
the shortcuts have no parameters. The new channels are appended after the old ones; the public CIFAR
code pads on both sides instead, which only permutes the block's output channels (the same network).
"""

from __future__ import annotations

import timm
import torch.nn.functional as F
from torch import Tensor, nn


class ShortcutA(nn.Module):
    """Parameter-free shortcut: x[:, :, ::stride, ::stride], zero-padded from C_in to C_out channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]  # (B, C_in, H / s, W / s)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))  # (B, C_out, H / s, W / s)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ReLU after the first and after the residual sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        same = stride == 1 and in_channels == out_channels
        self.shortcut = nn.Identity() if same else ShortcutA(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """The CIFAR ResNet of depth 6n + 2 (n blocks per stage); `depth=32` is ResNet-32."""

    def __init__(self, num_classes: int, depth: int = 32, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, widths[-1]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(in_channels if j == 0 else width, width, 2 if (i and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            # Kaiming-normal (fan-in, ReLU gain) on convs and the classifier, as the CIFAR-LT code;
            # the classifier's bias keeps PyTorch's default, BN starts at weight 1, bias 0
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """timm's protocol: a new linear classifier, or Identity for num_classes 0 (pooled features out)."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """timm-style layer groups (stem, the three stages, the classifier) for layer-wise lr decay."""
        return {"stem": r"^conv1|^bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        return self.layer3(self.layer2(self.layer1(x)))  # (B, 64, H / 4, W / 4)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))  # (B, 64)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet32(num_classes: int, drop_path_rate: float, **widths) -> nn.Module:
    if drop_path_rate:
        raise ValueError(f"model.drop_path_rate: resnet32 has no stochastic depth, got {drop_path_rate}; use 0")
    return ResNetCifar(num_classes, depth=32, **widths)


def _timm(name: str):
    def build(num_classes: int, drop_path_rate: float, **channels) -> nn.Module:
        # pretrained=False: timm builds the architecture with its own random init and downloads nothing
        return timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate,
                                 **channels)
    return build


# name -> builder(num_classes, drop_path_rate, **widths): `widths` (resnet32) / `channels` (timm) are the
# stage widths SADE's experts reduce (livt.models.sade.EXPERT_WIDTHS)
CNNS = {
    "resnet32": _resnet32,
    "resnet50": _timm("resnet50"),
    "resnext50_32x4d": _timm("resnext50_32x4d"),
}


def create_cnn(name: str, img_size: int, num_classes: int, drop_path_rate: float = 0.0, **widths) -> nn.Module:
    """A CNN classifier from random weights. `img_size` is only recorded (`model.img_size`, for the
    hand-off metadata): the networks are fully convolutional up to the global pool."""
    if name not in CNNS:
        raise ValueError(f"unknown CNN '{name}'; choose one of {', '.join(CNNS)}")
    if num_classes < 1:
        raise ValueError(f"a CNN classifier needs num_classes >= 1, got {num_classes}")
    model = CNNS[name](num_classes, drop_path_rate, **widths)
    model.img_size = img_size
    model.cnn_name = name
    return model


def is_cnn(model_or_name: nn.Module | str) -> bool:
    """Whether a backbone name, or a model, is one of `CNNS`."""
    if isinstance(model_or_name, str):
        return model_or_name in CNNS
    return getattr(model_or_name, "cnn_name", None) in CNNS
