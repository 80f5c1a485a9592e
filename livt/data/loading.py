"""Per-sample seeded augmentation, the collate function that drops skipped images, and the DataLoader.

`Augmented` draws each sample's augmentation from a seed derived from (seed, epoch, index), so a sample
looks the same whatever worker loads it and whatever the number of workers: training is reproducible
and resumable mid-epoch. What stays nondeterministic: nothing on the CPU path; bicubic resampling may
differ across Pillow (and, with data.pipeline fast, torch) versions.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from livt.data.device import OnDevice, check_finetune_aug
from livt.data.errors import ImageReadError
from livt.data.splits import LTDataset
from livt.data.transforms import (
    PRETRAIN_SCALE,
    TrainTransform,
    check_pipeline,
    finetune_transform,
    finish_batch,
    pretrain_transform,
)

ERASE_STREAM = 0xE2A5E  # keeps the erasing noise's seeds apart from those of livt.engine.seed_step


def derive_seed(*key: int) -> int:
    """A 32-bit seed that is a function of `key` alone (a hash through numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, index: int) -> tuple[int, np.ndarray, int]:
    """Seeds (python random, numpy legacy, torch) of one sample."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(5, np.uint32)
    return int(state[0]), state[1:3], int(state[3]) | (int(state[4]) << 32)


class Augmented(torch.utils.data.Dataset):
    """`dataset` seen through a random `transform`: item (epoch, index) -> (image (3, H, W), label, index).

    The python, numpy and torch CPU random states are seeded per sample and restored afterwards, so
    loading in the main process (num_workers=0) does not disturb its random streams. With
    `skip_bad_images` an unreadable image gives None (and a warning naming the file); `collate` drops it.
    With `lazy` the transform gets the image undecoded where it is a file (`LTDataset.open`) and decodes it
    itself (`TrainTransform`).
    """

    def __init__(self, dataset: LTDataset, transform: Callable, seed: int = 0, skip_bad_images: bool = False,
                 lazy: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.skip_bad_images = skip_bad_images
        self.lazy = lazy

    def with_pipeline(self, pipeline: str, uint8: bool) -> Augmented:
        """This training set with its transform run as data.pipeline / data.uint8_batches ask
        (`TrainTransform`); itself for the reference ('pil', float)."""
        check_pipeline(pipeline)
        if pipeline == "pil" and not uint8:
            return self
        return Augmented(self.dataset, TrainTransform(self.transform, pipeline, uint8), self.seed,
                         self.skip_bad_images, lazy=pipeline != "pil")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int] | None:
        epoch, index = item
        try:
            img, label = self.dataset.open(index) if self.lazy else self.dataset.load(index)
            x = self._augment(img, epoch, index)  # decodes the image too where it is lazy
        except ImageReadError as e:
            if not self.skip_bad_images:
                raise
            warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
            return None
        return x, label, index

    def _augment(self, img: object, epoch: int, index: int) -> torch.Tensor:
        py_seed, np_seed, torch_seed = sample_seed(self.seed, epoch, index)
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(py_seed)
            np.random.seed(np_seed)
            torch.random.default_generator.manual_seed(torch_seed)  # CPU only: leave CUDA streams alone
            return self.transform(img)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def collate(batch: list[tuple[torch.Tensor, int, int] | None]):
    """-> (images (B, 3, H, W) float, labels (B,) int64, indices (B,) int64, n_skipped).

    B counts only the readable samples; if none is, images is an empty (0, 3, 0, 0) tensor. With
    data.uint8_batches the images are uint8 (B, 3 or 4, H, W), for `livt.data.transforms.finish_batch`.
    """
    kept = [b for b in batch if b is not None]
    n_skipped = len(batch) - len(kept)
    if not kept:
        return (torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                n_skipped)
    images = torch.stack([b[0] for b in kept])
    labels = torch.tensor([b[1] for b in kept], dtype=torch.int64)
    indices = torch.tensor([b[2] for b in kept], dtype=torch.int64)
    return images, labels, indices, n_skipped


def _worker_init(worker_id: int) -> None:
    # Augmented seeds every sample itself; only keep the workers from oversubscribing the cores.
    torch.set_num_threads(1)


def make_loader(dataset: Augmented, sampler: torch.utils.data.Sampler, batch_size: int, num_workers: int,
                pin_memory: bool | None = None,
                prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over `sampler` (which yields (epoch, index)) with `collate`; for a training set held
    on the device (`livt.data.device.OnDevice`, data.on_device) its batched loader instead.

    It owns a private generator so that creating iterators does not consume the global torch RNG.
    Workers persist across epochs: the sampler runs in the main process, so `set_epoch` / `set_start`
    before each `iter()` take effect, and the epoch travels with every index.
    """
    if hasattr(dataset, "loader"):
        return dataset.loader(sampler, batch_size)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory, drop_last=False,
        persistent_workers=num_workers > 0, worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(0),
        prefetch_factor=prefetch_factor if num_workers > 0 else None)


def float_batches(images: torch.Tensor, step: int, rank: int, micro: int) -> torch.Tensor:
    """The finisher of a training set whose batches are float already."""
    return images


class FinishUint8:
    """The finisher of data.uint8_batches: uint8 batches (B, 3 or 4, H, W) normalised on their device, the
    erased pixels N(0, 1) noise drawn from (seed, step, rank, micro-batch) (`finish_batch`); float batches
    (all images skipped, or a float input of `livt bench`) pass through."""

    def __init__(self, mean: tuple, std: tuple, seed: int) -> None:
        self.mean, self.std, self.seed = mean, std, seed

    def __call__(self, images: torch.Tensor, step: int, rank: int, micro: int) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return finish_batch(images, self.mean, self.std, derive_seed(self.seed, step, rank, micro, ERASE_STREAM))


class TrainData(NamedTuple):
    """A training set (`Augmented`, `OnDevice`; item (epoch, index)) and its batch finisher, `finish(images,
    step, rank, micro) -> float images (B, 3, H, W)` on the device: what `livt.engine.Trainer` iterates."""

    dataset: Any
    finish: Callable[[torch.Tensor, int, int, int], torch.Tensor] = float_batches


def finished(data: Any, d: Any, seed: int) -> TrainData:
    """`data` with its transform run as data.pipeline / data.uint8_batches ask (`Augmented.with_pipeline`)
    and the finisher of its batches; a set held on the device (`OnDevice`) makes float batches itself."""
    if not isinstance(data, Augmented):
        return TrainData(data)
    data = data.with_pipeline(d.pipeline, d.uint8_batches)
    return TrainData(data, FinishUint8(d.mean, d.std, seed) if d.uint8_batches else float_batches)


def train_data(cfg, stage: str, train, device: torch.device) -> TrainData:
    """The training data of a stage (`pretrain` or `finetune`): held on the device with batched crop / flip
    (`data.on_device`), or per-sample transforms in loader workers (pretraining: the MAE crop and flip;
    fine-tuning: crop, RandAugment, random erasing; mixup is in `TargetMaker`), with its batch finisher."""
    d = cfg.data
    if stage == "pretrain":
        data = (OnDevice(train, d.img_size, d.mean, d.std, cfg.seed, device, "rrc", PRETRAIN_SCALE) if d.on_device
                else Augmented(train, pretrain_transform(d.img_size, d.mean, d.std), cfg.seed, d.skip_bad_images))
        return finished(data, d, cfg.seed)
    a = cfg.aug
    if d.on_device:
        check_finetune_aug(a)
        return finished(OnDevice(train, d.img_size, d.mean, d.std, cfg.seed, device, a.crop, a.crop_scale, a.pad),
                        d, cfg.seed)
    transform = finetune_transform(d.img_size, d.mean, d.std, a.rand_augment, a.reprob, a.color_jitter,
                                   a.crop_scale, a.crop, a.pad)
    return finished(Augmented(train, transform, cfg.seed, d.skip_bad_images), d, cfg.seed)
