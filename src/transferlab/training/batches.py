"""Training batches, one epoch at a time: shuffled (or class-balanced) index batches over cached features
or decoded images. An epoch's batches depend only on (seed, epoch, stage), never on what ran before."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..models.preprocessing import PreprocessConfig, TrainAugment, eval_batch


def epoch_generator(seed: int, epoch: int, stage: str) -> torch.Generator:
    """A generator that depends only on (seed, epoch, stage), never on what ran before."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{epoch}/{stage}".encode()))


@dataclass
class Batches:
    """How one epoch of training batches is produced: ``make(epoch)`` -> iterator of (x, y)."""

    make: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    count: int


def _batch_indices(n: int, batch_size: int, generator: torch.Generator,
                   sample_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One epoch of shuffled index batches; with ``sample_weights``, ``n`` indices drawn with
    replacement in proportion to them (the balanced sampler)."""
    if sample_weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.multinomial(sample_weights, n, replacement=True, generator=generator)
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a batch of one breaks BatchNorm in train mode
        chunks = chunks[:-1]
    return chunks


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-sample weights 1 / (images in its class): every class is drawn equally often."""
    counts = torch.bincount(labels).float()
    return 1.0 / counts[labels]


@dataclass(frozen=True)
class BatchOrder:
    """How an epoch's samples are ordered into batches: shuffled, or drawn in proportion to
    ``sample_weights`` (the balanced sampler), seeded by (seed, epoch, stage).

    ``batch_size`` is the global batch. With ``world`` processes (DDP), every process draws the same
    global order and takes part ``rank`` of each batch (a contiguous slice of batch_size / world samples),
    so the processes' batches are disjoint and together cover the epoch; a last batch is trimmed to a
    multiple of ``world`` so every process takes as many steps with equal shares.
    """

    batch_size: int
    seed: int
    stage: str
    sample_weights: torch.Tensor | None = None
    rank: int = 0
    world: int = 1

    def global_epoch(self, n: int, epoch: int) -> list[torch.Tensor]:
        """Every process's batches of ``epoch``: one index tensor per global batch."""
        batches = _batch_indices(n, self.batch_size, epoch_generator(self.seed, epoch, self.stage),
                                 self.sample_weights)
        if self.world > 1:
            batches = [b[:len(b) - len(b) % self.world] for b in batches]
            batches = [b for b in batches if len(b) >= max(2, self.world)]
        return batches

    def draws(self, n: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's batches of ``epoch`` as (positions in the epoch's global draw, sample indices);
        a position identifies one draw even when the balanced sampler draws a sample twice."""
        out, start = [], 0
        for batch in self.global_epoch(n, epoch):
            positions = torch.arange(start, start + len(batch))
            start += len(batch)
            share = len(batch) // self.world
            part = slice(self.rank * share, (self.rank + 1) * share)
            out.append((positions[part], batch[part]))
        return out

    def epoch(self, n: int, epoch: int) -> list[torch.Tensor]:
        """This process's index batches of ``epoch``."""
        return [indices for _, indices in self.draws(n, epoch)]

    def count(self, n: int) -> int:
        return len(self.global_epoch(n, 0)) if self.world > 1 else len(
            _batch_indices(n, self.batch_size, torch.Generator().manual_seed(0)))


def feature_batches(features: torch.Tensor, labels: torch.Tensor, order: BatchOrder) -> Batches:
    def make(epoch: int):
        for idx in order.epoch(len(labels), epoch):
            yield features[idx], labels[idx]
    return Batches(make, order.count(len(labels)))


def image_batches(images: list[torch.Tensor], labels: torch.Tensor, order: BatchOrder, preprocess: PreprocessConfig,
                  augment: bool, policy: str = "basic", crop_scale: float = 0.35) -> Batches:
    """Augmentation (:class:`~transferlab.models.preprocessing.TrainAugment` with ``policy`` and the crop's
    smallest area fraction ``crop_scale``; ``augment`` False: the evaluation centre crop, no randomness) draws
    from the global torch RNG, which TrainLoop seeds per epoch."""
    transform = (TrainAugment(preprocess, (crop_scale, 1.0), policy) if augment
                 else (lambda ims: eval_batch(ims, preprocess)))

    def make(epoch: int):
        for idx in order.epoch(len(labels), epoch):
            yield transform([images[i] for i in idx.tolist()]), labels[idx]
    return Batches(make, order.count(len(labels)))
