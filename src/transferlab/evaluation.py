"""Evaluate a trained run on another image folder: the study's cross-dataset step."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np

from .data.discovery import Sample, class_counts, discover_evaluation
from .data.images import DecodedImages, collect_decoded, iter_decoded
from .errors import TransferlabError
from .io.files import check_writable_dir, read_json
from .io.rundir import EVALUATIONS_DIR, EvaluationDir, MetricsRecord
from .metrics import compute_metrics
from .run import Run

log = logging.getLogger("transferlab")


def load_class_map(value: str | dict | None) -> dict[str, str]:
    """``--class-map``: a JSON object {dataset class: model class}, inline, in a file, or already a dict."""
    if isinstance(value, dict):
        return value
    if not value:
        return {}
    path = Path(value)
    try:
        mapping = read_json(path) if path.is_file() else json.loads(value)
    except json.JSONDecodeError:
        raise TransferlabError(f"--class-map {value}: neither a JSON file nor inline JSON") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise TransferlabError(f"--class-map {value}: must be a JSON object of class name -> class name")
    return mapping


def labelled_for_model(samples: list[Sample], classes: list[str], mapping: dict[str, str], what: str,
                       known_as: str = "the model's classes") -> list[Sample]:
    """The samples with their class renamed by ``mapping``; a class the model does not know is an error
    naming ``what`` (the folder's option)."""
    unknown = [s.label for s in samples if mapping.get(s.label, s.label) not in classes]
    if unknown:
        raise TransferlabError(f"{what}: class '{unknown[0]}' is not one of {known_as} "
                               f"({', '.join(classes)}); map it with --class-map")
    return [Sample(s.path, mapping.get(s.label, s.label)) for s in samples]


def evaluate(run: Run | str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
             class_map: dict[str, str] | str | None = None, strict: bool = False,
             unknown_dir: str | os.PathLike | None = None, **inference) -> MetricsRecord:
    """Evaluate a trained run on another image folder (classes matched by name, subsets allowed).

    ``data_dir`` is a class-folder tree, or a dataset with a train/test layout (its test split is used).
    Writes metrics.json, confusion_matrix.png and data_report.json to ``out`` (default
    RUN_DIR/evaluations/<folder name>) and returns the metrics. ``inference``: ``tta`` and ``engine``, which
    override the run's (None: keep it).
    A run with a trust layer adds calibration, unknown and prediction-set figures; ``unknown_dir``: a folder
    of images of none of the classes, scored against ``data_dir``'s (AUROC, share flagged).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    unknown_options = sorted(set(inference) - {"tta", "engine"})
    if unknown_options:
        raise TransferlabError(f"evaluate: unknown option '{unknown_options[0]}'")
    for name, value in inference.items():
        if value is not None:
            setattr(run, name, value)
    mapping = load_class_map(class_map)
    data_dir = Path(data_dir)
    if unknown_dir is not None and run.trust is None:
        raise TransferlabError(f"--unknown {unknown_dir}: {run.directory} has no trust layer (train it with a "
                               "validation split, e.g. --val-size 0.15)")
    if unknown_dir is not None and not Path(unknown_dir).is_dir():
        raise TransferlabError(f"--unknown {unknown_dir}: folder not found")
    listed, layout = discover_evaluation(data_dir)
    target = EvaluationDir(check_writable_dir(out if out is not None else
                                              run.directory / EVALUATIONS_DIR / data_dir.resolve().name))
    model_label = {s.path: m.label for s, m in zip(listed, labelled_for_model(listed, run.classes, mapping,
                                                                           f"DATA_DIR {data_dir}"), strict=True)}
    decoded, probs, trusted = _predict_streaming(run, listed, strict, "evaluating")
    index = {c: i for i, c in enumerate(run.classes)}
    y_true = np.array([index[model_label[s.path]] for s in decoded.samples], dtype=np.int64)
    if len(y_true) == 0:
        raise TransferlabError(f"DATA_DIR {data_dir}: no usable images")
    metrics = compute_metrics(y_true, probs, run.classes)
    if run.trust is not None:
        from .trust.model import ASSUMPTION

        metrics |= run.trust.test_report(probs, y_true, trusted)
        metrics["trust_assumption"] = ASSUMPTION
        log.warning("calibration, unknown and prediction sets: %s; %s may not be", ASSUMPTION, data_dir)
        if unknown_dir is not None:
            metrics["unknown"] |= _unknown_folder(run, Path(unknown_dir), trusted.unknown_score, strict)
    metrics["data_dir"] = str(data_dir.resolve())
    metrics["tta"] = run.tta
    report = {"data_dir": str(data_dir.resolve()), "layout": layout, "class_map": mapping,
              "counts": {"evaluation": class_counts([Sample(s.path, model_label[s.path]) for s in decoded.samples],
                                                    run.classes)},
              "skipped": decoded.skipped}
    target.write(metrics, report, title=f"Confusion matrix ({data_dir.name})")
    log.info("accuracy %.4f on %d images of %s; written to %s", metrics["accuracy"], len(y_true), data_dir,
             target.path)
    return metrics


EVALUATION_CHUNK = 256  # decoded images held at once: memory does not grow with the folder


def _predict_streaming(run: Run, samples: list[Sample], strict: bool, desc: str):
    """(the decoding record, probabilities, trusted predictions or None) of ``samples``, decoded in background
    threads and predicted :data:`EVALUATION_CHUNK` images at a time."""
    from .trust.model import TrustedPredictions

    chunk, probs, trusted = [], [], []

    def flush() -> None:
        p, t = run.predict_outputs(chunk, n_images=len(samples))
        probs.append(p)
        trusted.append(t)
        chunk.clear()

    def add(_sample: Sample, image) -> None:
        chunk.append(image)
        if len(chunk) == EVALUATION_CHUNK:
            flush()

    decoded: DecodedImages = collect_decoded(samples, iter_decoded([s.path for s in samples], run.preprocess),
                                             strict, desc, on_image=add)
    if chunk:
        flush()
    if not probs:
        return decoded, np.zeros((0, len(run.classes))), None
    merged = None
    if trusted[0] is not None:
        merged = TrustedPredictions(**{f.name: np.concatenate([getattr(t, f.name) for t in trusted])
                                       for f in dataclasses.fields(TrustedPredictions)})
    return decoded, np.concatenate(probs), merged


def _unknown_folder(run: Run, folder: Path, known_scores: np.ndarray, strict: bool) -> dict:
    """The unknown score on a folder of images of none of the classes, against the known images' scores."""
    from .metrics import binary_roc_auc
    from .prediction import expand_image_paths

    paths = expand_image_paths([folder])
    decoded, _, trusted = _predict_streaming(run, [Sample(p, "") for p in paths], strict, "unknown images")
    if not decoded.samples:
        raise TransferlabError(f"--unknown {folder}: no usable images")
    scores = np.concatenate([known_scores, trusted.unknown_score])
    is_unknown = np.r_[np.zeros(len(known_scores), bool), np.ones(len(trusted.unknown_score), bool)]
    return {"unknown_dir": str(folder.resolve()), "n_unknown": len(trusted.unknown_score),
            "unknown_flagged": float(trusted.unknown.mean()), "auroc": binary_roc_auc(is_unknown, scores)}
