"""Issue 13's table: LR probe, freeze, unfreeze and ``--strategy auto`` (with its time limit) per dataset and
seed; what auto chose; auto's regret against the configuration that was best on test (reported, never used
by auto). Resumable: finished runs are skipped, so the same command continues a killed measurement.

    python benchmarks/measure_auto.py OUT [--datasets hymenoptera,oxford17] [--seeds 0,1,2] [--time-limit 10m]
    python benchmarks/measure_auto.py OUT --table        (the Markdown table of what has finished)

Datasets: the folders of ../shared/data, plus mnist_5k and sklearn_digits (written by
scripts/digits_folders.py into OUT/digits-data; 96 px input, as in benchmarks/measure_accuracy.sh).
freeze / unfreeze are the product's defaults (no validation split); auto carves its 15% validation split
from the same training images, so all methods are scored on the same test split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import transferlab
from transferlab.api import run_experiment
from transferlab.io.rundir import RunDir
from transferlab.metrics import wilson_interval
from transferlab.options import parse_duration
from transferlab.provenance import cpu_name

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DIGITS = ("mnist_5k", "sklearn_digits")
ALL = ("hymenoptera", "cats_and_dogs", "oxford17", "aid_dev", *DIGITS)


def dataset_path(name: str, out: Path) -> Path:
    if name in DIGITS:
        target = out / "digits-data"
        if not (target / name).is_dir():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "digits_folders.py"), str(target)], check=True,
                           stdout=subprocess.DEVNULL)
        return target / name
    return SHARED / name


def options_for(name: str) -> dict:
    return {"image_size": 96} if name in DIGITS else {}


def measure(name: str, seeds: list[int], out: Path, time_limit: str) -> None:
    data, options = dataset_path(name, out), options_for(name)
    started = time.perf_counter()
    run_experiment(data, out / name / "grid", strategies="freeze,unfreeze", seeds=",".join(map(str, seeds)),
                   audit=False, options=dict(options))
    log_time(out, name, "grid", time.perf_counter() - started)
    for seed in seeds:
        target = out / name / f"auto-s{seed}"
        if RunDir(target).auto.is_file():
            continue
        started = time.perf_counter()
        transferlab.train(data, out=target, strategy="auto", seed=seed, time_limit=parse_duration(time_limit),
                          **options)
        log_time(out, name, f"auto-s{seed}", time.perf_counter() - started)


def log_time(out: Path, name: str, what: str, seconds: float) -> None:
    with open(out / "wall_times.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"dataset": name, "what": what, "seconds": round(seconds, 1)}) + "\n")


def _grid_rows(exp: Path) -> dict[tuple[str, int], float]:
    import csv

    rows = {}
    with open(exp / "results.csv", newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["dataset"] == "test":
                rows[(row["strategy"], int(row["seed"]))] = float(row["accuracy"])
    return rows


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def _interval(values: list[float], n: int) -> str:
    if not values or not n:
        return ""
    low, high = wilson_interval(round(statistics.mean(values) * n), n)
    return f" [{low:.3f}, {high:.3f}]"


def dataset_row(name: str, out: Path) -> str | None:
    exp = out / name / "grid"
    if not (exp / "results.csv").is_file():
        return None
    grid = _grid_rows(exp)
    references = json.loads((exp / "references.json").read_text())["datasets"]["test"]["probe"]
    probe = {r["seed"]: r["accuracy"] for r in references}
    n_test = references[0]["n_test"]
    autos, chosen, regrets, walls, limits = {}, [], [], [], set()
    for seed in sorted({s for _, s in grid}):
        target = RunDir(out / name / f"auto-s{seed}")
        if not target.auto.is_file():
            continue
        record = json.loads(target.auto.read_text())
        autos[seed] = target.read_metrics()["accuracy"]
        chosen.append(_chosen(target))
        walls.append(record["seconds"])
        limits.add(record["time_limit"])
        tried = [RunDir(target.path / f["run_dir"]).read_metrics()["accuracy"] for f in record["finalists"]
                 if f["skipped"] is None]
        best_on_test = max(tried + [grid.get(("freeze", seed), 0.0), grid.get(("unfreeze", seed), 0.0)])
        regrets.append(best_on_test - autos[seed])
    cells = [name, _mean_std(list(probe.values())),
             *(_mean_std([v for (s, _), v in grid.items() if s == strategy]) for strategy in ("freeze", "unfreeze")),
             _mean_std(list(autos.values())) + _interval(list(autos.values()), n_test),
             _against_better(grid, list(autos.values()), n_test),
             "; ".join(chosen) or "–", f"{statistics.mean(regrets):.4f}" if regrets else "–",
             (f"{statistics.mean(walls):.0f} ({'/'.join(f'{v:.0f}' for v in sorted(limits))})" if walls else "–"),
             _grid_seconds(out, name), str(n_test)]
    return "| " + " | ".join(cells) + " |"


def _against_better(grid: dict, autos: list[float], n_test: int) -> str:
    """auto's mean minus the better of freeze's and unfreeze's means, in units of the binomial standard error
    of that better mean on the test images (the issue's goal: no lower than -1)."""
    means = [statistics.mean(v) for strategy in ("freeze", "unfreeze")
             if (v := [a for (s, _), a in grid.items() if s == strategy])]
    if not autos or not means:
        return "–"
    better = max(means)
    error = math.sqrt(better * (1 - better) / n_test)
    gap = statistics.mean(autos) - better
    return f"{gap:+.4f} ({gap / error:+.1f} SE)"


def _chosen(target: RunDir) -> str:
    """What auto chose, e.g. "freeze lite1@320 h256"."""
    train = target.read_config()["train"]
    backbone = train["backbone"].replace("efficientnet_", "")
    return f"{train['strategy']} {backbone}@{train['image_size']} h{train['head']}"


def _grid_seconds(out: Path, name: str) -> str:
    """Wall seconds of the freeze + unfreeze grid (every seed), from the first measurement that ran it."""
    log = out / "wall_times.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return next((f"{r['seconds']:.0f}" for r in rows if r["dataset"] == name and r["what"] == "grid"), "–")


def table(out: Path, names: list[str]) -> str:
    import torch

    cpu = cpu_name()
    lines = [f"Machine: {cpu}, torch AVX512-BF16: "
             f"{torch.cpu._is_avx512_bf16_supported()}", "",
             "| dataset | LR probe | freeze | unfreeze | auto (95% CI at the mean) | "
             "auto - better of freeze, unfreeze | auto chose | auto's regret | auto s (limit) | grid s | test images |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row for name in names if (row := dataset_row(name, out))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--datasets", default=",".join(ALL))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--time-limit", default="10m")
    parser.add_argument("--table", action="store_true", help="only print the table of what has finished")
    args = parser.parse_args()
    out, names = Path(args.out), args.datasets.split(",")
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for name in names:
            measure(name, [int(s) for s in args.seeds.split(",")], out, args.time_limit)
    print(table(out, names))


if __name__ == "__main__":
    main()
