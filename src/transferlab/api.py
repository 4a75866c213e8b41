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

__all__ = ["train", "evaluate", "load_run", "load_predictor", "export", "run_experiment", "render_report"]

log = logging.getLogger("transferlab")


def load_run(directory: str | os.PathLike, precision: str = "auto", device: str = "auto"):
    """The trained :class:`~transferlab.run.Run` in a run directory (torch)."""
    from .run import Run

    return Run.load(directory, precision=precision, device=device)


def train(data_dir: str | os.PathLike | None = None, out: str | os.PathLike = "run",
          config: TrainConfig | None = None, *, resume: bool = False, callbacks=(), export: bool = True,
          **options):
    """Train a classifier on an image folder and write a run directory.

    ``options`` are :class:`TrainConfig` fields (``strategy="freeze"``, ``head="512x128"``, ...) and
    override ``config``. ``callbacks``: extra :class:`~transferlab.training.loop.Callback` objects for every
    training stage (a tracker, gradient clipping). ``export``: also write RUN_DIR/model.onnx, which
    ``predict`` runs without torch. Returns the trained :class:`~transferlab.run.Run`.
    """
    from .training.trainer import Trainer

    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"train: unknown option '{unknown[0]}'")
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    cfg = (config or TrainConfig()).replace(**options)
    return Trainer(cfg, out, resume=resume, callbacks=callbacks, export=export).run()


def evaluate(run, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, **options) -> dict:
    """Evaluate a run (a :class:`~transferlab.run.Run` or its directory) on another image folder; ``options``:
    ``class_map``, ``strict``, ``tta``, ``engine`` (see :func:`transferlab.evaluation.evaluate`)."""
    from .evaluation import evaluate as evaluate_run

    return evaluate_run(run, data_dir, out, **options)


def load_predictor(directory: str | os.PathLike, *, precision: str = "auto", device: str = "auto",
                   engine: str = "auto", tta: bool | None = None):
    """What ``predict`` runs: the run's exported model on ONNX Runtime without torch when the run holds a
    current one and the options allow it (fp32 on the CPU, no test-time augmentation, ``engine`` auto or
    onnxruntime); otherwise the torch :class:`~transferlab.run.Run`, with one log line saying why. Both have
    ``iter_predictions(inputs, top_k, batch_size)``."""
    from .io.rundir import RunDir
    from .options import DEVICES, ENGINES, PRECISIONS, check_choice

    for option, value, allowed in (("precision", precision, PRECISIONS), ("device", device, DEVICES),
                                   ("engine", engine, ENGINES)):
        check_choice(option, value, allowed)
    config = RunDir(directory).read_config()
    tta = bool(config["train"].get("tta", False)) if tta is None else tta
    reason = _needs_torch(precision, device, engine, tta)
    if reason is None:
        from .runtime.onnx_classifier import OnnxClassifier

        classifier, reason = OnnxClassifier.from_run(directory)
        if classifier is not None:
            return classifier
    log.info("predict runs on torch: %s", reason)
    run = load_run(directory, precision=precision, device=device)
    run.tta, run.engine = tta, engine
    return run


def _needs_torch(precision: str, device: str, engine: str, tta: bool) -> str | None:
    if engine == "torch":
        return "--engine torch"
    if precision not in ("auto", "fp32") or device not in ("auto", "cpu"):
        return f"--precision {precision} --device {device} (the exported model runs fp32 on the CPU)"
    if tta:
        return "test-time augmentation (its views resize tensors)"
    return None


def export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, quantize: str | None = None,
           calibration: str | os.PathLike | None = None):
    """Export a run to ONNX (and int8 with ``quantize="int8"``); see :mod:`transferlab.deployment`."""
    from .deployment import export_run

    return export_run(run_dir, out, quantize=quantize, calibration=calibration)


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
    from .io.expdir import ExperimentDir
    from .report.html import render_report as render
    from .report.write import write_results

    result = run_grid(ExperimentSpec.create(data_dir, out, **spec))
    result.results = write_results(result.directory)
    result.report = render(result.directory, result.results) if render else ExperimentDir(result.directory).report
    return result


def render_report(exp_dir: str | os.PathLike, results: dict | None = None):
    """Render EXP_DIR/report.html; without ``results`` (from :func:`transferlab.report.write.write_results`)
    results.csv, results.md and the charts are re-written from the files on disk first."""
    from .report.html import render_report as render

    return render(exp_dir, results)
