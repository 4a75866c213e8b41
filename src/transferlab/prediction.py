"""Predictions for image files, the same records whichever engine computes the probabilities (torch or the
exported model on ONNX Runtime). Imports no torch.

One record per image: ``{"path", "label", "score", "top_k": [[class, probability], ...]}``, or
``{"path", "error"}`` for a file that does not decode. A run with a trust layer (fitted on a validation
split, :mod:`transferlab.trust`) gives calibrated probabilities in ``score`` and ``top_k`` (the label is
unchanged) and adds ``"unknown"`` (bool), ``"unknown_score"`` and ``"prediction_set"`` (classes).

A predictor's ``predict_outputs(images)`` returns the probabilities (n, classes) and the
:class:`~transferlab.trust.model.TrustedPredictions` of the batch (None without a trust layer).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .data.discovery import is_image_file
from .errors import TransferlabError


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; folders expanded to the image files inside them (recursively, sorted)."""
    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p)
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        else:
            paths.append(item)
    return paths


def check_prediction_options(top_k: int, batch_size: int) -> None:
    if top_k < 1:
        raise TransferlabError(f"--top-k {top_k}: must be at least 1")
    if batch_size < 1:
        raise TransferlabError(f"--batch-size {batch_size}: must be at least 1")


def record(path: str | os.PathLike, probs: np.ndarray, classes: list[str], top_k: int) -> dict:
    """The record of one image from its class probabilities (ties: the lower class index first)."""
    order = np.argsort(-np.asarray(probs, dtype=np.float64), kind="stable")[:min(top_k, len(classes))]
    ranked = [[classes[int(i)], round(float(probs[int(i)]), 6)] for i in order]
    return {"path": str(path), "label": ranked[0][0], "score": ranked[0][1], "top_k": ranked}


def batch_records(names: Sequence[str], probs: np.ndarray, trusted, classes: list[str], top_k: int) -> list[dict]:
    """The records of a batch from ``predict_outputs``'s result."""
    if trusted is None:
        return [record(name, p, classes, top_k) for name, p in zip(names, probs, strict=True)]
    return [record(name, trusted.probs[i], classes, top_k) | trusted.fields(i, classes)
            for i, name in enumerate(names)]


def stream(paths: Sequence[Path], decoded: Iterable[tuple[object | None, str | None]],
           predict_outputs: Callable[[list], tuple], classes: list[str], top_k: int, batch_size: int
           ) -> Iterator[dict]:
    """Records in input order; ``decoded`` yields (image, None) or (None, reason) per path, and
    ``predict_outputs`` turns a list of decoded images into (probabilities, trusted predictions or None),
    ``batch_size`` images at a time."""
    chunk: list[tuple[Path, object | None, str | None]] = []

    def flush() -> Iterator[dict]:
        good = [(path, image) for path, image, _ in chunk if image is not None]
        records = iter(batch_records([str(path) for path, _ in good], *predict_outputs([i for _, i in good]),
                                     classes, top_k) if good else [])
        for path, image, error in chunk:
            yield {"path": str(path), "error": error} if image is None else next(records)
        chunk.clear()

    for path, (image, error) in zip(paths, decoded, strict=True):
        chunk.append((path, image, error))
        if len(chunk) == batch_size:
            yield from flush()
    yield from flush()


TRUST_COLUMNS = ("unknown", "unknown_score", "prediction_set")


def csv_header(top_k: int, trusted: bool = False) -> list[str]:
    return ["path", "label", "score", *[f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "score")],
            "error", *(TRUST_COLUMNS if trusted else ())]


def csv_line(row: dict, top_k: int, trusted: bool = False) -> str:
    """One record as a CSV line (``--format csv``): path, label, score, label_1, score_1, ..., error, then
    with a trust layer unknown, unknown_score and the prediction set (classes joined by ``;``)."""
    ranked = row.get("top_k", [])
    cells = [row["path"], row.get("label", ""), row.get("score", "")]
    for i in range(top_k):
        cells += ranked[i] if i < len(ranked) else ["", ""]
    cells.append(row.get("error", ""))
    if trusted:
        unknown = str(row["unknown"]).lower() if "unknown" in row else ""
        cells += [unknown, row.get("unknown_score", ""), ";".join(row.get("prediction_set", []))]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(cells)
    return buffer.getvalue()
