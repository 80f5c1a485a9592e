"""Image transforms of the two stages and of evaluation (PIL image -> normalised (3, H, W) tensor).

Their randomness comes from python `random` (timm) and torch's CPU generator (torchvision, random
erasing); `livt.data.loading.Augmented` seeds both per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

EVAL_CROP_PCT = 0.875


def pretrain_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """MGP: RandomResizedCrop (scale 0.2-1, bicubic) + horizontal flip + normalise."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                       rand_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       color_jitter: float = 0.0) -> Callable:
    """BFT: timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing in pixel mode).

    `rand_augment` '' turns RandAugment off; colour jitter applies only then (timm skips it otherwise).
    """
    return create_transform(
        input_size=img_size, is_training=True, auto_augment=rand_augment or None,
        color_jitter=color_jitter or None, interpolation="bicubic", re_prob=reprob, re_mode="pixel",
        re_count=1, mean=tuple(mean), std=tuple(std))


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize the short side to img_size / 0.875 (bicubic), centre-crop img_size, normalise."""
    return T.Compose([
        T.Resize(int(img_size / EVAL_CROP_PCT), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize on (..., 3, H, W), for figures."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return x * s + m
