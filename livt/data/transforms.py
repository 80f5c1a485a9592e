"""Image transforms of the two stages and of evaluation (PIL image -> normalised (3, H, W) tensor).

Their randomness comes from python `random` (timm) and torch's CPU generator (torchvision, random
erasing); `livt.data.loading.Augmented` seeds both per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

PRETRAIN_SCALE = (0.2, 1.0)  # MGP's RandomResizedCrop area range (the MAE recipe)


def pretrain_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """MGP: RandomResizedCrop (scale 0.2-1, bicubic) + horizontal flip + normalise."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=PRETRAIN_SCALE, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                       rand_augment: str = "rand-m9-mstd0.5-inc1", reprob: float = 0.25,
                       color_jitter: float = 0.0, crop_scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """BFT: timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing in pixel mode).

    `rand_augment` '' turns RandAugment off; colour jitter applies only then (timm skips it otherwise).
    """
    transform = create_transform(
        input_size=img_size, is_training=True, scale=tuple(crop_scale), auto_augment=rand_augment or None,
        color_jitter=color_jitter or None, interpolation="bicubic", re_prob=reprob, re_mode="pixel",
        re_count=1, mean=tuple(mean), std=tuple(std))
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that keeps 0 bits as a black image.

    timm's PosterizeIncreasing asks for 0 bits at magnitude 10, which m9 + mstd 0.5 reaches in ~2% of
    draws; Pillow >= 11 refuses 0 bits, where older Pillow (and the recipe's runs) returned black.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop: float = 0.875) -> Callable:
    """Resize the short side to img_size / crop (bicubic), centre-crop img_size, normalise.

    `crop` is the per-dataset `data.eval_crop`: 0.875 for the large sets, 1.0 (full frame) for CIFAR-sized
    images, where an image already of img_size passes through unresampled.
    """
    if not 0.0 < crop <= 1.0:
        raise ValueError(f"data.eval_crop must lie in (0, 1], got {crop}")
    return T.Compose([
        T.Resize(int(img_size / crop), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo Normalize on (..., 3, H, W), for figures."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return x * s + m
