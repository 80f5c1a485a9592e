"""Training and evaluation samplers that shard across processes themselves.

They yield `(epoch, index)` pairs so that the augmentation of a sample can be seeded from
(seed, epoch, index), whatever worker loads it (see `livt.data.loading.Augmented`). A DataLoader built on
them is already sharded: do not let Accelerate re-shard it (move batches to the device instead).

Training order: each epoch draws N = len(targets) samples from a `torch.Generator` seeded by
(seed, epoch), cuts them to a whole number of global batches (batch_size * num_replicas) and gives
rank r positions [b*W*B + r*B, b*W*B + (r+1)*B) of global batch b, so the global batch is the same for
any number of processes that keeps W*B fixed.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator

import numpy as np
import torch

from livt.config import Sampler

SAMPLERS = typing.get_args(Sampler)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class TrainSampler(torch.utils.data.Sampler):
    """Seeded, sharded, resumable training order.

    kind: 'instance' (a permutation), 'class_balanced' (a class uniformly, then an image of it),
    'sqrt' (class probability proportional to sqrt(n_c)) or 'progressive' (p_c(t) = (1 - t/T) n_c/N +
    (t/T) / C, t = epoch, T = total_epochs). The class-level kinds draw with replacement and never
    pick a class without images.
    """

    def __init__(self, targets: np.ndarray, num_classes: int, kind: str = "instance", seed: int = 0,
                 batch_size: int = 1, num_replicas: int = 1, rank: int = 0, total_epochs: int = 1):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        targets = np.asarray(targets, dtype=np.int64)
        self.kind, self.seed, self.total_epochs = kind, seed, max(total_epochs, 1)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.num_samples = len(targets)
        self.num_classes = num_classes
        if self.num_samples < batch_size * num_replicas:
            raise ValueError(f"{self.num_samples} training samples do not fill one global batch of "
                             f"{batch_size} x {num_replicas} processes")
        self.counts = np.bincount(targets, minlength=num_classes).astype(np.int64)
        order = np.argsort(targets, kind="stable")
        self._by_class = torch.from_numpy(order)  # indices grouped by class
        self._offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(self.counts)[:-1]]))
        self._counts = torch.from_numpy(self.counts)
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (= global batches per epoch)."""
        return self.num_samples // (self.batch_size * self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, batch_index: int) -> None:
        """Resume this epoch after its first `batch_index` micro-batches of this rank."""
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"batch index {batch_index} outside [0, {self.batches_per_epoch}]")
        self.start = batch_index

    def class_probs(self, epoch: int | None = None) -> np.ndarray:
        """Class sampling probabilities (C,) of the class-level kinds at `epoch` (default: current)."""
        n = self.counts.astype(np.float64)
        present = n > 0
        if self.kind == "instance":  # implicit: a permutation visits class c n_c times
            p = n
        elif self.kind == "class_balanced":
            p = present.astype(np.float64)
        elif self.kind == "sqrt":
            p = np.sqrt(n)
        else:
            t = min((self.epoch if epoch is None else epoch) / self.total_epochs, 1.0)
            p = (1 - t) * n / n.sum() + t * present / self.num_classes
        p = np.where(present, p, 0.0)
        return p / p.sum()

    def order(self, epoch: int) -> torch.Tensor:
        """The global order of `epoch`: N indices (before cutting to whole global batches)."""
        g = _epoch_generator(self.seed, epoch)
        if self.kind == "instance":
            return torch.randperm(self.num_samples, generator=g)
        probs = torch.from_numpy(self.class_probs(epoch))
        classes = torch.multinomial(probs, self.num_samples, replacement=True, generator=g)
        within = (torch.rand(self.num_samples, generator=g, dtype=torch.float64)
                  * self._counts[classes]).long()
        within = torch.minimum(within, self._counts[classes] - 1)  # guard the u -> 1 edge
        return self._by_class[self._offsets[classes] + within]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        b, w = self.batch_size, self.num_replicas
        nb = self.batches_per_epoch
        global_batches = self.order(self.epoch)[: nb * b * w].view(nb, w, b)
        mine = global_batches[self.start:, self.rank].reshape(-1).tolist()
        epoch = self.epoch
        return iter([(epoch, i) for i in mine])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.batch_size


class EvalSampler(torch.utils.data.Sampler):
    """Every index once across ranks, no padding: rank r gets r, r + W, r + 2W, ... as (0, index)."""

    def __init__(self, n: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = n, num_replicas, rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, i) for i in range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))
