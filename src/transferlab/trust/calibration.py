"""Temperature scaling (Guo et al., 2017) and the calibration error it is judged by.

One scalar T divides the logits; it changes no prediction, only how confident they are. The log of the
probabilities stands in for the logits (softmax(log p / T) = softmax(z / T)), so the same rule applies to a
model's probabilities wherever they come from (ONNX Runtime, test-time augmentation's averaged views).
"""

from __future__ import annotations

import numpy as np

from ..metrics import expected_calibration_error

N_BINS = 15
BOOTSTRAP_SAMPLES = 1000
# T is searched in [e^-3, e^3]: wider than any temperature a real network needs (Guo et al. report 1-3)
LOG_T_BOUNDS = (-3.0, 3.0)


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None))


def scaled(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities with temperature ``temperature`` applied (1: unchanged)."""
    z = log_probabilities(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = log_probabilities(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """The temperature that minimises the negative log-likelihood of ``labels`` (one bounded scalar search),
    and a note when it cannot be fitted: with no wrong prediction among the images, the likelihood only
    grows as T falls to 0 (certainty), which no test set would bear out, so T stays 1."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0 or bool(np.all(np.asarray(probs).argmax(axis=1) == labels)):
        return 1.0, "not fitted (T = 1): every validation image is predicted right, so no temperature is supported"
    result = minimize_scalar(lambda log_t: negative_log_likelihood(probs, labels, float(np.exp(log_t))),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x)), None


def ece_interval(labels: np.ndarray, probs: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                 n_bins: int = N_BINS) -> tuple[float, float]:
    """95% bootstrap percentile interval of the expected calibration error (images resampled)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if len(labels) == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    values = [expected_calibration_error(labels[rows], probs[rows], n_bins)
              for rows in rng.integers(0, len(labels), size=(samples, len(labels)))]
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Per equal-width confidence bin with images: its edges, image count, mean confidence and accuracy
    (what a reliability diagram draws)."""
    confidence = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            bins.append({"low": round(float(lo), 4), "high": round(float(hi), 4), "count": int(inside.sum()),
                         "confidence": float(confidence[inside].mean()), "accuracy": float(correct[inside].mean())})
    return bins


def calibration_report(labels: np.ndarray, raw: np.ndarray, temperature: float, seed: int = 0) -> dict:
    """ECE (with its interval) and reliability bins before and after temperature scaling, on one split."""
    after = scaled(raw, temperature)
    report = {"temperature": round(temperature, 6), "n": int(len(labels))}
    for name, probs in (("before", raw), ("after", after)):
        report[f"ece_{name}"] = expected_calibration_error(np.asarray(labels), np.asarray(probs, dtype=np.float64))
        report[f"ece_{name}_ci95"] = list(ece_interval(labels, probs, seed=seed))
        report[f"reliability_{name}"] = reliability_bins(labels, probs)
    return report
