"""Split-conformal prediction sets (the "LAC" score of Sadinle et al., 2019: one minus the probability of
the class): a set holds every class whose score is at most the calibrated threshold, and contains the true
class with probability at least ``coverage`` when calibration and test images are exchangeable.

The threshold is the ceil((n + 1) * coverage)-th smallest score of the n calibration images; with too few
images for the coverage asked, it is infinite (every class is in the set). These are the few lines of the
method (Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", section 1); a package would
add nothing here but a dependency.
"""

from __future__ import annotations

import math

import numpy as np


def conformal_rank(n: int, level: float) -> int:
    """The 1-based rank of the order statistic that gives coverage ``level`` over ``n`` calibration scores."""
    return math.ceil((n + 1) * level)


def upper_quantile(scores: np.ndarray, level: float) -> float:
    """The conformal quantile of ``scores`` at ``level`` (inf when there are too few scores)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = conformal_rank(len(scores), level)
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def nonconformity(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return 1.0 - probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]


def fit_threshold(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    return upper_quantile(nonconformity(probs, labels), coverage)


def prediction_sets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """A boolean (n, classes) membership matrix: class c is in image i's set when 1 - p_ic <= threshold."""
    return 1.0 - np.asarray(probs, dtype=np.float64) <= threshold


def set_report(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Empirical coverage and mean set size of the sets on labelled images."""
    members = prediction_sets(probs, threshold)
    labels = np.asarray(labels, dtype=np.int64)
    covered = members[np.arange(len(labels)), labels]
    return {"empirical_coverage": float(covered.mean()) if len(labels) else None,
            "mean_set_size": float(members.sum(axis=1).mean()) if len(labels) else None,
            "empty_sets": int((members.sum(axis=1) == 0).sum()), "n": int(len(labels))}
