"""experiment --shard K/N: a stable, disjoint, balanced split of the grid; two workers started at once on one
EXP_DIR give the results of one process, train no run twice and compute no feature twice (the cache's lock);
a killed worker's run resumes; `report` merges; bad values are one-line errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import TINY, TINY_BACKBONE, make_class_folders

from transferlab.api import run_experiment
from transferlab.cli import main
from transferlab.errors import TrainingInterrupted, TransferlabError
from transferlab.experiment.grid import RunSpec
from transferlab.experiment.shard import Shard
from transferlab.io.lock import file_lock
from transferlab.training.callbacks import EpochLogger

OPTIONS = {k: v for k, v in TINY.items() if k != "backbone"}
GRID = dict(strategies="freeze", optimizers="sgd,adam", heads="0,16", backbones=TINY_BACKBONE, epochs=3, audit=False)
GRID_CLI = ["--strategies", "freeze", "--optimizers", "sgd,adam", "--heads", "0,16", "--backbones", TINY_BACKBONE,
            "--epochs", "3", "--no-audit", "--weights", "none", "--image-size", "64", "--batch-size", "8",
            "--precision", "fp32"]
TIMING = ("train_seconds", "images_per_s")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]
    return sorted(rows, key=lambda r: (r["run"], r["dataset"]))


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _spec(name: str) -> RunSpec:
    return RunSpec(name, name, name, None)


@pytest.mark.parametrize("text, shard", [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), (" 3 / 3 ", Shard(3, 3))])
def test_shard_values(text, shard):
    assert Shard.parse(text) == shard and str(Shard.parse(text)) == f"{shard.index}/{shard.count}"


@pytest.mark.parametrize("text", ["0/2", "3/2", "x", "1/0", "", "2", "1/2/3", "-1/2"])
def test_bad_shard_values_name_the_option(text):
    with pytest.raises(TransferlabError, match=f"^--shard {re.escape(text)}: ") as caught:
        Shard.parse(text)
    assert "\n" not in str(caught.value)


def test_the_split_is_disjoint_balanced_and_independent_of_grid_order():
    runs = [_spec(f"run{i}-{h:08x}") for i, h in enumerate([7, 3, 900, 42, 5, 77, 1000, 8, 64, 2, 11])]
    for n in (1, 2, 3, 4, 11, 13):
        shares = [Shard(k, n).select(runs) for k in range(1, n + 1)]
        names = [r.name for share in shares for r in share]
        assert sorted(names) == sorted(r.name for r in runs) and len(set(names)) == len(runs)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        for k, share in enumerate(shares, 1):  # grid order inside a share; the same share for a shuffled grid
            assert share == [r for r in runs if r in share]
            assert {r.name for r in Shard(k, n).select(runs[::-1])} == {r.name for r in share}


def test_a_held_lock_is_refused_without_waiting(tmp_path):
    lock = tmp_path / "a" / "x.lock"
    seen = []

    def try_it():
        with file_lock(lock, blocking=False) as got:
            seen.append(got)

    with file_lock(lock) as first:
        worker = threading.Thread(target=try_it)
        worker.start()
        worker.join(10)
    assert first is True and seen == [False]
    with file_lock(lock, blocking=False) as again:
        assert again is True


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two `--shard` workers started at once on one EXP_DIR with a fresh feature cache, then one process on
    another EXP_DIR with that cache."""
    root = tmp_path_factory.mktemp("shard")
    data = make_class_folders(root / "data", per_class=6)
    cache = root / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "transferlab.cli", "-q", "experiment", str(data), "--out", str(root / "exp"),
           *GRID_CLI, "--cache-dir", str(cache)]
    workers = [subprocess.Popen(cmd + ["--shard", f"{k}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env) for k in (1, 2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err
    single = run_experiment(data, root / "single", **GRID, options={**OPTIONS, "cache_dir": str(cache)})
    return {"root": root, "data": data, "cache": cache, "exp": root / "exp", "single": root / "single",
            "outputs": outputs, "single_result": single}


def test_two_workers_give_the_results_of_one_process(sharded):
    assert sharded["single_result"].trained == 4
    assert _rows(sharded["exp"] / "results.csv") == _rows(sharded["single"] / "results.csv")
    assert (sharded["exp"] / "report.html").is_file()  # written by the worker that finished last
    meta = json.loads((sharded["exp"] / "experiment.json").read_text())
    assert "--shard" not in meta["command"] and len(meta["runs"]) == 4


def test_no_run_is_trained_twice_and_each_worker_trains_its_half(sharded):
    started = [re.findall(r"run \d+/\d+ (\S+): training \(", err) for _, err in sharded["outputs"]]
    assert [len(s) for s in started] == [2, 2]
    names = sorted(p.name for p in (sharded["exp"] / "runs").iterdir())
    assert sorted(started[0] + started[1]) == names


def test_no_feature_is_computed_twice(sharded):
    """Both workers start with an empty cache and need the same features: one computes, the other waits."""
    computed = [json.loads(p.read_text())["inference"]["features"]["computed"]
                for p in (sharded["exp"] / "runs").glob("*/metrics.json")]
    images = sum(1 for p in sharded["data"].rglob("*.png"))
    assert len(computed) == 4 and sum(computed) == images


def test_report_merges_every_finished_run(sharded):
    exp = sharded["exp"]
    for name in ("results.csv", "results.md", "report.html"):
        (exp / name).unlink()
    rc, out, err = _cli(["report", str(exp)])
    assert rc == 0, err
    assert _rows(exp / "results.csv") == _rows(sharded["single"] / "results.csv")
    html = (exp / "report.html").read_text(encoding="utf-8")
    assert all(p.name in html for p in (exp / "runs").iterdir())


def test_a_killed_worker_resumes_its_run_when_started_again(sharded, tmp_path, monkeypatch, caplog):
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        original(self, loop, row)

    kwargs = dict(GRID, options={**OPTIONS, "cache_dir": str(sharded["cache"])}, shard="2/2")
    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(TrainingInterrupted):
        run_experiment(sharded["data"], tmp_path / "exp", **kwargs)
    (victim,) = [p for p in (tmp_path / "exp" / "runs").iterdir() if (p / "checkpoint").is_dir()]
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    with caplog.at_level(logging.INFO, logger="transferlab"):
        result = run_experiment(sharded["data"], tmp_path / "exp", **kwargs)
    assert "head: resuming after epoch 1 (checkpoint)" in caplog.text
    assert (result.trained, result.waiting) == (2, 2) and result.report is None  # shard 1's runs never ran
    done = json.loads((victim / "metrics.json").read_text())
    reference = json.loads((sharded["single"] / "runs" / victim.name / "metrics.json").read_text())
    assert {k: v for k, v in done.items() if not k.endswith("_seconds")} == \
        {k: v for k, v in reference.items() if not k.endswith("_seconds")}


@pytest.mark.parametrize("value", ["0/2", "3/2", "x"])
def test_cli_bad_shard_is_one_line_and_trains_nothing(tmp_path, value):
    data = make_class_folders(tmp_path / "data", per_class=3)
    rc, _, err = _cli(["experiment", str(data), "--out", str(tmp_path / "exp"), *GRID_CLI, "--shard", value])
    assert rc == 2 and err.startswith(f"transferlab: error: --shard {value}: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "exp" / "runs").exists()
