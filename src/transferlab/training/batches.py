"""Training batches, one epoch at a time: shuffled (or class-balanced) index batches over cached features
or decoded images. An epoch's batches, and each image's augmentation, depend only on (seed, epoch, stage),
never on what ran before."""

from __future__ import annotations

import multiprocessing
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..models.preprocessing import PreprocessConfig, TrainAugment, center_crop, normalize


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


def sample_seed(seed: int, stage: str, epoch: int, position: int) -> int:
    """The seed of one draw's augmentation: a function of (seed, stage, epoch, position in the epoch's draw)
    alone, so results do not depend on the number of loader workers, the processes, or a resume."""
    return zlib.crc32(f"{seed}/{stage}/{epoch}/{position}".encode())


class _AugmentedDraws(Dataset):
    """Item ``(epoch, position, index)``: image ``index`` cropped (and, when training, augmented) with the
    draw's own seed, as uint8, and its label. The global RNG is forked around the augmentation, so the
    training loop's own random stream (dropout, mixing) is the same with or without loader workers."""

    def __init__(self, images: Sequence, labels: torch.Tensor, view: Callable, seed: int, stage: str):
        self.images, self.labels, self.view, self.seed, self.stage = images, labels, view, seed, stage

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, draw: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, position, index = draw
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.stage, epoch, position))
            return self.view(self.images[index]), self.labels[index]


class _EpochDraws:
    """Batch sampler of a DataLoader: this process's draws of the current epoch (set before iterating)."""

    def __init__(self, order: BatchOrder, n: int):
        self.order, self.n, self.epoch = order, n, 0

    def __iter__(self):
        for positions, indices in self.order.draws(self.n, self.epoch):
            yield [(self.epoch, p, i) for p, i in zip(positions.tolist(), indices.tolist(), strict=True)]

    def __len__(self) -> int:
        return self.order.count(self.n)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # the main process's threads run the model; a worker only crops


@dataclass(frozen=True)
class LoaderOptions:
    """How training images are read: ``workers`` DataLoader processes (0: in the training process), pinned
    memory for a copy to the GPU."""

    workers: int = 0
    pin_memory: bool = False


@dataclass(frozen=True)
class Augmentation:
    """Fine-tuning's augmentation: :class:`~transferlab.models.preprocessing.TrainAugment` with ``policy`` and
    the random resized crop's smallest area fraction ``crop_scale``."""

    policy: str = "basic"
    crop_scale: float = 0.35


def image_batches(images: Sequence, labels: torch.Tensor, order: BatchOrder, preprocess: PreprocessConfig,
                  augment: Augmentation | None, loader: LoaderOptions = LoaderOptions()) -> Batches:
    """Batches of decoded images through a DataLoader, augmented (``augment`` None: the evaluation centre crop,
    no randomness) with a seed per draw (:func:`sample_seed`), so a batch is the same with 0 or N
    ``loader.workers``. Images are read on access (``images`` may be a
    :class:`~transferlab.data.store.StoredImages`)."""
    if augment is not None:
        view = TrainAugment(preprocess, (augment.crop_scale, 1.0), augment.policy).crop
    else:
        def view(image):
            return center_crop(image, preprocess.input_size)
    sampler = _EpochDraws(order, len(labels))
    dataset = _AugmentedDraws(images, labels, view, order.seed, order.stage)
    state: dict = {}

    def make(epoch: int):
        if "loader" not in state:  # built on first use: workers start only if a stage trains
            extra = {}
            if loader.workers:
                context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
                extra = {"persistent_workers": True, "worker_init_fn": _one_thread, "multiprocessing_context": context,
                         "prefetch_factor": 2}
            state["loader"] = DataLoader(dataset, batch_sampler=sampler, num_workers=loader.workers,
                                         pin_memory=loader.pin_memory, **extra,
                                         generator=torch.Generator())  # its seed draw: not the global RNG
        sampler.epoch = epoch
        for crops, y in state["loader"]:
            yield normalize(crops, preprocess), y
    return Batches(make, order.count(len(labels)))
