"""What an experiment is asked to do (:class:`ExperimentSpec`) and what that resolves to
(:class:`ExperimentPlan`): the base configuration, the grid, the runs, the --eval-on folders."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, fields
from pathlib import Path

from ..config import TrainConfig
from ..errors import TransferlabError
from ..evaluation import load_class_map
from ..io.expdir import TEST
from ..options import parse_duration
from .grid import AXIS_FIELD, GRID_AXES, RunSpec, _slug, build_grid, parse_list


@dataclass
class ExperimentSpec:
    """The parameters of an experiment, as given (grid axes as lists or comma-separated strings).

    An axis left out takes ``config``'s value; ``options`` are further :class:`TrainConfig` fields fixed for
    every run (val_size, batch_size, ...). ``command`` is recorded for the report (default: the equivalent
    Python call); ``study_file`` is the TOML file the spec came from, if any.
    """

    data_dir: str | None = None
    out: str | None = None
    strategies: list | str | None = None
    optimizers: list | str | None = None
    heads: list | str | None = None
    backbones: list | str | None = None
    seeds: list | str | None = None
    eval_on: list | str | None = None
    epochs: int | None = None
    class_map: dict | str | None = None
    question: str | None = None
    command: str | None = None
    config: TrainConfig | None = None
    options: dict | None = None
    study_file: str | None = None
    audit: bool = True  # also audit the data (EXP_DIR/audit/, a section of report.html)
    time_limit: float | str | None = None  # seconds or "1h": no run starts that would not end in time

    @classmethod
    def create(cls, data_dir=None, out=None, **given) -> ExperimentSpec:
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TransferlabError(f"experiment: unknown parameter '{unknown[0]}'")
        return cls(data_dir=str(data_dir) if data_dir is not None else None,
                   out=str(out) if out is not None else None, **given)

    def replace(self, **changes) -> ExperimentSpec:
        return dataclasses.replace(self, **changes)

    def plan(self) -> ExperimentPlan:
        """Check every parameter (one-line errors) and resolve the grid into runs."""
        options = dict(self.options or {})
        unknown = sorted(set(options) - set(TrainConfig.field_names()))
        if unknown:
            raise TransferlabError(f"experiment: unknown option '{unknown[0]}'")
        fixed = sorted(set(options) & set(AXIS_FIELD.values()))
        if fixed:
            raise TransferlabError(f"experiment: '{fixed[0]}' is a grid axis; give it as a list "
                                   f"({[a for a, f in AXIS_FIELD.items() if f == fixed[0]][0]})")
        if self.data_dir is None:
            raise TransferlabError("experiment: DATA_DIR (or a study .toml naming data_dir) is required")
        if self.out is None:
            raise TransferlabError("experiment: --out EXP_DIR is required")
        if self.time_limit is not None:
            parse_duration(self.time_limit)
        base = (self.config or TrainConfig()).replace(**options, data_dir=str(self.data_dir))
        if self.epochs is not None:
            base = base.replace(epochs=int(self.epochs))
        base.validate()
        grid = {"backbones": parse_list(self.backbones, "backbones") or [base.backbone],
                "strategies": parse_list(self.strategies, "strategies") or [base.strategy],
                "optimizers": parse_list(self.optimizers, "optimizers") or [base.optimizer],
                "heads": parse_list(self.heads, "heads") or [base.head],
                "seeds": parse_list(self.seeds, "seeds", int) or [base.seed]}
        if not Path(base.data_dir).is_dir():
            raise TransferlabError(f"DATA_DIR {base.data_dir}: folder not found")
        eval_on = parse_list(self.eval_on, "eval-on") if isinstance(self.eval_on, str) else list(self.eval_on or [])
        return ExperimentPlan(self, base, grid, load_class_map(self.class_map), _eval_names(eval_on),
                              build_grid(base, grid), options)

    def question_or_default(self, base: TrainConfig, grid: dict) -> str:
        if self.question:
            return self.question
        varying = [a for a in GRID_AXES[:-1] if len(grid[a]) > 1]
        axes = ", ".join(f"{a} ({', '.join(map(str, grid[a]))})" for a in varying) or "the configuration"
        return (f"Which transfer-learning setup classifies the images of {Path(base.data_dir).resolve().name} best: "
                f"how much do {axes} change the test scores, and are the differences larger than the noise?")

    def command_or_call(self, plan: ExperimentPlan) -> str:
        """The command that started the experiment, else the equivalent :func:`transferlab.run_experiment` call."""
        if self.command:
            return self.command
        args = [repr(str(self.data_dir)), f"out={str(self.out)!r}"]
        args += [f"{k}={','.join(map(str, v))!r}" for k, v in plan.grid.items()]
        if plan.evals:
            args.append(f"eval_on={[p for _, p in plan.evals]!r}")
        if self.epochs is not None:
            args.append(f"epochs={self.epochs}")
        if plan.options:
            args.append(f"options={plan.options!r}")
        return f"transferlab.run_experiment({', '.join(args)})"


@dataclass
class ExperimentPlan:
    """A checked spec: the base configuration, the grid (axis -> values), the class map, the --eval-on
    folders as (name, resolved path), the runs in grid order, and the fixed options."""

    spec: ExperimentSpec
    base: TrainConfig
    grid: dict[str, list]
    class_map: dict[str, str]
    evals: list[tuple[str, str]]
    runs: list[RunSpec]
    options: dict


def _eval_names(paths: list[str]) -> list[tuple[str, str]]:
    """(name, resolved path) per --eval-on folder; repeated folder names get -2, -3."""
    out, seen = [], {}
    for p in paths:
        resolved = Path(p).resolve()
        if not resolved.is_dir():
            raise TransferlabError(f"--eval-on {p}: folder not found")
        name = _slug(resolved.name)
        if name == TEST:
            name = f"{_slug(resolved.parent.name)}_{name}"
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}-{seen[name]}", str(resolved)))
    return out



def command_line(argv: list[str]) -> str:
    return shlex.join(["transferlab", *argv])

