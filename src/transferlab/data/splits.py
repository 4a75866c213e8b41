"""Stratified, seeded splits, and the train/validation/test plan made from the images that decoded."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import TransferlabError
from .discovery import Sample, Splits, class_counts

MIN_TRAIN_PER_CLASS = 1


def split_per_class(samples: list[Sample], fraction: float, seed: int, split_name: str,
                    min_train: int = MIN_TRAIN_PER_CLASS) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split: every class gives round(fraction * n) samples, at least one.

    A class needs ``min_train + 1`` images; with fewer, the error names it.
    """
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    keep, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        n_held = max(1, round(fraction * len(items)))
        if len(items) - n_held < min_train:
            raise TransferlabError(
                f"class '{label}' has {len(items)} usable image(s): carving a {split_name} split needs at "
                f"least {min_train + 1} per class (add images, or provide a {split_name} folder)")
        random.Random(f"{seed}-{split_name}-{label}").shuffle(items)
        held += items[:n_held]
        keep += items[n_held:]
    return keep, held


@dataclass
class SplitPlan:
    """The samples of each split, made from the images that could be used."""

    train: list[Sample]
    val: list[Sample] | None
    test: list[Sample]


def plan_splits(splits: Splits, usable: set[Sample], test_size: float, val_size: float, seed: int) -> SplitPlan:
    """Keep the usable samples of each shipped split and carve what the folder does not ship: a test split
    (``test_size``), then a validation split (``val_size`` > 0). Splits are made from what decoded, so a
    skipped file never empties a split; a class left without images in train or test is an error."""
    train = [s for s in splits.train if s in usable]
    test = [s for s in splits.test if s in usable] if splits.test is not None else None
    val = [s for s in splits.val if s in usable] if splits.val is not None else None
    carve_val = val is None and val_size > 0
    if test is None:
        train, test = split_per_class(train, test_size, seed, "test", min_train=2 if carve_val else 1)
    if carve_val:
        train, val = split_per_class(train, val_size, seed, "validation")
    for name, samples in (("train", train), ("test", test)):
        counts = class_counts(samples, splits.classes)
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise TransferlabError(f"class '{empty[0]}' has no usable image in the {name} split")
    return SplitPlan(train, val or None, test)
