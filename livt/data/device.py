"""A training set held on the device (`data.on_device`): uint8 images there, augmented in batches there.

For datasets that fit in device memory (CIFAR-sized sets, ImageNet-LT packed at low resolution): no
DataLoader workers, no decode, no host-to-device copy of pixels per step. The ops are the crop and flip
of the CPU transforms (RandomResizedCrop over a scale range, or CIFAR's pad-and-crop) followed by the
normalisation; mixup / cutmix already act on the batch. Each sample's draws are a counter-based hash of
(seed, epoch, index), so a batch is the same whatever the process count and a resumed run draws what an
uninterrupted one does. The crop parameters follow torchvision's RandomResizedCrop exactly (ten tries,
then the centre crop with the ratio clamped); the resampling is bicubic through `grid_sample` (PyTorch's
cubic kernel, a = -0.75, where Pillow uses a = -0.5, and no antialiasing, which matters only for crops
larger than the output: never where the stored images are img_size, as for CIFAR).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from livt.config import AugConfig, ConfigError
from livt.data.errors import DataError
from livt.data.splits import ArrayDataset, LTDataset, SubsetDataset

RRC_TRIES = 10
STREAM = 0x5EED_DE71CE  # keeps these draws apart from any other hash of (seed, epoch, index)
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float64 uniforms in [0, 1), a function of (seed, epoch, index) alone."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(indices), seed, dtype=np.uint64) ^ np.uint64(STREAM))
        key = _mix(key ^ np.uint64(epoch))
        key = _mix(key ^ np.asarray(indices, dtype=np.uint64))  # (B,)
        bits = _mix(key[:, None] ^ np.arange(1, n + 1, dtype=np.uint64)[None, :])  # (B, n)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def rrc_boxes(u: np.ndarray, height: int, width: int, scale: Sequence[float],
              ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """RandomResizedCrop boxes (B, 4) = (top, left, h, w) from uniforms u (B, 2 * RRC_TRIES + 2), drawn as
    torchvision's `RandomResizedCrop.get_params` draws them."""
    area = height * width
    tries = u[:, : 2 * RRC_TRIES].reshape(-1, RRC_TRIES, 2)
    target = area * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * tries[..., 1]
    aspect = np.exp(log_r)
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)  # (B, tries)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(axis=1)
    rows = np.arange(len(u))
    h, w, found = h[rows, first], w[rows, first], ok.any(axis=1)
    # the fallback: the whole image, cropped to the nearest allowed ratio, centred
    in_ratio = width / height
    fw, fh = ((width, int(round(width / min(ratio)))) if in_ratio < min(ratio) else
              (int(round(height * max(ratio))), height) if in_ratio > max(ratio) else (width, height))
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, np.floor(u[:, -2] * (height - h + 1)), (height - h) // 2).astype(np.int64)
    left = np.where(found, np.floor(u[:, -1] * (width - w + 1)), (width - w) // 2).astype(np.int64)
    return np.stack([top, left, h, w], axis=1)


def pad_boxes(u: np.ndarray, height: int, width: int, size: int, pad: int) -> np.ndarray:
    """Pad-and-crop boxes (B, 4) in the unpadded image's coordinates (they may reach into the padding)."""
    if height != size or width != size:
        raise ConfigError(f"aug.crop pad: the stored images are {height}x{width}, not data.img_size {size}")
    top = np.floor(u[:, 0] * (2 * pad + 1)).astype(np.int64) - pad
    left = np.floor(u[:, 1] * (2 * pad + 1)).astype(np.int64) - pad
    return np.stack([top, left, np.full_like(top, size), np.full_like(top, size)], axis=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                  zero_outside: bool = False) -> torch.Tensor:
    """Crop boxes (B, 4) = (top, left, h, w) of uint8 images (B, 3, H, W), resize them to size x size
    (bicubic), mirror where `flip`; float (B, 3, size, size) in [0, 255]. Outside the image: the border
    pixels, or zeros with `zero_outside` (the pad crop's zero padding)."""
    B, _, H, W = images.shape
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    sx, sy = w / W, h / H  # the output's [-1, 1] spans the box; align_corners=False pixel centres
    tx, ty = (2 * left + w) / W - 1, (2 * top + h) / H - 1
    sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(B, 2, 3, dtype=torch.float64, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = F.affine_grid(theta.float(), [B, 3, size, size], align_corners=False)  # (B, S, S, 2)
    mode = "bilinear" if zero_outside else "bicubic"  # whole-pixel shifts: copies either way
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros" if zero_outside else "border",
                        align_corners=False)
    return out.clamp_(0, 255)


def _array(dataset: LTDataset) -> np.ndarray:
    """The uint8 (N, H, W, 3) images of an in-memory dataset (or of a subset of one)."""
    if isinstance(dataset, SubsetDataset):
        return _array(dataset.base)[dataset.indices]
    if isinstance(dataset, ArrayDataset):
        return dataset.images
    raise DataError(f"data.on_device: '{dataset.name}' is not held in memory as an array (CIFAR, synthetic); "
                    f"image files are decoded by the DataLoader workers: set data.on_device false")


class OnDevice:
    """The training set as uint8 (N, 3, H, W) on `device`, with batched crop + flip + normalise there.

    `crop` is 'rrc' (RandomResizedCrop over `scale`) or 'pad' (pad by `pad`, random img_size crop);
    every sample is flipped horizontally with probability 1/2.
    """

    def __init__(self, dataset: LTDataset, img_size: int, mean: Sequence[float], std: Sequence[float],
                 seed: int, device: torch.device | str, crop: str = "rrc",
                 scale: Sequence[float] = (0.08, 1.0), pad: int = 4) -> None:
        array = _array(dataset)
        self.images = torch.from_numpy(np.ascontiguousarray(array)).to(device).permute(0, 3, 1, 2)  # (N, 3, H, W)
        self.targets = torch.as_tensor(dataset.targets, dtype=torch.int64)
        self.height, self.width = array.shape[1:3]
        self.size, self.seed, self.crop, self.scale, self.pad = img_size, seed, crop, tuple(scale), pad
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.targets)

    def boxes(self, epoch: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(crop boxes (B, 4) = (top, left, h, w), flips (B,) bool) of samples `indices` at `epoch`."""
        u = uniforms(self.seed, epoch, indices, 2 * RRC_TRIES + 3)
        if self.crop == "rrc":
            boxes = rrc_boxes(u[:, :-1], self.height, self.width, self.scale)
        else:
            boxes = pad_boxes(u, self.height, self.width, self.size, self.pad)
        return boxes, u[:, -1] < 0.5

    def batch(self, epoch: int, indices: np.ndarray) -> torch.Tensor:
        """The normalised float images (B, 3, img_size, img_size) of samples `indices` at `epoch`."""
        boxes, flip = self.boxes(epoch, indices)
        device = self.images.device
        images = self.images[torch.as_tensor(indices, device=device)]
        x = resized_crops(images, torch.as_tensor(boxes, device=device), torch.as_tensor(flip, device=device),
                          self.size, zero_outside=self.crop == "pad")
        return (x - self.mean) / self.std

    def loader(self, sampler: torch.utils.data.Sampler, batch_size: int) -> DeviceLoader:
        return DeviceLoader(self, sampler, batch_size)


class DeviceLoader:
    """Batches of `sampler`'s (epoch, index) pairs as the DataLoader of `livt.data.loading` gives them:
    (images, labels, indices, n_skipped = 0); images and labels already on the device."""

    def __init__(self, data: OnDevice, sampler: torch.utils.data.Sampler, batch_size: int) -> None:
        self.data, self.sampler, self.batch_size = data, sampler, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        items = iter(self.sampler)
        while chunk := [item for _, item in zip(range(self.batch_size), items)]:
            epoch = chunk[0][0]
            indices = np.array([i for _, i in chunk], dtype=np.int64)
            labels = self.data.targets[indices].to(self.data.images.device, non_blocking=True)
            yield self.data.batch(epoch, indices), labels, torch.from_numpy(indices), 0


def check_finetune_aug(aug: AugConfig) -> None:
    """data.on_device runs the crop and flip; refuse the per-image CPU ops it does not run."""
    unsupported = [f"aug.{k} {v!r}" for k, v, off in (("rand_augment", aug.rand_augment, ""),
                                                        ("reprob", aug.reprob, 0.0),
                                                        ("color_jitter", aug.color_jitter, 0.0)) if v != off]
    if unsupported:
        raise ConfigError(
            f"data.on_device augments on the device with crop and flip only (mixup / cutmix act on the batch "
            f"and stay on); turn off {', '.join(unsupported)} (aug.rand_augment '', aug.reprob 0, "
            f"aug.color_jitter 0) or set data.on_device false")
