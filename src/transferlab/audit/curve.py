"""How many more images: a learning curve on frozen features, fitted with a saturating power law.

Heads (the label-issue head, same C) are trained on stratified fractions of the training split, each
fraction repeated over seeds, and scored on the held-out split. ``accuracy(n) = a - b * n**(-c)`` (n =
training images per class) is fitted by least squares; its interval for a new measurement at n combines
the fit's uncertainty (a bootstrap over the repeats at each fraction) with the sampling noise of an
accuracy measured on the held-out images (binomial), since a measured accuracy varies by that much around
its expectation. Frozen-feature curves understate what fine-tuning gains: fine-tuning improves the
features too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FRACTIONS = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
REPEATS = 3
MIN_POINTS = 4  # distinct training sizes a fit needs
BOOTSTRAP = 300
_BOUNDS = ([0.0, 0.0, 0.01], [1.0, np.inf, 3.0])


@dataclass
class PowerLaw:
    a: float
    b: float
    c: float

    def __call__(self, n):
        return self.a - self.b * np.power(np.asarray(n, dtype=np.float64), -self.c)

    def images_for(self, accuracy: float) -> float | None:
        """Images per class at which the curve reaches ``accuracy`` (None: at or above its ceiling)."""
        if accuracy >= self.a or self.b <= 0:
            return None
        return float((self.b / (self.a - accuracy)) ** (1.0 / self.c))


def subsample(labels: np.ndarray, fraction: float, seed: int, minimum: int = 2) -> np.ndarray:
    """Stratified, seeded subset: ``fraction`` of each class, at least ``minimum`` images."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        picked.append(rows[:max(minimum, round(fraction * len(rows)))])
    return np.sort(np.concatenate(picked))


def measure(fit_head, x_train, y_train, held_out: tuple, n_classes: int, fractions=FRACTIONS,
            repeats: int = REPEATS) -> list[dict]:
    """One point per (fraction, repeat): images per class, accuracy and per-class recall on the held-out
    ``(x, y)``. ``fit_head(x, y)`` returns a fitted classifier with ``predict``. The full split is measured once."""
    x_eval, y_eval = held_out
    points = []
    for fraction in fractions:
        for repeat in range(1 if fraction >= 1.0 else repeats):
            rows = subsample(y_train, fraction, seed=repeat) if fraction < 1.0 else np.arange(len(y_train))
            predicted = fit_head(x_train[rows], y_train[rows]).predict(x_eval)
            recall = [float(np.mean(predicted[y_eval == c] == c)) if np.any(y_eval == c) else None
                      for c in range(n_classes)]
            points.append({"fraction": fraction, "repeat": repeat, "per_class": len(rows) / len(np.unique(y_train)),
                           "accuracy": float(np.mean(predicted == y_eval)), "recall": recall})
    return points


def _fit(n: np.ndarray, acc: np.ndarray, start=None) -> PowerLaw | None:
    from scipy.optimize import curve_fit

    p0 = start or [min(1.0, float(acc.max()) + 0.01), 1.0, 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            params, _ = curve_fit(lambda n, a, b, c: a - b * n ** (-c), n, acc, p0=p0, bounds=_BOUNDS, maxfev=20000)
        except (RuntimeError, ValueError):
            return None
    return PowerLaw(*map(float, params))


def fit_curve(points: list[dict], n_eval: int, seed: int = 0) -> dict:
    """The fitted curve, with its bootstrap replicates for intervals; ``{"fitted": False, "reason"}`` when
    the points do not support a fit."""
    n = np.array([p["per_class"] for p in points], dtype=np.float64)
    acc = np.array([p["accuracy"] for p in points], dtype=np.float64)
    sizes = np.unique(n)
    if len(sizes) < MIN_POINTS:
        return {"fitted": False, "reason": f"not enough points ({len(sizes)} training sizes, {MIN_POINTS} needed)"}
    law = _fit(n, acc)
    if law is None:
        return {"fitted": False, "reason": "the power law does not fit these points"}
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(n == s) for s in sizes]
    replicates = []
    for _ in range(BOOTSTRAP):
        rows = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        fitted = _fit(n[rows], acc[rows], [law.a, law.b, law.c])
        if fitted is not None:
            replicates.append(fitted)
    return {"fitted": True, "law": law, "replicates": replicates, "n_eval": n_eval,
            "max_per_class": float(sizes.max())}


def predict(curve: dict, per_class: float) -> dict:
    """Expected accuracy at ``per_class`` images per class, with a 95% interval for a measurement there."""
    law = curve["law"]
    value = float(law(per_class))
    boot = np.array([r(per_class) for r in curve["replicates"]]) if curve["replicates"] else np.array([value])
    low, high = np.percentile(boot, [2.5, 97.5])
    noise = 1.96 * np.sqrt(max(value * (1.0 - value), 0.0) / max(curve["n_eval"], 1))
    return {"per_class": per_class, "accuracy": value,
            "low": float(max(0.0, value - np.hypot(value - low, noise))),
            "high": float(min(1.0, value + np.hypot(high - value, noise)))}


def images_needed(curve: dict, target: float) -> dict:
    """Images per class at which the fitted curve reaches ``target``, with the range of sizes whose 95%
    measurement interval (:func:`predict`) contains it: ``low`` where the interval's top first reaches the
    target, ``high`` where its bottom does (None: not within 1000x the largest size measured).
    ``reachable: False`` when the fitted ceiling is at or below the target."""
    n = curve["law"].images_for(target)
    if n is None:
        return {"target": target, "reachable": False, "ceiling": curve["law"].a}
    sizes = np.geomspace(1.0, 1000.0 * curve["max_per_class"], 400)
    bands = [predict(curve, size) for size in sizes]
    low = next((float(s) for s, b in zip(sizes, bands, strict=True) if b["high"] >= target), None)
    high = next((float(s) for s, b in zip(sizes, bands, strict=True) if b["low"] >= target), None)
    return {"target": target, "reachable": True, "per_class": n, "ceiling": curve["law"].a,
            "low": low if low is not None else n, "high": high}


def targets(measured: float, ceiling: float) -> list[float]:
    """Accuracies worth asking about: +1, +2 and +5 points above the measured one (below the ceiling and 1),
    and 0.95 / 0.99 when above the measured accuracy."""
    wanted = {round(measured + d, 3) for d in (0.01, 0.02, 0.05)} | {t for t in (0.95, 0.99) if t > measured}
    return sorted(t for t in wanted if t < 1.0 and t <= max(ceiling, measured) + 0.05)
