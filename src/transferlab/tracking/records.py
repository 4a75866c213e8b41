"""What a tracker is given, read from the same records the run directory holds (the files on disk stay the source
of truth; a tracker only shows them):

- parameters: the resolved training options, as config.json's ``train`` records them;
- per epoch, at step = the row of history.csv (1-based, over every stage): train_loss, train_acc, val_loss,
  val_acc, lr, epoch_seconds;
- at the end: metrics.json's numbers as ``test_<name>`` (timings keep their ``*_seconds`` name, the accuracy
  interval becomes ``test_accuracy_ci95_low/high``, ``n_test`` ``test_images``) and each ``--eval-on``
  folder's as ``<folder>_<name>``; the figures (every PNG of the run directory); the run directory's files (the
  checkpoint, temporary files and the tracking stores aside).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainConfig
from ..io.rundir import CHECKPOINT_DIR, EVALUATIONS_DIR, RunDir
from .targets import STORE_NAMES

EPOCH_METRICS = {"train_loss": "train_loss", "train_acc": "train_acc", "val_loss": "val_loss", "val_acc": "val_acc",
                 "lr": "lr", "seconds": "epoch_seconds"}
FIGURES_PATH = "figures"  # artifact folder of the figures
RUN_DIR_PATH = "run_dir"  # artifact folder of the run directory's files


@dataclass
class RunInfo:
    """One tracked run: its name, parameters and tags (strings)."""

    name: str
    params: dict
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class FinalRecord:
    """What a finished run adds: its numbers, its figures as (file, path in the run directory without the
    suffix), and its files as (file, artifact folder)."""

    run_dir: Path
    metrics: dict[str, float]
    figures: list[tuple[Path, str]]
    files: list[tuple[Path, str]]


def run_params(config: TrainConfig) -> dict:
    """The options as the run records them (config.json's ``train``: resolved, paths absolute)."""
    return config.resolved().with_absolute_paths().to_dict()


def epoch_metrics(row: dict) -> dict[str, float]:
    return {name: float(row[key]) for key, name in EPOCH_METRICS.items() if row.get(key) is not None}


def _numbers(metrics: dict, prefix: str) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            name = "images" if key == "n_test" else key
            out[key if key.endswith("_seconds") else f"{prefix}_{name}"] = float(value)
        elif key == "accuracy_ci95" and isinstance(value, list) and len(value) == 2:
            out[f"{prefix}_accuracy_ci95_low"], out[f"{prefix}_accuracy_ci95_high"] = map(float, value)
    return out


def final_record(run_dir: str | os.PathLike) -> FinalRecord:
    directory = RunDir(run_dir)
    metrics = _numbers(directory.read_metrics() or {}, "test")
    for folder in sorted(p for p in (directory.path / EVALUATIONS_DIR).glob("*") if p.is_dir()):
        record = directory.evaluation(folder.name).read_metrics()
        if record:
            metrics |= {k: v for k, v in _numbers(record, folder.name).items() if not k.endswith("_seconds")}
    files = []
    for path in sorted(_run_files(directory.path)):
        parent = path.parent.relative_to(directory.path).as_posix()
        files.append((path, RUN_DIR_PATH if parent == "." else f"{RUN_DIR_PATH}/{parent}"))
    figures = [(p, p.relative_to(directory.path).with_suffix("").as_posix()) for p, _ in files if p.suffix == ".png"]
    return FinalRecord(directory.path, metrics, figures, files)


def _run_files(root: Path):
    for path in root.iterdir():
        if path.name.startswith(".") or path.name == CHECKPOINT_DIR or path.name in STORE_NAMES:
            continue
        if path.is_dir():
            yield from (p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            yield path
