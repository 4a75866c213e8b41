""""Unknown" images: the cosine distance from an image's pooled features to its k-th nearest training image
(Sun et al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022), against a threshold
set on the held-out split.

Chosen by measurement (``benchmarks/unknown_scores.py``, thresholds set on the validation split to keep
95% of known images): on a hymenoptera model this score (k = 5) flags 99.8% of cats_and_dogs and 99.7% of
aid_dev images, the maximum probability 26% and 6%, the energy score 56% and 10%. It measures how unlike the
training images an image is, so it catches very different images; it is weak on look-alikes: a model of 12
oxford17 species flags 37% of the 5 other species' images (the maximum probability 66%), and all of aid_dev.

The threshold is the conformal quantile of the held-out images' scores at ``keep_known``: a known image
(exchangeable with the held-out ones) is kept with probability at least ``keep_known``.
"""

from __future__ import annotations

import numpy as np

from .conformal import upper_quantile

NEIGHBOURS = 5
MAX_BANK = 20_000  # training feature vectors kept in a run (float16: 50 MB at 1280 dimensions)


def normalised(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)


def bank_of(train_features: np.ndarray, seed: int = 0, limit: int = MAX_BANK) -> np.ndarray:
    """The training features a run keeps: L2-normalised, float16, a seeded sample of ``limit`` at most."""
    rows = np.arange(len(train_features))
    if len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return normalised(np.asarray(train_features)[rows]).astype(np.float16)


class NearestNeighbourScore:
    """Unknown score = 1 - cosine similarity to the k-th most similar training image (0: a copy of one)."""

    def __init__(self, bank: np.ndarray, k: int = NEIGHBOURS):
        if len(bank) == 0:
            raise ValueError("the bank of training features is empty")
        self.bank = np.asarray(bank, dtype=np.float32)
        self.k = max(1, min(int(k), len(self.bank)))

    def __call__(self, features: np.ndarray, chunk: int = 256) -> np.ndarray:
        features = normalised(features)
        scores = np.empty(len(features), dtype=np.float64)
        for start in range(0, len(features), chunk):  # bounded memory: chunk x bank similarities at a time
            similarity = features[start:start + chunk] @ self.bank.T
            kth = np.partition(similarity, -self.k, axis=1)[:, -self.k]
            scores[start:start + chunk] = 1.0 - kth
        return scores


def fit_threshold(held_out_scores: np.ndarray, keep_known: float) -> float:
    return upper_quantile(held_out_scores, keep_known)
