"""Image transforms of the two stages and of evaluation (PIL image -> normalised (3, H, W) tensor), and
`TrainTransform`, which runs a stage's training transform faster (data.pipeline, data.uint8_batches).

Their randomness comes from python `random` (timm), numpy (timm's RandAugment) and torch's CPU generator
(torchvision, random erasing); `livt.data.loading.Augmented` seeds all three per sample.
"""

from __future__ import annotations

import copy
import math
import typing
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from livt.config import AugConfig, ConfigError, Crop, Pipeline
from livt.data.splits import EncodedImage, decode_rgb

CROPS = typing.get_args(Crop)
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


# ---------------------------------------------------------------------------------------------
# The fast pipeline

PIPELINES = typing.get_args(Pipeline)
DCT_SCALES = (8, 4, 2)  # the reduced JPEG scales libjpeg decodes at (1/8, 1/4, 1/2), largest first


def check_pipeline(name: str) -> None:
    if name not in PIPELINES:
        raise ConfigError(f"data.pipeline: expected one of {', '.join(PIPELINES)}, got '{name}'")


def draft_scale(h: int, w: int, size: int) -> int:
    """The largest JPEG DCT scale factor s (1, 2, 4 or 8) at which an h x w crop still has >= `size`
    pixels a side, so the crop is never upsampled where the full-scale crop was not."""
    return next((s for s in DCT_SCALES if min(h, w) >= size * s), 1)


def pixels(img: Image.Image) -> torch.Tensor:
    """An RGB image as uint8 (3, H, W) over (H, W, 3) memory: Pillow's pixels copied once (pil_to_tensor
    copies them twice)."""
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)


def decode_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, draft: bool = False,
                source: EncodedImage | None = None) -> torch.Tensor:
    """Crop `box` = (top, left, h, w), in the full image's pixels, of `image` resized to size x size (bicubic,
    antialiased: Pillow's kernel); uint8 (3, size, size). `image` is opened from the file `source` and not
    decoded yet (`EncodedImage.header`), or, without `source`, an image in memory.

    The image is decoded whole and the crop resampled by torch's uint8 bicubic kernel, which follows
    Pillow's (a = -0.5, the same antialiasing) to within one grey level and runs ~5x faster. With `draft`, a
    JPEG whose crop keeps >= size pixels a side at a reduced DCT scale (`draft_scale`) is decoded at that scale
    instead (Pillow's draft mode: the inverse DCT and colour conversion of 1/4, 1/16 or 1/64 of the pixels;
    the entropy decoding stays whole) and the box, mapped onto the reduced image (fractional), resampled by
    Pillow.
    """
    top, left, h, w = box
    scale = draft_scale(h, w, size) if draft and source is not None and image.format == "JPEG" else 1
    if scale > 1:
        width = image.width  # the full width: draft shrinks the image's size to the reduced one
        drafted = image.draft("RGB", (width // scale, image.height // scale))  # (mode, reduced box) or None
        s = width / drafted[1][2] if drafted else 1.0  # the scale Pillow chose: `scale`
        x0, y0, x1, y1 = left / s, top / s, (left + w) / s, (top + h) / s
        hull = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
        reduced = decode_rgb(image, source).crop(hull)  # crop first: the kernel stops at the box, as crop + resize
        return pixels(reduced.resize((size, size), Image.BICUBIC,
                                     box=(x0 - hull[0], y0 - hull[1], x1 - hull[0], y1 - hull[1])))
    if source is not None:
        image = decode_rgb(image, source)
    full = pixels(image if image.mode == "RGB" else image.convert("RGB"))
    # the crop copied channels-last takes torch's fast uint8 kernel, whose output stays (H, W, 3) in memory,
    # as Pillow and the collate want it
    crop = full[None, :, top:top + h, left:left + w].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


def _to_pil(x: torch.Tensor | Image.Image) -> Image.Image:
    return x if isinstance(x, Image.Image) else Image.fromarray(x.permute(1, 2, 0).numpy())


def _to_uint8(x: torch.Tensor | Image.Image) -> torch.Tensor:
    return pixels(x) if isinstance(x, Image.Image) else x


class TrainTransform:
    """A stage's training transform `reference` (what `pretrain_transform` / `finetune_transform` build), run
    as data.pipeline and data.uint8_batches ask, with the reference's own steps and random draws.

    `pipeline`: 'pil' runs the reference's steps as they are; 'fast' and 'draft' replace a leading
    RandomResizedCrop (bicubic) by `decode_crop`: the box is drawn by the reference crop's own `get_params`
    from the file's header (the full image's size), before anything is decoded, so the crops are the
    reference's, draw for draw; 'draft' also decodes JPEGs at a reduced DCT scale where the crop allows.
    The steps between the crop and ToTensor (flip, RandAugment, ...) run unchanged, on PIL images where
    they need them.

    `uint8`: return the uint8 image (3, H, W) and leave the normalisation to `finish_batch` on the device;
    random erasing, when the reference ends with it, becomes a 4th channel marking the erased pixels (the
    box drawn here, from the same python random draws as the reference's; the noise drawn on the device).
    Otherwise the reference's Normalize and RandomErasing run here, on the same draws as the reference.

    Its input is an image from `LTDataset.open`: an `EncodedImage` (a file not decoded yet) or a PIL image.
    """

    def __init__(self, reference: T.Compose, pipeline: str = "fast", uint8: bool = True) -> None:
        check_pipeline(pipeline)
        steps = list(getattr(reference, "transforms", ()))
        cut = next((i for i, t in enumerate(steps) if isinstance(t, (T.ToTensor, MaybeToTensor))), None)
        after = steps[cut + 1:] if cut is not None else []
        if (not after or not isinstance(after[0], T.Normalize) or len(after) > 2
                or (len(after) == 2 and not isinstance(after[1], RandomErasing))):
            raise ValueError(f"TrainTransform: expected a Compose of PIL steps, ToTensor, Normalize and optionally "
                             f"RandomErasing, got {reference}")
        self.crop = None
        if pipeline != "pil" and isinstance(steps[0], (T.RandomResizedCrop, RandomResizedCropAndInterpolation)):
            if steps[0].interpolation != InterpolationMode.BICUBIC or steps[0].size[0] != steps[0].size[1]:
                raise ValueError(f"data.pipeline {pipeline}: the crop must be square and bicubic, got {steps[0]}")
            self.crop = steps.pop(0)
            cut -= 1
        self.pil_steps, self.normalize = steps[:cut], after[0]
        self.erase = after[1] if len(after) == 2 else None
        self.pipeline, self.uint8 = pipeline, uint8
        self.mark = None
        if uint8 and self.erase is not None:  # the same python random draws, zeros written instead of noise
            self.mark = copy.copy(self.erase)
            self.mark.per_pixel = self.mark.rand_color = False

    def __call__(self, image: Image.Image | EncodedImage) -> torch.Tensor:
        source = image if isinstance(image, EncodedImage) else None
        img = source.header() if source is not None else image
        if self.crop is not None:
            box = self.crop.get_params(img, self.crop.scale, self.crop.ratio)  # (top, left, h, w) from the size
            x: torch.Tensor | Image.Image = decode_crop(img, box, self.crop.size[0], self.pipeline == "draft", source)
        else:
            x = decode_rgb(img, source) if source is not None else img
        for step in self.pil_steps:
            x = step(x if isinstance(step, T.RandomHorizontalFlip) else _to_pil(x))  # a flip takes either
        x = _to_uint8(x)  # (3, H, W)
        if not self.uint8:
            x = self.normalize(x.float().div(255))  # what ToTensor + Normalize compute
            return self.erase(x) if self.erase is not None else x
        if self.mark is None:
            return x
        keep = torch.ones(1, *x.shape[1:], dtype=torch.uint8)
        self.mark(keep)  # zeros where the reference erases
        return torch.cat([x, 1 - keep])  # (4, H, W)


def finish_batch(images: torch.Tensor, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> torch.Tensor:
    """uint8 images (B, 3 or 4, H, W) from `TrainTransform` (uint8) -> normalised float (B, 3, H, W), on
    their device.

    The arithmetic is ToTensor's and Normalize's, in their order (so the result is the worker's, bitwise, on
    the CPU). A 4th channel marks erased pixels: they get N(0, 1) noise drawn from `seed` on the device, what
    random erasing's pixel mode writes after normalising.
    """
    x = images[:, :3].float().div_(255)
    x = x.sub_(torch.tensor(mean, device=x.device).view(1, 3, 1, 1)).div_(
        torch.tensor(std, device=x.device).view(1, 3, 1, 1))
    if images.shape[1] == 4:
        generator = torch.Generator(x.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = torch.where(images[:, 3:] > 0, noise, x)
    return x


class TargetMaker:
    """Mixup / CutMix (timm) with label smoothing; hard labels become soft targets.

    timm's Mixup needs an even batch: with an odd one, the last sample is left unmixed (smoothed
    one-hot target only).
    """

    def __init__(self, aug: AugConfig, label_smoothing: float, num_classes: int) -> None:
        self.num_classes, self.smoothing = num_classes, label_smoothing
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, switch_prob=aug.switch_prob,
                               mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)

    def smooth(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        return torch.full((len(labels), self.num_classes), off, device=labels.device).scatter_(
            1, labels[:, None], 1.0 - self.smoothing + off)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixup is None and self.smoothing == 0:
            return images, labels  # hard labels (the CNN recipes; losses that refuse soft targets)
        if self.mixup is None:
            return images, self.smooth(labels)
        even = len(images) - len(images) % 2
        if even == 0:
            return images, self.smooth(labels)
        mixed, targets = self.mixup(images[:even].clone(), labels[:even])
        if even == len(images):
            return mixed, targets
        return (torch.cat([mixed, images[even:]]),
                torch.cat([targets, self.smooth(labels[even:])]))
