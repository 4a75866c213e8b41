"""What ``--track`` accepts and where each tracker writes when no location is given (imports nothing heavy).

    --track tensorboard[=DIR]   event files: OUT/tensorboard (train); EXP_DIR/tensorboard/<run name>
                                (experiment); with DIR: DIR/<run name> for both
    --track mlflow[=URI]        an MLflow tracking URI; default: a SQLite store inside OUT or EXP_DIR,
                                sqlite:///OUT/mlruns.db, artifacts in OUT/mlartifacts/

SQLite because MLflow 3 refuses its file store (``./mlruns``) unless told otherwise; the database and the
artifacts sit beside the runs, so ``mlflow ui --backend-store-uri sqlite:///OUT/mlruns.db`` shows them and
deleting OUT deletes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import TransferlabError

KINDS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DATABASE = "mlruns.db"
MLFLOW_ARTIFACTS = "mlartifacts"
# Where the default stores sit inside a run directory (train): never logged as the run's own files.
STORE_NAMES = (TENSORBOARD_DIR, MLFLOW_DATABASE, f"{MLFLOW_DATABASE}.lock", MLFLOW_ARTIFACTS)
TRAIN_EXPERIMENT = "transferlab"  # the MLflow experiment of stand-alone `train` runs


@dataclass(frozen=True)
class TrackTarget:
    kind: str  # one of KINDS
    location: str | None = None  # DIR (tensorboard) or URI (mlflow); None: the default inside OUT

    def __str__(self) -> str:
        return self.kind if self.location is None else f"{self.kind}={self.location}"


def parse_targets(values: str | TrackTarget | list | tuple | None) -> list[TrackTarget]:
    """``"mlflow"``, ``"mlflow=http://host:5000"``, ``"tensorboard=DIR"`` or a list of them; one-line errors
    name ``--track``."""
    if values is None:
        return []
    items = [values] if isinstance(values, str | TrackTarget) else list(values)
    targets: list[TrackTarget] = []
    for item in items:
        if isinstance(item, TrackTarget):
            target = item
        else:
            kind, sep, location = str(item).partition("=")
            kind, location = kind.strip().lower(), location.strip()
            if kind not in KINDS:
                raise TransferlabError(f"--track {item}: choose tensorboard, tensorboard=DIR, mlflow or mlflow=URI")
            if sep and not location:
                raise TransferlabError(f"--track {item}: give a location after '=', or leave '=' out for the "
                                       "default inside the output folder")
            target = TrackTarget(kind, location or None)
        if any(t.kind == target.kind for t in targets):
            raise TransferlabError(f"--track {target}: {target.kind} is given twice")
        targets.append(target)
    return targets


def tensorboard_folder(target: TrackTarget, out: str | os.PathLike, run_name: str, per_run: bool) -> Path:
    """The event folder of one run; ``per_run``: an experiment's run (one folder per run under the root)."""
    if target.location is not None:
        return Path(target.location) / run_name
    root = Path(out) / TENSORBOARD_DIR
    return root / run_name if per_run else root


def mlflow_store(target: TrackTarget, out: str | os.PathLike) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment; None: the server's own)."""
    if target.location is not None:
        return target.location, None
    out = Path(out).resolve()
    return f"sqlite:///{out / MLFLOW_DATABASE}", (out / MLFLOW_ARTIFACTS).as_uri()
