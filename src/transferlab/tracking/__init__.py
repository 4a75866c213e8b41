"""Tracking runs in TensorBoard or MLflow (``--track``; the optional extras ``transferlab[tensorboard]`` and
``transferlab[mlflow]``, imported only when asked for).

A tracker is a mirror of the run directory, never its replacement: what it is sent is read from the same
records (:mod:`~transferlab.tracking.records`), a failure is one warning (:mod:`~transferlab.tracking.core`),
and tracking is not part of a run's identity (it is an argument of ``train`` and the experiment runner, not a
:class:`~transferlab.config.TrainConfig` field, so config.json, checkpoints and run hashes do not see it).
"""

from .core import EpochTracker, Tracking, open_tracking
from .targets import TrackTarget, parse_targets

__all__ = ["EpochTracker", "TrackTarget", "Tracking", "open_tracking", "parse_targets"]
