"""Duplicate images: exact (the same bytes) and near (frozen features nearly identical), grouped.

One group per set of images connected by duplicate pairs, within a split or across splits; groups whose
members carry different labels (a conflict) come first, then those that span splits (a test image with a
copy in train inflates the test score), then the larger ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Cosine similarity of frozen pooled features (efficientnet_lite0, 224 px) above which two images count as
# near duplicates; the experiment's leakage check uses it too. Measured by benchmarks/duplicate_threshold.py
# (docs/audit.md), share of the copies of hymenoptera's 398 images above 0.95: JPEG re-encoded at quality 90
# 100%, at quality 70 73%, resized to 80% 99%, flipped 82%. Distinct files reach 0.81 (hymenoptera), 0.86
# (cats_and_dogs, 3000 images, whose one pair above is a real duplicate at 0.99) and 0.95 (two forest tiles of
# aid_dev: aerial texture is self-similar), so a lower threshold would group distinct photos.
NEAR_DUPLICATE_THRESHOLD = 0.95
_CHUNK = 512  # rows of the similarity matrix computed at a time (memory stays O(chunk x n))


@dataclass(frozen=True)
class Item:
    path: str
    label: str
    split: str


def similar_pairs(features: np.ndarray, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for i < j with cosine above ``threshold``."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)
    pairs = []
    for start in range(0, len(x), _CHUNK):
        sims = x[start:start + _CHUNK] @ x.T
        rows, cols = np.nonzero(sims > threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if start + r < c:
                pairs.append((start + r, c, float(sims[r, c])))
    return pairs


def exact_pairs(digests: Sequence[str | None]) -> list[tuple[int, int, float]]:
    """Pairs of items with the same file digest (each later copy paired with the first)."""
    first: dict[str, int] = {}
    pairs = []
    for i, digest in enumerate(digests):
        if digest is None:
            continue
        if digest in first:
            pairs.append((first[digest], i, 1.0))
        else:
            first[digest] = i
    return pairs


def _components(n: int, pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for k in sorted({k for i, j, _ in pairs for k in (i, j)}):
        groups[root(k)].append(k)
    return list(groups.values())


def duplicate_groups(items: Sequence[Item], digests: Sequence[str | None], features: np.ndarray | None,
                     threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[dict]:
    """Groups of exact and near duplicates among ``items`` (``features`` rows in the same order; None:
    exact duplicates only)."""
    exact = exact_pairs(digests)
    near = similar_pairs(features, threshold) if features is not None and len(items) > 1 else []
    is_exact = {(i, j) for i, j, _ in exact}
    groups = []
    for members in _components(len(items), exact + near):
        labels = sorted({items[k].label for k in members})
        splits = sorted({items[k].split for k in members})
        kind = "exact" if all(d == digests[members[0]] for d in (digests[k] for k in members)) else "near"
        pair_sims = [s for i, j, s in near if i in members and j in members and (i, j) not in is_exact]
        groups.append({
            "kind": kind, "conflict": len(labels) > 1, "cross_split": len(splits) > 1,
            "labels": labels, "splits": splits,
            "min_similarity": round(min(pair_sims), 4) if pair_sims else 1.0,
            "members": [{"path": items[k].path, "label": items[k].label, "split": items[k].split}
                        for k in members],
        })
    groups.sort(key=lambda g: (not g["conflict"], not g["cross_split"], -len(g["members"]), g["members"][0]["path"]))
    return groups
