"""The life of a tracked run, and the rule that tracking never costs a run: the first failure of a tracker (a
server down, a full disk, a database locked for too long) is one warning, and that tracker is off for the rest
of the command; training goes on and its run directory is complete.

    tracking = open_tracking("mlflow", out)
    with tracking.run(name, config, tags) as tracked:      # starts the tracker's run
        Trainer(config, out, callbacks=tracked.callbacks).run()  # per-epoch metrics (EpochTracker)
        tracked.finished(out)                              # final metrics, figures and files at the end
    # an exception ends the tracker's run as FAILED (KILLED for Ctrl-C) and goes on up
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from ..config import TrainConfig
from ..errors import TrainingInterrupted
from ..training.loop import Callback, TrainLoop
from .records import FinalRecord, RunInfo, epoch_metrics, final_record, run_params
from .targets import TRAIN_EXPERIMENT, TrackTarget, mlflow_store, parse_targets

log = logging.getLogger("transferlab")


class Backend(Protocol):
    """One tracker (TensorBoard, MLflow). ``start`` returns the handle the other calls take."""

    label: str

    def start(self, info: RunInfo) -> object: ...

    def log_epoch(self, handle: object, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, handle: object, final: FinalRecord) -> None: ...

    def end(self, handle: object, status: str) -> None: ...


class Tracking:
    """The trackers of one command (none: every call does nothing)."""

    def __init__(self, backends: list[Backend] | None = None):
        self.backends = list(backends or [])

    def __bool__(self) -> bool:
        return bool(self.backends)

    def call(self, backend: Backend, action: str, fn: Callable, *args):
        """``fn(*args)``, unless the backend failed before; its first failure is one warning and turns it off."""
        if backend not in self.backends:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # whatever the tracker's library raises: the run must not depend on it
            self.backends.remove(backend)
            text = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning("tracking: %s could not %s (%s); it is off for the rest of this command (the run directory "
                        "on disk is complete)", backend.label, action, text)
            return None

    @contextlib.contextmanager
    def run(self, name: str, config: TrainConfig, tags: dict[str, str] | None = None) -> Iterator[TrackedRun]:
        tracked = TrackedRun(self, RunInfo(name, run_params(config) if self else {}, dict(tags or {})))
        try:
            yield tracked
        except BaseException as exc:
            tracked.end("KILLED" if isinstance(exc, KeyboardInterrupt | TrainingInterrupted) else "FAILED")
            raise
        tracked.close()


class TrackedRun:
    """One run as every live tracker sees it; ``callbacks`` go to the trainer."""

    def __init__(self, tracking: Tracking, info: RunInfo):
        self.tracking, self.info = tracking, info
        self.handles: dict[int, tuple[Backend, object]] = {}
        for backend in list(tracking.backends):
            handle = tracking.call(backend, "start a run", backend.start, info)
            if handle is not None:
                self.handles[id(backend)] = (backend, handle)
        self.callbacks: list[Callback] = [EpochTracker(self)] if self.handles else []
        self.run_dir: Path | None = None

    def _live(self) -> list[tuple[Backend, object]]:
        return [(b, h) for b, h in self.handles.values() if b in self.tracking.backends]

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        for backend, handle in self._live():
            self.tracking.call(backend, "log an epoch", backend.log_epoch, handle, step, metrics)

    def finished(self, run_dir: str | os.PathLike) -> None:
        """The run directory is complete: its results are logged when the ``with`` block ends."""
        self.run_dir = Path(run_dir)

    def close(self) -> None:
        live = self._live()
        if live and self.run_dir is not None:
            final = self.tracking.call(live[0][0], "read the run directory", final_record, self.run_dir)
            for backend, handle in self._live() if final is not None else ():
                self.tracking.call(backend, "log the results", backend.finish, handle, final)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        for backend, handle in self._live():
            self.tracking.call(backend, "end its run", backend.end, handle, status)
        self.handles.clear()


class EpochTracker(Callback):
    """Sends each epoch's history row to the trackers, at step = its row in history.csv (the count goes into
    the checkpoint, so a resumed run goes on counting)."""

    order = 1  # before early stopping and the deadline: a callback after one that stops never sees that epoch

    def __init__(self, tracked: TrackedRun) -> None:
        self.tracked, self.step = tracked, 0

    def after_epoch(self, loop: TrainLoop, row: dict) -> None:
        self.step += 1
        self.tracked.log_epoch(self.step, epoch_metrics(row))

    def state(self) -> tuple[dict, dict]:
        return {}, {"step": self.step}

    def load_state(self, tensors: dict, meta: dict) -> None:
        self.step = int(meta.get("step", 0))


def open_tracking(track, out: str | os.PathLike, *, experiment: bool = False) -> Tracking:
    """The trackers ``track`` asks for (see :func:`~transferlab.tracking.targets.parse_targets`), writing their
    default stores inside ``out`` (the run directory, or with ``experiment`` the experiment folder: one MLflow
    experiment named after it, one TensorBoard folder per run). A missing extra is a one-line error, raised
    before anything trains."""
    return Tracking([_backend(target, Path(out), experiment) for target in parse_targets(track)])


def _backend(target: TrackTarget, out: Path, experiment: bool) -> Backend:
    if target.kind == "tensorboard":
        from .tensorboard_backend import TensorBoardBackend

        return TensorBoardBackend(target, out, per_run=experiment)
    from .mlflow_backend import MlflowBackend

    uri, artifacts = mlflow_store(target, out)
    name = out.resolve().name if experiment else TRAIN_EXPERIMENT
    return MlflowBackend(uri, name, artifacts)
