"""Metrics from predictions, computed with scikit-learn (plus Wilson interval and calibration error)."""

from __future__ import annotations

import math
import warnings

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


def compute_metrics(y_true, probs, classes: list[str]) -> dict:
    """Classification metrics for true class indices and predicted probabilities (rows sum to 1).

    Precision/recall/F1 are averaged over the classes present in ``y_true`` (an evaluation set may hold
    a subset of the model's classes); the confusion matrix spans all of the model's classes.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    n = len(y_true)
    present = sorted(set(y_true.tolist()))
    all_labels = list(range(len(classes)))
    correct = int((y_pred == y_true).sum())
    low, high = wilson_interval(correct, n)
    out: dict = {"accuracy": correct / n if n else 0.0, "accuracy_ci95": [low, high]}
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=present, average=average,
                                                         zero_division=0)
        suffix = "" if average == "macro" else "_weighted"
        out |= {f"precision{suffix}": float(p), f"recall{suffix}": float(r), f"f1{suffix}": float(f)}
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=all_labels, zero_division=0)
    out["per_class"] = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])} for i, c in enumerate(classes)}
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=all_labels).tolist()
    out["classes"] = list(classes)
    out["n_test"] = int(n)
    out["roc_auc"] = _roc_auc(y_true, probs, present)
    if len(classes) > 5:
        out["top5_accuracy"] = float(skm.top_k_accuracy_score(y_true, probs, k=5, labels=all_labels))
    out["ece"] = expected_calibration_error(y_true, probs)
    return out


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, present: list[int]) -> float | None:
    """Binary AUC, or macro one-vs-rest over the classes present; None when undefined (one class)."""
    from sklearn.metrics import roc_auc_score

    if len(present) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if probs.shape[1] == 2:
            return float(roc_auc_score(y_true, probs[:, 1]))
        scores = probs[:, present]
        scores = scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return float(roc_auc_score(y_true == present[1], scores[:, 1]))
        return float(roc_auc_score(y_true, scores, multi_class="ovr", average="macro", labels=present))
