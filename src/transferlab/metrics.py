"""Metrics from predictions: accuracy with a Wilson interval, precision/recall/F1, confusion matrix, ROC AUC,
top-5 accuracy and calibration error.

They are computed with numpy from the confusion matrix and from ranks, as scikit-learn defines them (the tests
check every one against scikit-learn on random data, ties and absent classes included): importing
sklearn.metrics costs ~1.3 s, a sixth of a whole warm-cache ``train`` command, for arithmetic on a k x k matrix.
"""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 score: sum over equal-width confidence bins of |accuracy - confidence| * weight."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += abs(correct[in_bin].mean() - confidence[in_bin].mean()) * in_bin.mean()
    return float(ece)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = true classes, columns = predictions."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _precision_recall_f1(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per class (precision, recall, F1, support) from a confusion matrix; 0 where undefined
    (scikit-learn's zero_division=0)."""
    tp = np.diag(cm).astype(float)
    predicted, support = cm.sum(axis=0), cm.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return precision, recall, f1, support


def compute_metrics(y_true, probs, classes: list[str]) -> dict:
    """Classification metrics for true class indices and predicted probabilities (rows sum to 1).

    Precision/recall/F1 are averaged over the classes present in ``y_true`` (an evaluation set may hold
    a subset of the model's classes); the confusion matrix spans all of the model's classes.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    n, k = len(y_true), len(classes)
    present = sorted(set(y_true.tolist()))
    correct = int((y_pred == y_true).sum())
    low, high = wilson_interval(correct, n)
    out: dict = {"accuracy": correct / n if n else 0.0, "accuracy_ci95": [low, high]}
    cm = confusion_matrix(y_true, y_pred, k)
    p, r, f, support = _precision_recall_f1(cm)
    if present:
        weights = support[present] / support[present].sum()
        for suffix, w in (("", None), ("_weighted", weights)):
            out |= {f"precision{suffix}": float(np.average(p[present], weights=w)),
                    f"recall{suffix}": float(np.average(r[present], weights=w)),
                    f"f1{suffix}": float(np.average(f[present], weights=w))}
    else:
        out |= {name: 0.0 for name in ("precision", "recall", "f1", "precision_weighted", "recall_weighted",
                                       "f1_weighted")}
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(support[i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = cm.tolist()
    out["classes"] = list(classes)
    out["n_test"] = int(n)
    out["roc_auc"] = _roc_auc(y_true, probs, present)
    if k > 5:
        out["top5_accuracy"] = top_k_accuracy(y_true, probs, 5)
    out["ece"] = expected_calibration_error(y_true, probs)
    return out


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores; equal scores rank the higher class
    index first, as in scikit-learn."""
    true_score = probs[np.arange(len(y_true)), y_true][:, None]
    index = np.arange(probs.shape[1])[None, :]
    higher = ((probs > true_score) | ((probs == true_score) & (index > y_true[:, None]))).sum(axis=1)
    return float((higher < k).mean()) if len(y_true) else 0.0


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse]


def binary_roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve = the probability that a random positive outranks a random negative
    (Mann-Whitney U), ties counting one half."""
    positive = positive.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, present: list[int]) -> float | None:
    """Binary AUC, or macro one-vs-rest over the classes present; None when undefined (one class)."""
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return binary_roc_auc(y_true == 1, probs[:, 1])
    scores = probs[:, present]
    scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
    if len(present) == 2:
        return binary_roc_auc(y_true == present[1], scores[:, 1])
    return float(np.mean([binary_roc_auc(y_true == c, scores[:, i]) for i, c in enumerate(present)]))
