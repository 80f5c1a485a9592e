"""Image transforms of the two stages and of evaluation (PIL image -> normalised (3, H, W) tensor).

Their randomness comes from python `random` (timm) and torch's CPU generator (torchvision, random
erasing); `livt.data.loading.Augmented` seeds both per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CROPS = ("rrc", "pad")
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
                       color_jitter: float = 0.0, crop_scale: tuple[float, float] = (0.08, 1.0),
                       crop: str = "rrc", pad: int = 4) -> Callable:
    """The fine-tuning training transform: a crop, horizontal flip, RandAugment, normalise, random erasing
    (pixel mode).

    crop 'rrc' (BFT, the large sets): timm's transform with RandomResizedCrop over `crop_scale`. crop 'pad'
    (the CIFAR recipe of the CNN baselines): resize the short side to img_size (a no-op on 32 px images at
    img_size 32), pad `pad` zero pixels on every side and take a random img_size crop. `rand_augment` ''
    turns RandAugment off, reprob 0 erasing; colour jitter applies only without RandAugment (as timm).
    """
    if crop not in CROPS:
        raise ValueError(f"aug.crop: expected one of {', '.join(CROPS)}, got '{crop}'")
    if crop == "rrc":
        transform = create_transform(
            input_size=img_size, is_training=True, scale=tuple(crop_scale), auto_augment=rand_augment or None,
            color_jitter=color_jitter or None, interpolation="bicubic", re_prob=reprob, re_mode="pixel",
            re_count=1, mean=tuple(mean), std=tuple(std))
    else:
        transform = _pad_crop_transform(img_size, mean, std, rand_augment, reprob, color_jitter, pad)
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return transform


def _pad_crop_transform(img_size: int, mean: Sequence[float], std: Sequence[float], rand_augment: str,
                        reprob: float, color_jitter: float, pad: int) -> T.Compose:
    """Pad-and-crop + flip, then the optional parts in timm's order and with timm's settings."""
    if pad < 0:
        raise ValueError(f"aug.pad must be >= 0, got {pad}")
    steps: list[Callable] = [
        T.Resize(img_size, interpolation=InterpolationMode.BICUBIC),
        T.RandomCrop(img_size, padding=pad),
        T.RandomHorizontalFlip(),
    ]
    if rand_augment:
        steps.append(rand_augment_transform(rand_augment, dict(
            translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean),
            interpolation=Image.BICUBIC)))
    elif color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if reprob:
        steps.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(steps)


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
