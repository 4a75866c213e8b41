"""The public Python API: ``train``, ``evaluate``, ``load_run``, ``run_experiment``, ``render_report``.

A thin front: each function checks its arguments and hands over to the module that owns the work. The CLI
only calls these.
"""

from __future__ import annotations

import os

from .config import TrainConfig
from .errors import TransferlabError
from .evaluation import evaluate
from .run import Run

__all__ = ["train", "evaluate", "load_run", "run_experiment", "render_report"]


def load_run(directory: str | os.PathLike, precision: str = "auto", device: str = "auto") -> Run:
    return Run.load(directory, precision=precision, device=device)


def train(data_dir: str | os.PathLike | None = None, out: str | os.PathLike = "run",
          config: TrainConfig | None = None, *, shared_dir: str | os.PathLike | None = None, resume: bool = False,
          callbacks=(), **options) -> Run:
    """Train a classifier on an image folder and write a run directory.

    ``options`` are :class:`TrainConfig` fields (``strategy="freeze"``, ``head="512x128"``, ...) and
    override ``config``. ``shared_dir`` (experiments): with ``strategy="freeze"`` the unchanged backbone
    weights go to a content-addressed file there, hard-linked into the run. ``callbacks``: extra
    :class:`~transferlab.training.loop.Callback` objects for every training stage (a tracker, gradient
    clipping). Returns the trained :class:`Run`.
    """
    from .training.trainer import Trainer

    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"train: unknown option '{unknown[0]}'")
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    cfg = (config or TrainConfig()).replace(**options)
    return Trainer(cfg, out, shared_dir=shared_dir, resume=resume, callbacks=callbacks).run()


def run_experiment(data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
                   render: bool = True, **spec):
    """Train every combination of a grid, evaluate each run on the ``eval_on`` folders, compute the
    reference rows and the leakage check (:mod:`transferlab.experiment`), then write results.csv,
    results.md, the charts and report.html (:mod:`transferlab.report`).

    ``spec``: the fields of :class:`~transferlab.experiment.spec.ExperimentSpec` (``strategies``,
    ``optimizers``, ``heads``, ``backbones``, ``seeds`` as lists or comma-separated strings; ``eval_on``,
    ``epochs``, ``class_map``, ``question``, ``options`` = further TrainConfig fields, ...).
    Returns an :class:`~transferlab.experiment.runner.ExperimentResult`.
    """
    from .experiment.runner import run_grid
    from .experiment.spec import ExperimentSpec
    from .report.html import render_report as render
    from .report.write import write_results

    result = run_grid(ExperimentSpec.create(data_dir, out, **spec))
    result.results = write_results(result.directory)
    if render:
        result.report = render(result.directory, result.results)
    return result


def render_report(exp_dir: str | os.PathLike):
    """Re-write EXP_DIR's results.csv, results.md and charts from the files on disk, then report.html."""
    from .report.html import render_report as render

    return render(exp_dir)
