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
    ``sample_weights`` (the balanced sampler), seeded by (seed, epoch, stage)."""

    batch_size: int
    seed: int
    stage: str
    sample_weights: torch.Tensor | None = None

    def epoch(self, n: int, epoch: int) -> list[torch.Tensor]:
        return _batch_indices(n, self.batch_size, epoch_generator(self.seed, epoch, self.stage), self.sample_weights)

    def count(self, n: int) -> int:
        return len(_batch_indices(n, self.batch_size, torch.Generator().manual_seed(0)))


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
