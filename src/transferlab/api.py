"""The public Python API: ``train``, ``evaluate``, ``load_run``, ``load_predictor``, ``export``,
``run_experiment``, ``render_report``.

A thin front: each function checks its arguments and hands over to the module that owns the work; the
modules are imported inside the functions, so ``import transferlab.api`` stays light and a torch-free
``predict`` never imports torch. The CLI only calls these.
"""

from __future__ import annotations

import logging
import os

from .config import TrainConfig
from .errors import TransferlabError

__all__ = ["audit", "train", "evaluate", "load_run", "load_predictor", "export", "explain_images", "serve",
           "run_experiment",
           "render_report"]

log = logging.getLogger("transferlab")


def load_run(directory: str | os.PathLike, precision: str = "auto", device: str = "auto"):
    """The trained :class:`~transferlab.run.Run` in a run directory (torch)."""
    from .run import Run

    return Run.load(directory, precision=precision, device=device)


def train(data_dir: str | os.PathLike | None = None, out: str | os.PathLike = "run",
          config: TrainConfig | None = None, *, resume: bool = False, callbacks=(), export: bool = True,
          track=None, **options):
    """Train a classifier on an image folder and write a run directory.

    ``options`` are :class:`TrainConfig` fields (``strategy="freeze"``, ``head="512x128"``, ...) and
    override ``config``. ``strategy="auto"`` searches strategies, backbones, resolutions and heads (see
    :mod:`transferlab.auto.search`); the backbone, image size or head given here fix that axis of the search.
    ``callbacks``: extra :class:`~transferlab.training.loop.Callback` objects for every
    training stage (a tracker, gradient clipping). ``export``: also write RUN_DIR/model.onnx, which
    ``predict`` runs without torch. ``track``: ``"tensorboard"``, ``"mlflow"``, ``"mlflow=URI"`` (or a list):
    mirror the run there (:mod:`transferlab.tracking`; not part of the run's identity). Returns the trained
    :class:`~transferlab.run.Run`; under torchrun (:mod:`transferlab.training.distributed`) every process
    calls this, rank 0 gets the Run and the others None.
    """
    from pathlib import Path

    from .tracking import open_tracking
    from .training.distributed import check_supported, from_environment
    from .training.trainer import Trainer

    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"train: unknown option '{unknown[0]}'")
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    cfg = (config or TrainConfig()).replace(**options)
    check_supported(cfg)
    if not from_environment().is_main:  # under torchrun rank 0 alone reports to trackers
        track = None
    tracking = open_tracking(track, out)
    with tracking.run(Path(out).resolve().name, cfg) as tracked:
        every = [*callbacks, *tracked.callbacks]
        if cfg.strategy == "auto":
            from .auto.search import AutoSearch

            defaults = TrainConfig()
            given = set(options) | {name for name in TrainConfig.field_names()
                                    if config is not None and getattr(config, name) != getattr(defaults, name)}
            run = AutoSearch(cfg, out, given=given, callbacks=every, export=export).run()
        else:
            run = Trainer(cfg, out, resume=resume, callbacks=every, export=export).run()
        if run is not None:
            tracked.finished(run.directory)
    return run


def evaluate(run, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, **options) -> dict:
    """Evaluate a run (a :class:`~transferlab.run.Run` or its directory) on another image folder; ``options``:
    ``class_map``, ``strict``, ``tta``, ``engine``, ``unknown_dir`` (see :func:`transferlab.evaluation.evaluate`)."""
    from .evaluation import evaluate as evaluate_run

    return evaluate_run(run, data_dir, out, **options)


def load_predictor(directory: str | os.PathLike, *, precision: str = "auto", device: str = "auto",
                   engine: str = "auto", tta: bool | None = None):
    """What ``predict`` runs (see :func:`transferlab.predictor.load_predictor`): the exported model without
    torch when the run holds a current one and the options allow it, else the torch Run."""
    from .predictor import load_predictor as load

    return load(directory, precision=precision, device=device, engine=engine, tta=tta)


def export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, quantize: str | None = None,
           calibration: str | os.PathLike | None = None):
    """Export a run to ONNX (and int8 with ``quantize="int8"``); see :mod:`transferlab.deployment`."""
    from .deployment import export_run

    return export_run(run_dir, out, quantize=quantize, calibration=calibration)


def explain_images(run_dir: str | os.PathLike, records: list[dict], out_dir: str | os.PathLike) -> list[str]:
    """Grad-CAM overlays for prediction records (``predict --gradcam``); see :mod:`transferlab.explain`."""
    from .explain import Explainer, write_overlays

    return write_overlays(Explainer(run_dir), records, out_dir)


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """Serve the run's page and JSON API with uvicorn until interrupted (:mod:`transferlab.serve.app`);
    ``settings``: the fields of :class:`~transferlab.serve.app.ServeSettings` (max_upload_mb, batch_size,
    queue_size, explain, cors_origins, ...)."""
    try:
        import uvicorn

        from .serve.app import ServeSettings, create_app
    except ImportError as exc:
        raise TransferlabError(f"serve needs the serve extra ({exc.name} is missing): "
                               "pip install 'transferlab[serve]'") from None
    try:
        options = ServeSettings(**settings)
    except TypeError as exc:
        raise TransferlabError(f"serve: {exc}") from None
    for name in ("max_upload_mb", "batch_size", "queue_size"):
        if getattr(options, name) <= 0:
            raise TransferlabError(f"--{name.replace('_', '-')} {getattr(options, name)}: must be positive")
    app = create_app(run_dir, options)
    log.info("serving %s on http://%s:%d (OpenAPI docs at /docs)", run_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def audit(data_dir: str | os.PathLike, out: str | os.PathLike = "audit", *, folds: int = 5,
          config: TrainConfig | None = None, render: bool = True, **options):
    """Audit an image folder (:mod:`transferlab.audit`): label issues from k-fold heads on frozen features
    ranked by cleanlab, exact and near duplicates, a learning curve ("how many more images"), data health.
    Writes AUDIT_DIR/audit.json, label_issues.csv, the figures and (``render``) audit.html. ``options``:
    :class:`TrainConfig` fields that choose the features (backbone, weights, image_size, precision, device,
    engine, cache_dir, seed, test_dir, labels). Returns an :class:`~transferlab.audit.auditor.AuditResult`."""
    from .audit.auditor import AuditResult, run_audit
    from .io.auditdir import AuditDir
    from .report.audit import render_audit

    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"audit: unknown option '{unknown[0]}'")
    cfg = (config or TrainConfig()).replace(**options, data_dir=str(data_dir))
    cfg.validate()
    record = run_audit(cfg, out, folds=folds)
    page = render_audit(out, record) if render else AuditDir(out).page
    return AuditResult(AuditDir(out).path, record, page)


def run_experiment(data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
                   render: bool = True, shard=None, track=None, **spec):
    """Train every combination of a grid, evaluate each run on the ``eval_on`` folders, compute the
    reference rows and the leakage check (:mod:`transferlab.experiment`), then write results.csv,
    results.md, the charts and report.html (:mod:`transferlab.report`).

    ``spec``: the fields of :class:`~transferlab.experiment.spec.ExperimentSpec` (``strategies``,
    ``optimizers``, ``heads``, ``backbones``, ``seeds`` as lists or comma-separated strings; ``eval_on``,
    ``epochs``, ``class_map``, ``question``, ``options`` = further TrainConfig fields, ...).
    ``shard``: ``"K/N"``, train only worker K's share (:mod:`transferlab.experiment.shard`); the results and the
    report are written by the worker that finds the whole grid finished. ``track``: as for :func:`train`, one
    MLflow experiment (or TensorBoard folder per run) for the grid.
    Returns an :class:`~transferlab.experiment.runner.ExperimentResult`.
    """
    from .experiment.runner import run_grid
    from .experiment.spec import ExperimentSpec
    from .io.expdir import ExperimentDir
    from .report.html import render_report as render
    from .report.write import write_results

    experiment = ExperimentSpec.create(data_dir, out, **spec)
    result = run_grid(experiment, shard=shard, track=track)
    if result.waiting:  # a shard whose siblings are still training
        return result
    if experiment.audit:
        from .report.audit import render_audit

        render_audit(ExperimentDir(result.directory).audit)
    result.results = write_results(result.directory)
    result.report = render(result.directory, result.results) if render else ExperimentDir(result.directory).report
    return result


def render_report(exp_dir: str | os.PathLike, results: dict | None = None):
    """Render EXP_DIR/report.html; without ``results`` (from :func:`transferlab.report.write.write_results`)
    results.csv, results.md and the charts are re-written from the files on disk first."""
    from .report.html import render_report as render

    return render(exp_dir, results)
