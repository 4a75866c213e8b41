"""The held-out policy: which images may judge a model, and which never may.

- The **test** split (a ``test/`` folder, ``--test-dir``, or carved with ``--test-size``) only reports: it
  never ranks a candidate, picks an epoch or fits anything.
- The **validation** split (a ``val/`` folder, or carved from the training images with ``--val-size``) is
  held out from the final model's training. It picks the kept epoch and early stopping, decides whether
  fine-tuning beat the frozen head (``--strategy auto``), and is what calibration and prediction sets are
  fitted on. It is not merged back into training (no refit), so it stays usable for those.
- **k-fold cross-validation on the training split** ranks frozen candidates: on cached features a head costs
  milliseconds, and k folds over every training image are far less noisy than one small validation split.

Only this module decides the default validation fraction and how folds are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import TransferlabError

# --strategy auto needs a validation split to judge fine-tuning against the frozen head; 0.15 keeps 85% of
# the images for training while leaving ~20 validation images per class at 130 images per class.
AUTO_VAL_SIZE = 0.15
DEFAULT_FOLDS = 5


def default_val_size(strategy: str) -> float:
    """The validation fraction when ``--val-size`` is not given: only ``auto`` carves one by default (the
    other strategies train on every training image and keep the last epoch unless asked)."""
    return AUTO_VAL_SIZE if strategy == "auto" else 0.0


@dataclass
class Folds:
    """Stratified, seeded k-fold splits of a training split: every image is held out exactly once."""

    splits: list[tuple]  # (training rows, held-out rows) as numpy index arrays
    k: int
    notes: list[str] = field(default_factory=list)


def stratified_folds(labels, k: int = DEFAULT_FOLDS, seed: int = 0) -> Folds:
    """k lowered (with a note) to the smallest class's image count; a class with one image cannot be held
    out and trained on at once, which is a one-line error."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    counts = np.bincount(labels)
    present = counts[counts > 0]
    if len(present) < 2:
        raise TransferlabError("cross-validation needs at least two classes in the training split")
    smallest = int(present.min())
    if smallest < 2:
        raise TransferlabError(f"cross-validation needs at least 2 training images per class; class index "
                               f"{int(np.flatnonzero(counts == 1)[0])} has 1")
    used = min(k, smallest)
    notes = [f"{used} folds instead of {k}: the smallest class has {smallest} training images"] if used < k else []
    splitter = StratifiedKFold(used, shuffle=True, random_state=seed)
    splits = [(train, held) for train, held in splitter.split(np.zeros(len(labels)), labels)]
    return Folds(splits, used, notes)
