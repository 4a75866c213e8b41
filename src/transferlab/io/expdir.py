"""An experiment directory: the one module that names its files (each run inside is a :class:`RunDir`).

    EXP_DIR/experiment.json          the grid, the runs (in grid order), command, environment
    EXP_DIR/runs/<name>-<hash8>/     one run directory per combination
    EXP_DIR/shared/<sha256>.safetensors   frozen backbone weights, one file shared by the frozen runs
    EXP_DIR/references.json          majority-class baseline, logistic-regression probe, leakage check
    EXP_DIR/results.csv, results.md, comparison.png (comparison_<dataset>.png per --eval-on folder),
    EXP_DIR/class_distribution.png, report.html
    EXP_DIR/audit/                   the data audit of the experiment's data (an AuditDir)
    EXP_DIR/locks/<name>.lock        held while a process trains that run (io/lock.py; empty files)
    EXP_DIR/mlruns.db, mlartifacts/, tensorboard/<name>/   --track's default stores (transferlab.tracking)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TransferlabError
from .files import read_json
from .rundir import RunDir

EXPERIMENT_FILE = "experiment.json"
REFERENCES_FILE = "references.json"
RUNS_DIR = "runs"
SHARED_DIR = "shared"
RESULTS_CSV = "results.csv"
RESULTS_MARKDOWN = "results.md"
CLASS_DISTRIBUTION_FIGURE = "class_distribution.png"
REPORT_FILE = "report.html"
AUDIT_DIR = "audit"
LOCKS_DIR = "locks"
TEST = "test"  # the dataset name of every run's own test split


class ExperimentDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.experiment = self.path / EXPERIMENT_FILE
        self.references = self.path / REFERENCES_FILE
        self.runs = self.path / RUNS_DIR
        self.shared = self.path / SHARED_DIR
        self.results_csv = self.path / RESULTS_CSV
        self.results_markdown = self.path / RESULTS_MARKDOWN
        self.class_distribution = self.path / CLASS_DISTRIBUTION_FIGURE
        self.report = self.path / REPORT_FILE
        self.audit = self.path / AUDIT_DIR
        self.locks = self.path / LOCKS_DIR

    def run(self, name: str) -> RunDir:
        return RunDir(self.runs / name)

    def run_lock(self, name: str) -> Path:
        return self.locks / f"{name}.lock"

    @staticmethod
    def comparison_name(dataset: str) -> str:
        """The comparison chart's file name for a dataset (its own test split, or an --eval-on folder)."""
        return "comparison.png" if dataset == TEST else f"comparison_{dataset}.png"

    def read_experiment(self) -> dict:
        if not self.experiment.is_file():
            raise TransferlabError(f"EXP_DIR {self.path}: no {EXPERIMENT_FILE} (not an experiment folder)")
        meta = read_json(self.experiment)
        if not isinstance(meta, dict) or "runs" not in meta:
            raise TransferlabError(f"{self.experiment}: not a transferlab experiment file")
        return meta

    def read_references(self) -> dict | None:
        return read_json(self.references) if self.references.is_file() else None
