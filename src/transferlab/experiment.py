"""Experiment grid: every combination of backbones x strategies x optimizers x heads x seeds is a run.

    EXP_DIR/experiment.json          the grid, the runs (in grid order), command, environment
    EXP_DIR/runs/<name>-<hash8>/     one run directory per combination (transferlab.train)
    EXP_DIR/shared/<sha256>.safetensors   frozen backbone weights, one file shared by the frozen runs
    EXP_DIR/references.json          majority-class baseline, logistic-regression probe, leakage check
    EXP_DIR/results.csv, results.md, comparison.png, class_distribution.png, report.html

A run directory's name ends with a hash of everything that changes the result (the resolved training
options minus paths and display options, a fingerprint of the data files, the library versions): the same
command skips the runs that already finished (config.json + metrics.json present) and trains the rest.

Selection: runs are ranked by their best validation accuracy when the runs have a validation split
(``--val-size`` > 0 or a val/ folder beside test/); without one, by their final-epoch training accuracy, and
the report says so. Test numbers are shown, never used to rank or pick.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .config import TrainConfig
from .data import is_image_file
from .errors import TransferlabError
from .fileio import check_writable_dir, read_json, sha256_file, write_json, write_text

log = logging.getLogger("transferlab")

EXPERIMENT_FILE = "experiment.json"
REFERENCES_FILE = "references.json"
RUNS_DIR = "runs"
SHARED_DIR = "shared"
# Options that name where things are or how they are computed/displayed, not what the result is.
HASH_EXCLUDED = ("data_dir", "test_dir", "labels", "cache_dir", "precision", "device")
# Cosine similarity of frozen (pooled) backbone features above which a test and a train image count as
# near-duplicates. Measured with efficientnet_lite0 on hymenoptera: a JPEG re-encoding of a photo scores
# 0.99-1.0, a copy resized to 80% 0.96-0.99 (median 0.987); a horizontal flip about 0.96, half size or a 10% crop
# 0.91-0.94 (not caught); two distinct photos at most 0.81 (the median nearest train image of a test image: 0.65).
LEAKAGE_THRESHOLD = 0.97
GRID_AXES = ("backbones", "strategies", "optimizers", "heads", "seeds")
AXIS_FIELD = {"backbones": "backbone", "strategies": "strategy", "optimizers": "optimizer", "heads": "head",
              "seeds": "seed"}
METRICS = ("accuracy", "precision", "recall", "f1", "precision_weighted", "recall_weighted", "f1_weighted",
           "roc_auc")
TEST = "test"  # the dataset name of every run's own test split


# ----------------------------------------------------------------------------------------------- the grid


def parse_list(value, option: str, cast=str) -> list:
    """``"a,b"`` or ``["a", "b"]`` -> ["a", "b"] (stripped, empty parts dropped, duplicates removed)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            item = cast(item)
        except ValueError:
            raise TransferlabError(f"--{option} {value}: '{item}' is not a valid value") from None
        if item not in out:
            out.append(item)
    return out


@dataclass
class RunSpec:
    """One combination of the grid."""

    name: str  # the run directory's name: <readable>-<hash8>
    label: str  # the configuration as shown in tables (the grid axes that vary, seed excluded)
    group: str  # runs differing only by seed share a group
    config: TrainConfig  # resolved
    axes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "group": self.group, "seed": self.config.seed,
                "axes": self.axes}


def _image_digests(root: Path) -> list[tuple[str, str]]:
    """(path relative to ``root``, content digest) of every image file, sorted; digests in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    from .features import file_digest

    paths = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(dirpath) / name for name in files if is_image_file(Path(dirpath) / name)]

    def digest(path: Path) -> str:
        try:
            return file_digest(path)
        except OSError as exc:  # unreadable: the run reports it; the fingerprint only needs to be stable
            return f"unreadable:{exc.errno}"

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, paths))
    return sorted((p.relative_to(root).as_posix(), d) for p, d in zip(paths, digests, strict=True))


def data_fingerprint(data_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                     labels: str | os.PathLike | None = None, weights: str | None = None) -> str:
    """SHA-256 over the image files (path relative to their folder and a digest of the bytes), the labels
    CSV's bytes and a weights file's bytes: independent of where the folder lives or of file times (a copy
    or a fresh checkout of the same data finds its runs). Costs one read of the data (as the feature cache)."""
    digest = hashlib.sha256()
    for role, root in (("data", data_dir), ("test", test_dir)):
        if root is not None and Path(root).is_dir():
            digest.update(json.dumps([role, _image_digests(Path(root))]).encode())
    for role, path in (("labels", labels), ("weights", weights)):
        if path and path not in ("default", "none") and Path(path).is_file():
            digest.update(f"{role}:{sha256_file(path)}".encode())
    return digest.hexdigest()


def result_versions() -> dict:
    import timm
    import torch
    import torchvision

    from . import __version__

    return {"transferlab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def run_hash(config: TrainConfig, fingerprint: str, versions: dict | None = None) -> str:
    """8 hex digits of SHA-256 over what changes a run's result (not paths nor display options)."""
    options = {k: v for k, v in config.to_dict().items() if k not in HASH_EXCLUDED}
    blob = json.dumps({"train": options, "data": fingerprint, "versions": versions or result_versions()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(text)).strip("_") or "x"


def readable_name(config: TrainConfig) -> str:
    return "-".join([_slug(config.backbone), config.strategy, config.optimizer, f"h{_slug(config.head)}",
                     f"s{config.seed}"])


def build_grid(base: TrainConfig, grid: dict[str, list], versions: dict | None = None) -> list[RunSpec]:
    """Every combination, in grid order (backbone, strategy, optimizer, head, seed; the last varies fastest)."""
    versions = versions or result_versions()
    fingerprint = data_fingerprint(base.data_dir, base.test_dir, base.labels, base.weights)
    varying = [a for a in GRID_AXES[:-1] if len(grid[a]) > 1]
    specs = []
    for values in itertools.product(*(grid[a] for a in GRID_AXES)):
        axes = dict(zip(GRID_AXES, values, strict=True))
        cfg = base.replace(**{AXIS_FIELD[a]: v for a, v in axes.items()}, epochs=base.epochs).resolved()
        parts = [f"head {v}" if a == "heads" else str(v) for a, v in axes.items() if a in varying]
        label = " · ".join(parts) or f"{cfg.strategy} · {cfg.optimizer} · head {cfg.head}"
        group = "-".join([_slug(axes[a]) for a in GRID_AXES[:-1]])
        specs.append(RunSpec(f"{readable_name(cfg)}-{run_hash(cfg, fingerprint, versions)}", label, group, cfg,
                             {AXIS_FIELD[a]: v for a, v in axes.items()}))
    return specs


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and (run_dir / "metrics.json").is_file()


# ------------------------------------------------------------------------------------------- study files

STUDY_KEYS = {"data_dir", "out", "question", "strategies", "optimizers", "heads", "backbones", "seeds", "eval_on",
              "epochs", "class_map", "train"}
PATH_OPTIONS = ("test_dir", "labels", "cache_dir", "weights")


def load_study(path: str | os.PathLike) -> dict:
    """A study TOML file -> keyword arguments of :func:`run_experiment`. Paths are relative to the file.

    Keys: data_dir, out, question, strategies, optimizers, heads, backbones, seeds (lists or
    comma-separated strings), eval_on (list of folders), epochs, class_map (table), and a ``[train]``
    table of any other TrainConfig option (val_size, batch_size, ...).
    """
    import tomllib

    path = Path(path)
    try:
        study = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TransferlabError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TransferlabError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(study) - STUDY_KEYS)
    if unknown:
        raise TransferlabError(f"{path}: unknown key '{unknown[0]}' (known: {', '.join(sorted(STUDY_KEYS))})")
    base = path.resolve().parent

    def rel(value):
        return str(base / value) if value is not None else None

    kwargs = {k: v for k, v in study.items() if k not in ("train",)}
    for key in ("data_dir", "out"):
        if key in kwargs:
            kwargs[key] = rel(kwargs[key])
    if "eval_on" in kwargs:
        eval_on = kwargs["eval_on"]
        kwargs["eval_on"] = [rel(p) for p in ([eval_on] if isinstance(eval_on, str) else eval_on)]
    train = dict(study.get("train", {}))
    unknown = sorted(set(train) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"{path}: [train] has unknown option '{unknown[0]}'")
    for key in PATH_OPTIONS:
        if train.get(key) and train[key] not in ("default", "none"):
            candidate = base / train[key]
            if key != "weights" or candidate.exists():
                train[key] = str(candidate)
    kwargs["options"] = train
    kwargs["study_file"] = str(path.resolve())
    return kwargs


# ------------------------------------------------------------------------------------------- environment


def environment(policy: dict | None = None) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": {**result_versions(), "python": platform.python_version()},
            "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "policy": policy}


# ------------------------------------------------------------------------------------------- the experiment


@dataclass
class ExperimentResult:
    directory: Path
    results: dict
    report: Path
    trained: int
    skipped: int

    @property
    def best(self) -> dict | None:
        return self.results["best"]


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


def run_experiment(data_dir: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
                   strategies=None, optimizers=None, heads=None, backbones=None, seeds=None,
                   eval_on=None, epochs: int | None = None, class_map: dict | str | None = None,
                   question: str | None = None, command: str | None = None, config: TrainConfig | None = None,
                   options: dict | None = None, study_file: str | None = None, render: bool = True
                   ) -> ExperimentResult:
    """Train every combination of the grid (sequentially, in this process), evaluate each run on the
    ``eval_on`` folders, compute the reference rows and the leakage check, write results and the report.

    Grid values are lists or comma-separated strings; an axis left out takes ``config``'s value.
    ``options`` are further :class:`TrainConfig` fields fixed for every run (val_size, batch_size, ...).
    """
    from .api import evaluate, load_class_map, train
    from .progress import bars_enabled, progress_bar
    from .run import Run

    options = dict(options or {})
    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"experiment: unknown option '{unknown[0]}'")
    fixed = sorted(set(options) & set(AXIS_FIELD.values()))
    if fixed:
        raise TransferlabError(f"experiment: '{fixed[0]}' is a grid axis; give it as a list "
                               f"({[a for a, f in AXIS_FIELD.items() if f == fixed[0]][0]})")
    if data_dir is None:
        raise TransferlabError("experiment: DATA_DIR (or a study .toml naming data_dir) is required")
    if out is None:
        raise TransferlabError("experiment: --out EXP_DIR is required")
    base = (config or TrainConfig()).replace(**options, data_dir=str(data_dir))
    if epochs is not None:
        base = base.replace(epochs=int(epochs))
    base.validate()
    grid = {"backbones": parse_list(backbones, "backbones") or [base.backbone],
            "strategies": parse_list(strategies, "strategies") or [base.strategy],
            "optimizers": parse_list(optimizers, "optimizers") or [base.optimizer],
            "heads": parse_list(heads, "heads") or [base.head],
            "seeds": parse_list(seeds, "seeds", int) or [base.seed]}
    if not Path(base.data_dir).is_dir():
        raise TransferlabError(f"DATA_DIR {base.data_dir}: folder not found")
    mapping = class_map if isinstance(class_map, dict) else load_class_map(class_map)
    evals = _eval_names(parse_list(eval_on, "eval-on") if isinstance(eval_on, str) else list(eval_on or []))
    specs = build_grid(base, grid)
    if evals:  # fail now, not after the first run: every --eval-on class must be one of the training classes
        from .data import discover

        classes = discover(base.data_dir, base.test_dir, base.labels).classes
        for _, path in evals:
            _eval_samples(path, classes, mapping, strict=True)
    exp_dir = check_writable_dir(out)
    runs_dir, shared = exp_dir / RUNS_DIR, exp_dir / SHARED_DIR

    from .precision import resolve_policy

    policy = resolve_policy(base.precision, base.device)
    study_text = Path(study_file).read_text(encoding="utf-8") if study_file else None
    meta = {
        "format_version": 1,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "question": question or _default_question(base, grid),
        "command": command or _python_call(data_dir, out, grid, evals, epochs, options),
        "study_file": study_file, "study_toml": study_text,
        "data_dir": str(Path(base.data_dir).resolve()),
        "grid": grid, "epochs": epochs, "options": options, "class_map": mapping,
        "eval_on": [{"name": n, "path": p} for n, p in evals],
        "runs": [s.to_dict() for s in specs],
        "environment": environment({"device": policy.device, "precision": policy.precision,
                                    "channels_last": policy.channels_last}),
    }
    write_json(exp_dir / EXPERIMENT_FILE, meta)

    n = len(specs)
    log.info("experiment: %d run(s) in %s", n, runs_dir)
    trained = skipped = 0
    started = time.perf_counter()
    with _redirect_logging(bars_enabled()):
        bar = progress_bar(specs, total=n, desc="runs", leave=True)
        for k, spec in enumerate(bar, 1):
            if hasattr(bar, "set_description"):
                bar.set_description(f"run {k}/{n}")
            run_dir = runs_dir / spec.name
            run, trained_now = None, False
            if is_finished(run_dir):
                skipped += 1
                log.info("run %d/%d %s: finished earlier, skipped", k, n, spec.name)
            else:
                log.info("run %d/%d %s: training (%s)", k, n, spec.name, spec.label)
                t0 = time.perf_counter()
                run = train(out=run_dir, config=spec.config, shared_dir=shared)
                trained, trained_now = trained + 1, True
                log.info("run %d/%d %s: test accuracy %.4f (%.1fs)", k, n, spec.name, run.metrics["accuracy"],
                         time.perf_counter() - t0)
            for name, path in evals:
                eval_dir = run_dir / "evaluations" / name
                stamp = _eval_stamp(path, mapping)
                if (not trained_now and (eval_dir / "metrics.json").is_file()
                        and _read_text(eval_dir / "fingerprint.txt") == stamp):
                    continue
                run = run or Run.load(run_dir, precision=base.precision, device=base.device)
                evaluate(run, path, out=eval_dir, class_map=mapping, strict=base.strict)
                write_text(eval_dir / "fingerprint.txt", stamp)
            del run
    log.info("experiment: %d trained, %d skipped (finished earlier) in %.1fs", trained, skipped,
             time.perf_counter() - started)
    compute_references(exp_dir)
    results = write_results(exp_dir)
    report = exp_dir / "report.html"
    if render:
        from .report import render_report

        report = render_report(exp_dir, results)
    return ExperimentResult(exp_dir, results, report, trained, skipped)


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


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _eval_stamp(path: str, mapping: dict) -> str:
    return json.dumps({"data": data_fingerprint(path), "class_map": mapping}, sort_keys=True)


def _default_question(base: TrainConfig, grid: dict) -> str:
    varying = [a for a in GRID_AXES[:-1] if len(grid[a]) > 1]
    axes = ", ".join(f"{a} ({', '.join(map(str, grid[a]))})" for a in varying) or "the configuration"
    return (f"Which transfer-learning setup classifies the images of {Path(base.data_dir).resolve().name} best: "
            f"how much do {axes} change the test scores, and are the differences larger than the noise?")


def _python_call(data_dir, out, grid, evals, epochs, options) -> str:
    args = [repr(str(data_dir)), f"out={str(out)!r}"]
    args += [f"{k}={','.join(map(str, v))!r}" for k, v in grid.items()]
    if evals:
        args.append(f"eval_on={[p for _, p in evals]!r}")
    if epochs is not None:
        args.append(f"epochs={epochs}")
    if options:
        args.append(f"options={options!r}")
    return f"transferlab.run_experiment({', '.join(args)})"


def command_line(argv: list[str]) -> str:
    return shlex.join(["transferlab", *argv])


# ------------------------------------------------------------------------------------------- results on disk


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _selection(history: list[dict]) -> dict:
    """Best validation accuracy of the last stage (the weights that were kept) with its validation loss,
    and the final epoch's training accuracy and loss. Losses break ties (lower first)."""
    out = {"val_score": None, "val_loss": None, "train_acc": None, "train_loss": None}
    if not history:
        return out
    last_stage = history[-1].get("stage")
    rows = [r for r in history if r.get("stage") == last_stage and _float(r.get("val_acc")) is not None]
    if rows:
        best = max(rows, key=lambda r: _float(r["val_acc"]))  # the first best epoch, as KeepBestOnValidation
        out["val_score"], out["val_loss"] = _float(best["val_acc"]), _float(best.get("val_loss"))
    out["train_acc"], out["train_loss"] = _float(history[-1].get("train_acc")), _float(history[-1].get("train_loss"))
    return out


def load_experiment(exp_dir: str | os.PathLike) -> dict:
    exp_dir = Path(exp_dir)
    if not (exp_dir / EXPERIMENT_FILE).is_file():
        raise TransferlabError(f"EXP_DIR {exp_dir}: no {EXPERIMENT_FILE} (not an experiment folder)")
    meta = read_json(exp_dir / EXPERIMENT_FILE)
    if not isinstance(meta, dict) or "runs" not in meta:
        raise TransferlabError(f"{exp_dir / EXPERIMENT_FILE}: not a transferlab experiment file")
    return meta


def collect(exp_dir: str | os.PathLike) -> dict:
    """Everything the tables, charts and report need, read from the files on disk."""
    exp_dir = Path(exp_dir)
    meta = load_experiment(exp_dir)
    datasets = [TEST] + [e["name"] for e in meta.get("eval_on", [])]
    runs = []
    for order, entry in enumerate(meta["runs"]):
        run_dir = exp_dir / RUNS_DIR / entry["name"]
        record = {**entry, "order": order, "dir": str(run_dir), "finished": is_finished(run_dir)}
        if not record["finished"]:
            runs.append(record)
            continue
        config = read_json(run_dir / "config.json")
        metrics = read_json(run_dir / "metrics.json")
        history = _read_csv(run_dir / "history.csv")
        report = read_json(run_dir / "data_report.json") if (run_dir / "data_report.json").is_file() else {}
        selection = _selection(history)
        n_train = sum((report.get("counts", {}).get("train") or {}).values())
        seconds = metrics.get("train_seconds") or 0.0
        record.update({"config": config["train"], "classes": config["classes"], "policy": config.get("policy"),
                       "versions": config.get("versions"), "data_report": report, "history_epochs": len(history),
                       "val_score": selection["val_score"], "final_train_acc": selection["train_acc"],
                       "selection_loss": None, "_selection": selection,
                       "train_seconds": metrics.get("train_seconds"),
                       "images_per_s": n_train * len(history) / seconds if seconds else None,
                       "n_train": n_train, "datasets": {TEST: metrics}})
        for name in datasets[1:]:
            path = run_dir / "evaluations" / name / "metrics.json"
            if path.is_file():
                record["datasets"][name] = read_json(path)
        runs.append(record)
    done = [r for r in runs if r["finished"]]
    by_validation = bool(done) and all(r["val_score"] is not None for r in done)
    for r in done:
        r["selection_score"] = r["val_score"] if by_validation else r["final_train_acc"]
        r["selection_loss"] = r.pop("_selection")["val_loss" if by_validation else "train_loss"]
    ranked = sorted(done, key=lambda r: (-(r["selection_score"] if r["selection_score"] is not None else -1),
                                         r["selection_loss"] if r["selection_loss"] is not None else math.inf,
                                         r["order"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    groups = _aggregate(done, datasets)
    references = read_json(exp_dir / REFERENCES_FILE) if (exp_dir / REFERENCES_FILE).is_file() else None
    best_groups = [g for g in groups if g["rank"] is not None][:2]
    best = _group_run(best_groups[0], runs) if best_groups else None
    second = _group_run(best_groups[1], runs) if len(best_groups) > 1 else None
    return {"meta": meta, "dir": str(exp_dir), "datasets": datasets, "runs": runs, "groups": groups,
            "selection_by": "validation accuracy" if by_validation else "final training accuracy",
            "has_validation": by_validation, "seeds": meta["grid"]["seeds"], "references": references,
            "best": best, "second": second, "mcnemar": mcnemar_runs(best, second) if best and second else None}


def _group_run(group: dict, runs: list[dict]) -> dict:
    """The group's run with the first seed (so that two groups' runs share their test images)."""
    members = [r for r in runs if r["finished"] and r["group"] == group["group"]]
    return min(members, key=lambda r: r["order"])


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _aggregate(runs: list[dict], datasets: list[str]) -> list[dict]:
    """One row per configuration (runs that differ only by seed): mean and sample std over seeds."""
    groups: dict[str, dict] = {}
    for r in runs:
        g = groups.setdefault(r["group"], {"group": r["group"], "label": r["label"], "order": r["order"],
                                           "runs": [], "axes": {k: v for k, v in r["axes"].items() if k != "seed"}})
        g["runs"].append(r)
    out = []
    for g in groups.values():
        members = g["runs"]
        g["seeds"] = [r["seed"] for r in members]
        g["selection_score"], g["selection_std"] = _mean_std([r["selection_score"] for r in members])
        g["selection_loss"], _ = _mean_std([r["selection_loss"] for r in members])
        g["val_score"], g["val_std"] = _mean_std([r["val_score"] for r in members])
        g["train_seconds"], _ = _mean_std([r["train_seconds"] for r in members])
        g["images_per_s"], _ = _mean_std([r["images_per_s"] for r in members])
        g["datasets"] = {}
        for d in datasets:
            ms = [r["datasets"][d] for r in members if d in r["datasets"]]
            if not ms:
                continue
            stats = {m: _mean_std([_float(x.get(m)) for x in ms]) for m in METRICS}
            stats["n_test"] = (ms[0].get("n_test"), None)
            stats["ci95"] = ms[0].get("accuracy_ci95") if len(ms) == 1 else None
            g["datasets"][d] = stats
        out.append(g)
    ranked = sorted(out, key=lambda g: (-(g["selection_score"] if g["selection_score"] is not None else -1),
                                        g["selection_loss"] if g["selection_loss"] is not None else math.inf,
                                        g["order"]))
    for i, g in enumerate(ranked, 1):
        g["rank"] = i if g["selection_score"] is not None else None
    return ranked


# --------------------------------------------------------------------------------------------- statistics


def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test: a two-sided binomial test on the discordant pairs (a right/b wrong vs the reverse)."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = float(binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return {"n": int(len(a)), "both_right": int((a & b).sum()), "both_wrong": int((~a & ~b).sum()),
            "only_a": only_a, "only_b": only_b, "p_value": p}


def read_predictions(run_dir: str | os.PathLike) -> list[dict]:
    from .run import TEST_PREDICTIONS_FILE

    return _read_csv(Path(run_dir) / TEST_PREDICTIONS_FILE)


def mcnemar_runs(a: dict, b: dict) -> dict | None:
    pa = {r["path"]: r["true"] == r["pred"] for r in read_predictions(a["dir"])}
    pb = {r["path"]: r["true"] == r["pred"] for r in read_predictions(b["dir"])}
    common = sorted(set(pa) & set(pb))
    if not common:
        return None
    out = mcnemar([pa[p] for p in common], [pb[p] for p in common])
    out |= {"a": a["name"], "b": b["name"], "a_label": a["label"], "b_label": b["label"]}
    return out


# ---------------------------------------------------------------------------- reference rows and leakage


def _eval_samples(path: str, classes: list[str], mapping: dict, strict: bool = False):
    """The samples ``evaluate`` would score for an --eval-on folder, labelled with the model's class names
    (``strict``: a class that is not one of the model's is an error, as in ``evaluate``)."""
    from .data import Sample, discover, read_class_folders

    data_dir = Path(path)
    names = {p.name.lower() for p in data_dir.iterdir() if p.is_dir()}
    if "train" in names and names & {"test", "val", "validation", "valid"}:
        samples = discover(data_dir).test
    else:
        samples = read_class_folders(data_dir, "DATA_DIR")
    unknown = sorted({s.label for s in samples if mapping.get(s.label, s.label) not in classes})
    if strict and unknown:
        raise TransferlabError(f"--eval-on {path}: class '{unknown[0]}' is not one of the training classes "
                               f"({', '.join(classes)}); map it with --class-map")
    return [Sample(s.path, mapping.get(s.label, s.label)) for s in samples if mapping.get(s.label, s.label) in classes]


def compute_references(exp_dir: str | os.PathLike) -> dict | None:
    """Majority-class baseline and a logistic-regression probe on the frozen features of the grid's first
    backbone (its default weights and preprocessing, the feature cache shared with the runs), per seed's
    test split and per --eval-on folder; and the train/test near-duplicate check. Written to references.json."""
    from .api import seed_everything
    from .backbones import create_backbone
    from .data import Sample, discover
    from .features import FeatureCache, compute_features, default_cache_dir
    from .metrics import compute_metrics
    from .model import TransferModel
    from .precision import resolve_policy

    exp_dir = Path(exp_dir)
    meta = load_experiment(exp_dir)
    runs = [r for r in meta["runs"] if is_finished(exp_dir / RUNS_DIR / r["name"])]
    if not runs:
        return None
    first_config = read_json(exp_dir / RUNS_DIR / runs[0]["name"] / "config.json")
    cfg = TrainConfig.from_dict(first_config["train"])
    classes = first_config["classes"]
    index = {c: i for i, c in enumerate(classes)}
    # One test split per seed (a carved split depends on it): read from a finished run of that seed.
    splits = {}
    for seed in meta["grid"]["seeds"]:
        member = next((r for r in runs if r["seed"] == seed), None)
        if member is not None:
            rows = read_predictions(exp_dir / RUNS_DIR / member["name"])
            if rows:
                splits[seed] = [(Path(row["path"]), row["true"]) for row in rows]
    if not splits:
        return None
    discovered = discover(cfg.data_dir, cfg.test_dir, cfg.labels)
    everything = {Path(s.path).resolve(): s.label for s in discovered.train + (discovered.val or [])
                  + (discovered.test or [])}
    evals = {e["name"]: _eval_samples(e["path"], classes, meta.get("class_map") or {}) for e in meta["eval_on"]}
    key = json.dumps({"runs": [r["name"] for r in runs], "splits": {str(k): [str(p) for p, _ in v]
                                                                     for k, v in splits.items()},
                      "evals": {k: data_fingerprint(e["path"]) for k, e in zip(evals, meta["eval_on"], strict=True)},
                      "threshold": LEAKAGE_THRESHOLD}, sort_keys=True)
    key = hashlib.sha256(key.encode()).hexdigest()
    target = exp_dir / REFERENCES_FILE
    if target.is_file():
        old = read_json(target)
        if isinstance(old, dict) and old.get("key") == key:
            return old
    started = time.perf_counter()
    log.info("reference rows: majority class and logistic-regression probe on %s features", cfg.backbone)
    seed_everything(cfg.seed)  # a random-init backbone (--weights none) must be the runs' one
    policy = resolve_policy(cfg.precision, cfg.device)
    backbone = create_backbone(cfg.backbone, cfg.weights)
    if cfg.image_size is not None:
        backbone.preprocess = backbone.preprocess.with_input_size(cfg.image_size)
    model = policy.prepare_model(TransferModel(backbone, len(classes), cfg.head, cfg.dropout, cfg.pool))
    cache = FeatureCache(None if cfg.cache_dir == "none" else cfg.cache_dir or default_cache_dir())
    samples = [Sample(p, label) for p, label in everything.items() if label in index]
    samples += [s for ev in evals.values() for s in ev]
    features = compute_features(samples, model, backbone.preprocess, policy, cache).features
    feats = {Path(s.path).resolve(): v.float().numpy() for s, v in features.items()}
    del model, backbone

    out = {"key": key, "backbone": cfg.backbone, "weights": cfg.weights, "pool": cfg.pool,
           "datasets": {}, "leakage": None}
    for seed, test in splits.items():
        pairs = [(q.resolve(), label) for q, label in test if q.resolve() in feats and label in index]
        test_paths = [p for p, _ in pairs]
        test_set = set(test_paths)
        train_paths = [p for p, label in everything.items() if p not in test_set and p in feats and label in index]
        x_train = np.stack([feats[p] for p in train_paths])
        y_train = np.array([index[everything[p]] for p in train_paths])
        x_test = np.stack([feats[p] for p in test_paths])
        y_test = np.array([index[label] for _, label in pairs])
        probe = _fit_probe(x_train, y_train, seed)
        majority = int(np.bincount(y_train, minlength=len(classes)).argmax())
        targets = {TEST: (x_test, y_test)}
        for name, ev in evals.items():
            xs = [feats[Path(s.path).resolve()] for s in ev if Path(s.path).resolve() in feats]
            ys = [index[s.label] for s in ev if Path(s.path).resolve() in feats]
            if xs:
                targets[name] = (np.stack(xs), np.array(ys))
        for name, (x, y) in targets.items():
            entry = out["datasets"].setdefault(name, {"majority": [], "probe": []})
            onehot = np.zeros((len(y), len(classes)))
            onehot[:, majority] = 1.0
            entry["majority"].append({"seed": seed, "class": classes[majority],
                                      **_slim(compute_metrics(y, onehot, classes))})
            probs = probe["model"].predict_proba(x)
            entry["probe"].append({"seed": seed, "C": probe["C"], **_slim(compute_metrics(y, probs, classes))})
        if out["leakage"] is None:
            out["leakage"] = leakage_check(x_train, [str(p) for p in train_paths], x_test,
                                           [str(p) for p in test_paths]) | {"seed": seed}
    out["seconds"] = round(time.perf_counter() - started, 3)
    write_json(target, out)
    return out


def _slim(metrics: dict) -> dict:
    return {k: metrics.get(k) for k in (*METRICS, "accuracy_ci95", "n_test")}


def _fit_probe(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """Standardised features -> logistic regression; C chosen by stratified cross-validation on the
    training images only (a plain C=1 fit when a class has fewer than 2 images)."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(3, int(np.bincount(y).min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny or separable data
        if folds >= 2:
            # A small C grid and 3 folds keep the probe to seconds on thousands of images.
            lr = LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], max_iter=500,
                                      cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        else:
            lr = LogisticRegression(C=1.0, max_iter=500)
        model = make_pipeline(StandardScaler(), lr).fit(x, y)
    c = lr.C_[0] if hasattr(lr, "C_") else lr.C
    return {"model": model, "C": float(c)}


def leakage_check(x_train: np.ndarray, train_paths: list[str], x_test: np.ndarray, test_paths: list[str],
                  threshold: float = LEAKAGE_THRESHOLD, limit: int = 100) -> dict:
    """Test/train image pairs whose frozen features have cosine similarity above ``threshold``."""
    def unit(x):
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    sims = unit(x_test.astype(np.float64)) @ unit(x_train.astype(np.float64)).T
    ti, tj = np.nonzero(sims > threshold)
    order = np.argsort(-sims[ti, tj])
    pairs = [{"test": test_paths[int(ti[k])], "train": train_paths[int(tj[k])],
              "similarity": round(float(sims[ti[k], tj[k]]), 4)} for k in order[:limit]]
    nearest = sims.max(axis=1) if sims.size else np.zeros(0)
    closest = np.argsort(-nearest)[:5]
    return {"closest": [{"test": test_paths[int(i)], "train": train_paths[int(sims[i].argmax())],
                         "similarity": round(float(nearest[i]), 4)} for i in closest],
            "threshold": threshold, "n_pairs": int(len(ti)), "n_test_images": int(len(set(ti.tolist()))),
            "n_test": len(test_paths), "n_train": len(train_paths), "pairs": pairs,
            "median_nearest_similarity": float(np.median(nearest)) if len(nearest) else None}


# --------------------------------------------------------------------------------------------- tables


# metrics.json key -> results.csv column ("precision" alone would clash with the TrainConfig field)
CSV_METRICS = {"accuracy": "accuracy", "precision": "precision_macro", "recall": "recall_macro", "f1": "f1_macro",
               "precision_weighted": "precision_weighted", "recall_weighted": "recall_weighted",
               "f1_weighted": "f1_weighted", "roc_auc": "roc_auc"}


def csv_rows(results: dict) -> list[dict]:
    """One row per finished run and dataset (its own test split, then each --eval-on folder)."""
    rows = []
    for r in results["runs"]:
        if not r["finished"]:
            continue
        for d in results["datasets"]:
            m = r["datasets"].get(d)
            if m is None:
                continue
            low, high = m.get("accuracy_ci95") or (None, None)
            row = {"run": r["name"], "configuration": r["label"], "dataset": d, "rank": r["rank"],
                   **{k: v for k, v in r["config"].items()},
                   "selection_by": results["selection_by"], "val_score": r["val_score"],
                   "selection_score": r["selection_score"], "selection_loss": r["selection_loss"]}
            row |= {column: m.get(key) for key, column in CSV_METRICS.items()}
            row |= {"accuracy_ci95_low": low, "accuracy_ci95_high": high, "train_seconds": r["train_seconds"],
                    "images_per_s": round(r["images_per_s"], 2) if r["images_per_s"] else None,
                    "n_test": m.get("n_test")}
            rows.append(row)
    return rows


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(mean, std=None, digits=4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


TABLE_METRICS = (("accuracy", "accuracy"), ("precision", "precision (macro)"), ("recall", "recall (macro)"),
                 ("f1", "F1 (macro)"), ("f1_weighted", "F1 (weighted)"), ("roc_auc", "ROC AUC"))


def results_table(results: dict, dataset: str = TEST) -> dict:
    """The main table for one dataset: a row per configuration (mean ± std over seeds), ranked by the
    selection score, then the reference rows. Cells carry the text, a sort value and a bold flag."""
    multi_seed = len(results["seeds"]) > 1
    columns = ["rank", "configuration"] + (["seeds"] if multi_seed else [])
    columns += ["validation acc" if results["has_validation"] else "selection (train acc)"]
    columns += [title for _, title in TABLE_METRICS] + ["95% CI (acc)", "train s", "images/s", "n test"]
    higher_better = {title: True for _, title in TABLE_METRICS} | {"images/s": True, "train s": False}
    rows = []
    for g in results["groups"]:
        stats = g["datasets"].get(dataset)
        if stats is None:
            continue
        cells = [(_fmt(g["rank"]), g["rank"]), (g["label"], g["label"])]
        if multi_seed:
            cells.append((",".join(map(str, g["seeds"])), len(g["seeds"])))
        cells.append((_cell(g["selection_score"], g["selection_std"]), g["selection_score"]))
        for key, _ in TABLE_METRICS:
            mean, std = stats[key]
            cells.append((_cell(mean, std), mean))
        ci = stats.get("ci95")
        cells.append((f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "see per-run table", ci[0] if ci else None))
        cells.append((_fmt(g["train_seconds"], 1), g["train_seconds"]))
        cells.append((_fmt(g["images_per_s"], 1), g["images_per_s"]))
        n_test = stats["n_test"][0]
        cells.append((_fmt(n_test), n_test))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run",
                     "group": g["group"]})
    for i, title in enumerate(columns):  # bold: best value of the column among the runs
        if title not in higher_better:
            continue
        values = [r["cells"][i]["value"] for r in rows if r["cells"][i]["value"] is not None]
        if values:
            best = max(values) if higher_better[title] else min(values)
            for r in rows:
                if r["cells"][i]["value"] == best:
                    r["cells"][i]["bold"] = True
    refs = (results.get("references") or {}).get("datasets", {}).get(dataset, {})
    for kind, label in (("majority", "reference: majority class"), ("probe", "reference: logistic-regression probe")):
        entries = refs.get(kind)
        if not entries:
            continue
        name = label + (f" ({entries[0]['class']})" if kind == "majority" else
                        f" on frozen {results['references']['backbone']} features")
        cells = [("–", None), (name, name)] + ([(",".join(str(e["seed"]) for e in entries), len(entries))]
                                               if multi_seed else [])
        cells.append(("–", None))
        for key, _ in TABLE_METRICS:
            mean, std = _mean_std([_float(e.get(key)) for e in entries])
            cells.append((_cell(mean, std), mean))
        ci = entries[0].get("accuracy_ci95") if len(entries) == 1 else None
        cells.append((f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–", ci[0] if ci else None))
        cells += [("–", None), ("–", None), (_fmt(entries[0].get("n_test")), entries[0].get("n_test"))]
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "reference"})
    return {"columns": columns, "rows": rows, "dataset": dataset}


def runs_table(results: dict) -> dict:
    """Every run (each seed) on its test split: the per-run numbers behind a mean ± std."""
    columns = ["rank", "run", "seed", "selection", "accuracy", "95% CI", "F1 (macro)", "n test", "train s"]
    rows = []
    for r in sorted([r for r in results["runs"] if r["finished"]], key=lambda r: r["rank"]):
        m = r["datasets"][TEST]
        ci = m.get("accuracy_ci95") or [None, None]
        cells = [(str(r["rank"]), r["rank"]), (r["name"], r["name"]), (str(r["seed"]), r["seed"]),
                 (_fmt(r["selection_score"]), r["selection_score"]), (_fmt(m["accuracy"]), m["accuracy"]),
                 (f"{ci[0]:.3f}–{ci[1]:.3f}" if ci[0] is not None else "–", ci[0]), (_fmt(m["f1"]), m["f1"]),
                 (str(m.get("n_test")), m.get("n_test")), (_fmt(r["train_seconds"], 1), r["train_seconds"])]
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run"})
    return {"columns": columns, "rows": rows}


def cross_table(results: dict) -> dict | None:
    """Accuracy and macro F1 per configuration on each dataset (a column group per dataset)."""
    if len(results["datasets"]) < 2:
        return None
    datasets = results["datasets"]
    rows = []
    for g in results["groups"]:
        cells = [(_fmt(g["rank"]), g["rank"]), (g["label"], g["label"])]
        for d in datasets:
            stats = g["datasets"].get(d)
            for key in ("accuracy", "f1"):
                mean, std = stats[key] if stats else (None, None)
                cells.append((_cell(mean, std), mean))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run"})
    for i in range(2, 2 + 2 * len(datasets)):
        values = [r["cells"][i]["value"] for r in rows if r["cells"][i]["value"] is not None]
        for r in rows:
            r["cells"][i]["bold"] = bool(values) and r["cells"][i]["value"] == max(values)
    refs = (results.get("references") or {}).get("datasets", {})
    for kind, name in (("majority", "reference: majority class"), ("probe", "reference: logistic-regression probe")):
        cells = [("–", None), (name, name)]
        for d in datasets:
            entries = refs.get(d, {}).get(kind) or []
            for key in ("accuracy", "f1"):
                mean, std = _mean_std([_float(e.get(key)) for e in entries])
                cells.append((_cell(mean, std), mean))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "reference"})
    n_tests = {d: next((g["datasets"][d]["n_test"][0] for g in results["groups"] if d in g["datasets"]), None)
               for d in datasets}
    return {"datasets": [{"name": d, "n_test": n_tests[d]} for d in datasets], "rows": rows,
            "columns": ["rank", "configuration"] + [f"{d} {k}" for d in datasets for k in ("accuracy", "F1")]}


def markdown_table(table: dict) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in table["columns"]) + " |",
             "|" + "|".join("---" for _ in table["columns"]) + "|"]
    for row in table["rows"]:
        cells = []
        for c in row["cells"]:
            text = esc(c["text"])
            text = f"**{text}**" if c["bold"] else text
            cells.append(f"*{text}*" if row["kind"] == "reference" and text != "–" else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dataset_title(results: dict, dataset: str) -> str:
    if dataset == TEST:
        return f"test split of {Path(results['meta']['data_dir']).name}"
    path = next(e["path"] for e in results["meta"]["eval_on"] if e["name"] == dataset)
    return f"{dataset} ({path})"


def write_results(exp_dir: str | os.PathLike) -> dict:
    """results.csv, results.md, comparison.png (+ one per --eval-on folder) and class_distribution.png."""
    from .plots import class_distribution_png, comparison_png

    exp_dir = Path(exp_dir)
    results = collect(exp_dir)
    rows = csv_rows(results)
    fields = ["run", "configuration", "dataset", "rank", *TrainConfig.field_names(), "selection_by", "val_score",
              "selection_score", "selection_loss", "accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
              *list(CSV_METRICS.values())[1:], "train_seconds", "images_per_s", "n_test"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    write_text(exp_dir / "results.csv", buffer.getvalue())
    write_text(exp_dir / "results.md", results_markdown(results))
    results["figures"] = {}
    for d in results["datasets"]:
        chart = comparison_chart_data(results, d)
        if chart["labels"]:
            name = "comparison.png" if d == TEST else f"comparison_{d}.png"
            comparison_png(chart["labels"], chart["values"], chart["errors"], exp_dir / name,
                           title=f"Comparison on the {dataset_title(results, d)}", reference=chart["reference"],
                           separators=chart["separators"])
            results["figures"][d] = name
    first = next((r for r in results["runs"] if r["finished"]), None)
    if first and first["data_report"].get("counts"):
        class_distribution_png({k: v for k, v in first["data_report"]["counts"].items() if v},
                               exp_dir / "class_distribution.png")
    return results


def comparison_chart_data(results: dict, dataset: str) -> dict:
    """Configurations in grid order (grouped by the grid's axes), then the reference rows."""
    labels, reference, separators = [], [], []
    metrics = ("accuracy", "precision", "recall", "f1")
    values = {m: [] for m in metrics}
    errors = {m: [] for m in metrics}
    previous = None
    for g in sorted(results["groups"], key=lambda g: g["order"]):
        stats = g["datasets"].get(dataset)
        if stats is None:
            continue
        varying = [a for a in GRID_AXES[:-1] if len(results["meta"]["grid"][a]) > 1]
        # a line between the values of the outermost varying axis, when another axis varies inside it
        outer = g["axes"].get(AXIS_FIELD[varying[0]]) if len(varying) > 1 else None
        if previous is not None and outer != previous:
            separators.append(len(labels))
        previous = outer
        labels.append(g["label"])
        reference.append(False)
        for m in metrics:
            values[m].append(stats[m][0])
            errors[m].append(stats[m][1])
    refs = (results.get("references") or {}).get("datasets", {}).get(dataset, {})
    if labels and refs:
        separators.append(len(labels))
    for kind, name in (("probe", "reference: LR probe"), ("majority", "reference: majority class")):
        entries = refs.get(kind)
        if not entries:
            continue
        labels.append(name)
        reference.append(True)
        for m in metrics:
            mean, std = _mean_std([_float(e.get(m)) for e in entries])
            values[m].append(mean)
            errors[m].append(std)
    return {"labels": labels, "values": values, "errors": errors, "reference": reference, "separators": separators}


def results_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# Experiment: {Path(meta['data_dir']).name}", "", meta["question"], "",
             f"Ranked by {results['selection_by']}, ties by the lower loss there (test numbers are shown, never "
             "used to rank). "
             + ("" if results["has_validation"] else "No validation split: give --val-size to rank on held-out "
                "data. ")
             + ("Mean ± sample std over seeds. " if len(results["seeds"]) > 1 else "")
             + "Best value per column in bold; reference rows in italics.", ""]
    for d in results["datasets"]:
        lines += [f"## {dataset_title(results, d)}", "", markdown_table(results_table(results, d)), ""]
    cross = cross_table(results)
    if cross:
        lines += ["## Across datasets", "", markdown_table(cross), ""]
    if len(results["seeds"]) > 1:
        lines += ["## Every run", "", markdown_table(runs_table(results)), ""]
    if results["mcnemar"]:
        m = results["mcnemar"]
        lines += ["## Paired test of the two best configurations", "",
                  f"McNemar exact test, {m['a_label']} vs {m['b_label']} on {m['n']} shared test images: "
                  f"{m['only_a']} right only by the first, {m['only_b']} only by the second, p = {m['p_value']:.3g}.",
                  ""]
    pending = [r["name"] for r in results["runs"] if not r["finished"]]
    if pending:
        lines += [f"Not finished: {', '.join(pending)}", ""]
    return "\n".join(lines)
