"""Running an experiment: every run of the grid in turn (in this process), each evaluated on the
--eval-on folders, then the reference rows and the leakage check.

Runs whose directory is complete are skipped, so re-running the same command trains only what is
missing; an evaluation is redone only when its folder's fingerprint or the class map changed.

With a shard (:mod:`~transferlab.experiment.shard`) this process trains only its share; the experiment-wide
steps (references, audit, then results and report.html) are done by the worker that finds every run of the
grid finished when its own are, i.e. the last one to finish (two finishing together both write the same files,
atomically). With ``track`` every run trained here is mirrored to TensorBoard or MLflow
(:mod:`transferlab.tracking`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..audit.auditor import run_audit
from ..data.discovery import discover, discover_evaluation
from ..evaluation import evaluate, labelled_for_model
from ..io.expdir import ExperimentDir
from ..io.files import check_writable_dir, write_json
from ..io.lock import file_lock
from ..io.rundir import RunDir
from ..options import parse_duration
from ..progress import bars_enabled, progress_bar
from ..provenance import environment
from ..run import Run
from ..runtime.precision import resolve_policy
from ..tracking import Tracking, open_tracking
from ..training.trainer import Trainer
from .grid import RunSpec, data_fingerprint
from .references import compute_references
from .shard import Shard
from .spec import ExperimentPlan, ExperimentSpec

log = logging.getLogger("transferlab")


@dataclass
class ExperimentResult:
    directory: Path
    trained: int
    skipped: int
    not_started: int = 0  # runs left for the next call by the time limit
    results: dict | None = None  # what the report module collected and wrote (transferlab.report.write)
    report: Path | None = None
    shard: Shard | None = None
    waiting: int = 0  # a shard's: runs of other shards not finished yet (no results nor report written)

    @property
    def best(self) -> dict | None:
        return self.results["best"] if self.results else None


def run_grid(spec: ExperimentSpec, *, shard: Shard | str | None = None, track=None) -> ExperimentResult:
    """Train, evaluate and compute references for every run of ``spec`` (``shard``: this worker's share, e.g.
    ``"2/4"``); write experiment.json first. ``track``: ``--track`` values (see :mod:`transferlab.tracking`)."""
    plan = spec.plan()
    shard = Shard.parse(shard) if shard is not None else None
    if plan.evals:  # fail now, not after the first run: every --eval-on class must be one of the training classes
        classes = discover(plan.base.data_dir, plan.base.test_dir, plan.base.labels).classes
        for _, path in plan.evals:
            labelled_for_model(discover_evaluation(path)[0], classes, plan.class_map, f"--eval-on {path}",
                               "the training classes")
    exp = ExperimentDir(check_writable_dir(spec.out))
    tracking = open_tracking(track, exp.path, experiment=True)  # a missing extra fails before any training
    write_json(exp.experiment, _experiment_record(plan))
    runs = shard.select(plan.runs) if shard is not None else plan.runs
    log.info("experiment: %d run(s) in %s%s", len(runs), exp.runs,
             f" (shard {shard}: its share of the grid's {len(plan.runs)})" if shard is not None else "")
    clock = _Clock(parse_duration(spec.time_limit) if spec.time_limit is not None else None)
    with _redirect_logging(bars_enabled()):
        trained, skipped = _run_all(exp, plan, runs, clock, tracking)
    not_started = len(runs) - trained - skipped
    log.info("experiment: %d trained, %d skipped (finished earlier), %d not started in %.1fs", trained, skipped,
             not_started, time.perf_counter() - clock.started)
    waiting = sum(not exp.run(r.name).is_finished() for r in plan.runs) if shard is not None else 0
    if waiting:
        log.info("shard %s: done; %d run(s) of other shards not finished yet: the last worker to finish writes "
                 "the results and report.html (or, once they are: transferlab report %s)", shard, waiting, exp.path)
        return ExperimentResult(exp.path, trained, skipped, not_started, shard=shard, waiting=waiting)
    compute_references(exp.path)
    if spec.audit:
        # the grid's first backbone, like the reference rows: its features are in the cache already
        run_audit(plan.base.replace(backbone=plan.grid["backbones"][0]), exp.audit)
    return ExperimentResult(exp.path, trained, skipped, not_started, shard=shard)


def _run_all(exp: ExperimentDir, plan: ExperimentPlan, runs: list[RunSpec], clock: _Clock,
             tracking: Tracking) -> tuple[int, int]:
    """Train (or skip) and evaluate each of ``runs`` in turn; returns (trained, skipped)."""
    outcomes = []
    bar = progress_bar(runs, total=len(runs), desc="runs", leave=True)
    for k, run_spec in enumerate(bar, 1):
        where = f"run {k}/{len(runs)}"
        if hasattr(bar, "set_description"):
            bar.set_description(where)
        outcomes.append(_one_run(exp, plan, run_spec, where, clock, tracking))
    return outcomes.count("trained"), outcomes.count("skipped")


def _one_run(exp: ExperimentDir, plan: ExperimentPlan, run_spec: RunSpec, where: str, clock: _Clock,
             tracking: Tracking) -> str:
    """Train one run; returns "trained", "skipped" (finished earlier: evaluated if out of date) or "left" (the
    time limit, or another process holds the run's lock: two processes never train one run at once)."""
    run_dir = exp.run(run_spec.name)
    if run_dir.is_finished():
        log.info("%s %s: finished earlier, skipped", where, run_spec.name)
        _evaluate_run(run_dir, plan, False)
        return "skipped"
    if not clock.allows_another():
        log.info("%s %s: not started (time limit; the same command trains it later)", where, run_spec.name)
        return "left"
    started = time.perf_counter()
    with file_lock(exp.run_lock(run_spec.name), blocking=False) as mine:
        if not mine:
            log.info("%s %s: being trained by another process, left to it", where, run_spec.name)
            return "left"
        if run_dir.is_finished():  # that process finished it while we looked
            return "skipped"
        with tracking.run(run_spec.name, run_spec.config, _tags(exp, run_spec)) as tracked:
            _train_once(exp, run_spec, where, clock.deadline, tracked.callbacks)
            _evaluate_run(run_dir, plan, True)
            tracked.finished(run_dir.path)
    clock.ran(time.perf_counter() - started)
    return "trained"


def _tags(exp: ExperimentDir, run_spec: RunSpec) -> dict[str, str]:
    """A tracked run's configuration: the grid axes, its label and group, and the experiment folder."""
    return {**{k: str(v) for k, v in run_spec.axes.items()}, "transferlab.label": run_spec.label,
            "transferlab.group": run_spec.group, "transferlab.experiment": str(exp.path.resolve())}


class _Clock:
    """The experiment's time limit: a run starts only if the mean time of the runs trained so far fits."""

    def __init__(self, seconds: float | None):
        self.started = time.perf_counter()
        self.deadline = None if seconds is None else self.started + seconds
        self.seconds: list[float] = []

    def allows_another(self) -> bool:
        if self.deadline is None:
            return True
        expected = sum(self.seconds) / len(self.seconds) if self.seconds else 0.0
        return time.perf_counter() + expected <= self.deadline

    def ran(self, seconds: float) -> None:
        self.seconds.append(seconds)


def _experiment_record(plan: ExperimentPlan) -> dict:
    spec, base = plan.spec, plan.base
    policy = resolve_policy(base.precision, base.device)
    return {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "question": spec.question_or_default(base, plan.grid),
        "command": spec.command_or_call(plan),
        "study_file": spec.study_file,
        "study_toml": Path(spec.study_file).read_text(encoding="utf-8") if spec.study_file else None,
        "data_dir": str(Path(base.data_dir).resolve()),
        "grid": plan.grid, "epochs": spec.epochs, "options": plan.options, "class_map": plan.class_map,
        "eval_on": [{"name": n, "path": p} for n, p in plan.evals],
        "runs": [s.to_dict() for s in plan.runs],
        "environment": environment({"device": policy.device, "precision": policy.precision,
                                    "channels_last": policy.channels_last}),
    }


def _train_once(exp: ExperimentDir, run_spec: RunSpec, where: str, deadline: float | None = None,
                callbacks=()) -> None:
    """Train the run (an interrupted one resumes from its checkpoint)."""
    run_dir = exp.run(run_spec.name)
    log.info("%s %s: training (%s)", where, run_spec.name, run_spec.label)
    t0 = time.perf_counter()
    run = Trainer(run_spec.config, run_dir.path, shared_dir=exp.shared, deadline=deadline, callbacks=callbacks).run()
    log.info("%s %s: test accuracy %.4f (%.1fs)", where, run_spec.name, run.metrics["accuracy"],
             time.perf_counter() - t0)


def _evaluate_run(run_dir: RunDir, plan: ExperimentPlan, retrained: bool) -> None:
    """Evaluate a run on each --eval-on folder whose evaluation is missing or out of date."""
    run = None
    for name, path in plan.evals:
        target = run_dir.evaluation(name)
        stamp = json.dumps({"data": data_fingerprint(path), "class_map": plan.class_map}, sort_keys=True)
        if not retrained and target.metrics.is_file() and target.read_fingerprint() == stamp:
            continue
        run = run or Run.load(run_dir.path, precision=plan.base.precision, device=plan.base.device)
        evaluate(run, path, out=target.path, class_map=plan.class_map, strict=plan.base.strict)
        target.write_fingerprint(stamp)


class _redirect_logging:
    """Log lines above the progress bars instead of through them (tqdm.write)."""

    def __init__(self, enabled: bool):
        self.ctx = None
        if enabled:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.ctx = logging_redirect_tqdm(loggers=[log])

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False
