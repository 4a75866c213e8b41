"""Which epoch is the best one: the one rule shared by keep-best, early stopping and experiment ranking.

Higher validation accuracy wins; equal accuracies are decided by the lower validation loss; when both are
equal the earlier epoch stays (a later epoch must be strictly better to replace it). Accuracy on a small
validation split moves in steps of one image, so ties are common, and the loss is the finer measure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def finite_float(value) -> float | None:
    """``value`` as a finite float (strings from CSV files included), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def epoch_score(row: dict) -> tuple[float, float] | None:
    """The sort key of a history row (higher is better), or None when it has no validation result.

    Rows may come straight from the training loop (floats) or from history.csv (strings)."""
    accuracy = finite_float(row.get("val_acc"))
    if accuracy is None:
        return None
    loss = finite_float(row.get("val_loss"))
    return accuracy, -(loss if loss is not None else math.inf)


def improves(score: tuple[float, float] | None, best: tuple[float, float] | None) -> bool:
    """Whether an epoch with ``score`` replaces the best one so far (strictly better only)."""
    return score is not None and (best is None or score > best)


def best_epoch(rows: Iterable[dict]) -> dict | None:
    """The best row by :func:`epoch_score`, the first of equals; None when no row has a validation result."""
    best_row, best = None, None
    for row in rows:
        score = epoch_score(row)
        if improves(score, best):
            best_row, best = row, score
    return best_row


def ranking_key(accuracy: float | None, loss: float | None) -> tuple[float, float]:
    """The same rule as an ascending sort key (best first), for ranking runs and configurations: higher
    accuracy, then lower loss; a missing accuracy ranks last."""
    return (-(accuracy if accuracy is not None else -1.0), loss if loss is not None else math.inf)
