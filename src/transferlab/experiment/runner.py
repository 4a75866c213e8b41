"""Running an experiment: every run of the grid in turn (in this process), each evaluated on the
--eval-on folders, then the reference rows and the leakage check.

Runs whose directory is complete are skipped, so re-running the same command trains only what is
missing; an evaluation is redone only when its folder's fingerprint or the class map changed.
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
from ..io.rundir import RunDir
from ..options import parse_duration
from ..progress import bars_enabled, progress_bar
from ..provenance import environment
from ..run import Run
from ..runtime.precision import resolve_policy
from ..training.trainer import Trainer
from .grid import RunSpec, data_fingerprint
from .references import compute_references
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

    @property
    def best(self) -> dict | None:
        return self.results["best"] if self.results else None


def run_grid(spec: ExperimentSpec) -> ExperimentResult:
    """Train, evaluate and compute references for every run of ``spec``; write experiment.json first."""
    plan = spec.plan()
    if plan.evals:  # fail now, not after the first run: every --eval-on class must be one of the training classes
        classes = discover(plan.base.data_dir, plan.base.test_dir, plan.base.labels).classes
        for _, path in plan.evals:
            labelled_for_model(discover_evaluation(path)[0], classes, plan.class_map, f"--eval-on {path}",
                               "the training classes")
    exp = ExperimentDir(check_writable_dir(spec.out))
    write_json(exp.experiment, _experiment_record(plan))
    n = len(plan.runs)
    log.info("experiment: %d run(s) in %s", n, exp.runs)
    trained = skipped = 0
    clock = _Clock(parse_duration(spec.time_limit) if spec.time_limit is not None else None)
    with _redirect_logging(bars_enabled()):
        bar = progress_bar(plan.runs, total=n, desc="runs", leave=True)
        for k, run_spec in enumerate(bar, 1):
            if hasattr(bar, "set_description"):
                bar.set_description(f"run {k}/{n}")
            if not exp.run(run_spec.name).is_finished() and not clock.allows_another():
                log.info("run %d/%d %s: not started (time limit; the same command trains it later)", k, n,
                         run_spec.name)
                continue
            run_started = time.perf_counter()
            trained_now = _train_once(exp, run_spec, f"run {k}/{n}", clock.deadline)
            trained, skipped = trained + trained_now, skipped + (not trained_now)
            _evaluate_run(exp.run(run_spec.name), plan, trained_now)
            if trained_now:
                clock.ran(time.perf_counter() - run_started)
    not_started = n - trained - skipped
    log.info("experiment: %d trained, %d skipped (finished earlier), %d not started in %.1fs", trained, skipped,
             not_started, time.perf_counter() - clock.started)
    compute_references(exp.path)
    if spec.audit:
        # the grid's first backbone, like the reference rows: its features are in the cache already
        run_audit(plan.base.replace(backbone=plan.grid["backbones"][0]), exp.audit)
    return ExperimentResult(exp.path, trained, skipped, not_started)


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


def _train_once(exp: ExperimentDir, run_spec: RunSpec, where: str, deadline: float | None = None) -> bool:
    """Train the run unless its directory is complete; returns whether it trained."""
    run_dir = exp.run(run_spec.name)
    if run_dir.is_finished():
        log.info("%s %s: finished earlier, skipped", where, run_spec.name)
        return False
    log.info("%s %s: training (%s)", where, run_spec.name, run_spec.label)
    t0 = time.perf_counter()
    run = Trainer(run_spec.config, run_dir.path, shared_dir=exp.shared, deadline=deadline).run()
    log.info("%s %s: test accuracy %.4f (%.1fs)", where, run_spec.name, run.metrics["accuracy"],
             time.perf_counter() - t0)
    return True


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
