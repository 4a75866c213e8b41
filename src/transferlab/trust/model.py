"""A run's trust layer: temperature, unknown threshold and conformal threshold, fitted on the validation
split, stored as RUN_DIR/trust.json + RUN_DIR/known_features.safetensors and applied to predictions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import calibration, conformal, unknown

FORMAT_VERSION = 1
ASSUMPTION = ("calibration, the unknown threshold and the coverage of prediction sets assume the images are "
              "exchangeable with the run's validation split (drawn the same way); they do not hold for images "
              "from another source")


@dataclass
class TrustedPredictions:
    """Per image: calibrated probabilities, the unknown score and flag, and prediction-set membership."""

    probs: np.ndarray  # (n, classes), temperature applied
    unknown_score: np.ndarray  # (n,)
    unknown: np.ndarray  # (n,) bool
    sets: np.ndarray  # (n, classes) bool

    def fields(self, i: int, classes: list[str]) -> dict:
        """The fields ``predict`` adds to image ``i``'s record (sets ordered by probability)."""
        members = np.flatnonzero(self.sets[i])
        order = members[np.argsort(-self.probs[i][members], kind="stable")]
        return {"unknown": bool(self.unknown[i]), "unknown_score": round(float(self.unknown_score[i]), 6),
                "prediction_set": [classes[int(c)] for c in order]}


@dataclass
class Trust:
    temperature: float
    knn: unknown.NearestNeighbourScore
    unknown_threshold: float
    keep_known: float
    set_threshold: float
    coverage: float
    n_calibration: int
    temperature_note: str | None = None

    @classmethod
    def fit(cls, probs: np.ndarray, labels: np.ndarray, features: np.ndarray, train_features: np.ndarray,
            keep_known: float, coverage: float, seed: int = 0) -> Trust:
        """Fit on the validation split's probabilities, labels and pooled features; ``train_features``
        (the final model's, of the training images) are what "unknown" measures distance to."""
        knn = unknown.NearestNeighbourScore(unknown.bank_of(train_features, seed))
        temperature, note = calibration.fit_temperature(probs, labels)
        return cls(temperature=temperature, temperature_note=note, knn=knn,
                   unknown_threshold=unknown.fit_threshold(knn(features), keep_known), keep_known=keep_known,
                   set_threshold=conformal.fit_threshold(probs, labels, coverage), coverage=coverage,
                   n_calibration=int(len(labels)))

    def apply(self, probs: np.ndarray, features: np.ndarray) -> TrustedPredictions:
        """``probs``: the model's softmax probabilities; ``features``: its pooled features, same images."""
        probs = np.asarray(probs, dtype=np.float64)
        score = self.knn(features) if len(probs) else np.zeros(0)
        return TrustedPredictions(calibration.scaled(probs, self.temperature) if len(probs) else probs, score,
                                  score > self.unknown_threshold, conformal.prediction_sets(probs, self.set_threshold))

    def record(self) -> dict:
        """trust.json's content (the bank of features is stored beside it)."""
        return {"format_version": FORMAT_VERSION, "fitted_on": "validation", "n_calibration": self.n_calibration,
                "temperature": self.temperature, "temperature_note": self.temperature_note,
                "unknown": {"score": "knn_cosine_distance", "k": self.knn.k,
                            "threshold": _finite(self.unknown_threshold), "keep_known": self.keep_known,
                            "bank_size": int(len(self.knn.bank))},
                "prediction_sets": {"method": "split-conformal, score 1 - probability (before temperature)",
                                    "coverage": self.coverage, "threshold": _finite(self.set_threshold)},
                "assumption": ASSUMPTION}

    @classmethod
    def from_record(cls, record: dict, bank: np.ndarray) -> Trust:
        u, s = record["unknown"], record["prediction_sets"]
        return cls(temperature=float(record["temperature"]), knn=unknown.NearestNeighbourScore(bank, u["k"]),
                   unknown_threshold=_number(u["threshold"]), keep_known=float(u["keep_known"]),
                   set_threshold=_number(s["threshold"]), coverage=float(s["coverage"]),
                   n_calibration=int(record["n_calibration"]), temperature_note=record.get("temperature_note"))

    def test_report(self, probs: np.ndarray, labels: np.ndarray, trusted: TrustedPredictions, seed: int = 0) -> dict:
        """metrics.json's ``calibration``, ``unknown`` and ``prediction_sets`` for a labelled split
        (``trusted``: :meth:`apply` of the same images)."""
        labels = np.asarray(labels, dtype=np.int64)
        return {"calibration": calibration.calibration_report(labels, probs, self.temperature, seed)
                | {"note": self.temperature_note},
                "unknown": {"threshold": _finite(self.unknown_threshold), "keep_known": self.keep_known,
                            "known_kept": float(np.mean(~trusted.unknown)) if len(labels) else None,
                            "n": int(len(labels))},
                "prediction_sets": {"coverage": self.coverage,
                                    **conformal.set_report(probs, labels, self.set_threshold)}}


def _finite(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


def _number(value) -> float:
    return math.inf if value is None else float(value)


def load_trust(run_dir, config: dict) -> Trust | None:
    """A run directory's (:class:`~transferlab.io.rundir.RunDir`) trust layer, or None when it has none
    (or one made for other weights)."""
    found = run_dir.read_trust(config)
    return Trust.from_record(*found) if found is not None else None
