"""Experiment grid on tiny data: files, table rows, run-dir hashing, skip-on-rerun, shared frozen backbone,
reference rows, leakage check, McNemar, seeds, the CLI and study files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import TINY, TINY_BACKBONE, make_class_folders, make_image

import transferlab
import transferlab.experiment.runner
from transferlab import TrainConfig, TransferlabError
from transferlab.api import run_experiment
from transferlab.audit.duplicates import NEAR_DUPLICATE_THRESHOLD
from transferlab.cli import main
from transferlab.experiment.grid import build_grid, data_fingerprint, run_hash
from transferlab.experiment.results import collect, mcnemar
from transferlab.experiment.study import load_study
from transferlab.run import Run

OPTIONS = {k: v for k, v in TINY.items() if k != "backbone"}
TINY_CLI = ["--backbones", TINY_BACKBONE, "--weights", "none", "--image-size", "64", "--batch-size", "8",
            "--precision", "fp32"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """4 frozen runs (sgd, adam x head 0, 16) on train/ + val/ (val = test), one --eval-on folder holding a
    subset of the classes, and one test image that is a copy of a training image."""
    root = tmp_path_factory.mktemp("grid")
    data = root / "data"
    make_class_folders(data / "train", per_class=6)
    make_class_folders(data / "val", per_class=3, start_seed=500)
    shutil.copy(data / "train" / "blue" / "blue_1.png", data / "val" / "blue" / "leaked.png")
    other = make_class_folders(root / "other", per_class=3, classes=("red",), start_seed=800)
    kwargs = dict(strategies="freeze", optimizers="sgd,adam", heads="0,16", backbones=TINY_BACKBONE, epochs=2,
                  eval_on=[other], options=OPTIONS)
    started = time.perf_counter()
    result = run_experiment(data, root / "exp", **kwargs)
    return {"root": root, "data": data, "other": other, "exp": root / "exp", "result": result, "kwargs": kwargs,
            "seconds": time.perf_counter() - started}


def test_grid_writes_every_file(grid):
    exp, result = grid["exp"], grid["result"]
    assert (result.trained, result.skipped) == (4, 0)
    for name in ("experiment.json", "references.json", "results.csv", "results.md", "comparison.png",
                 "comparison_other.png", "class_distribution.png", "report.html"):
        assert (exp / name).is_file(), name
    for name in ("comparison.png", "comparison_other.png", "class_distribution.png"):
        assert (exp / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("audit.json", "label_issues.csv", "audit.html", "learning_curve.png"):  # the data audit
        assert (exp / "audit" / name).is_file(), name
    audit = _json(exp / "audit" / "audit.json")
    assert audit["label_issues"]["scored"] == 12 + 7 and audit["model"]["backbone"] == TINY_BACKBONE
    assert audit["duplicates"]["n_exact"] == 1 and audit["duplicates"]["n_cross_split"] >= 1  # leaked.png
    html = (exp / "report.html").read_text(encoding="utf-8")
    assert 'id="audit"' in html and "audit/audit.html" in html
    runs = sorted((exp / "runs").iterdir())
    assert len(runs) == 4
    for run_dir in runs:
        for name in ("config.json", "metrics.json", "history.csv", "confusion_matrix.png", "training_curves.png",
                     "test_predictions.csv", "evaluations/other/metrics.json",
                     "evaluations/other/confusion_matrix.png"):
            assert (run_dir / name).is_file(), f"{run_dir.name}/{name}"


def test_results_csv_has_one_row_per_run_and_dataset(grid):
    exp = grid["exp"]
    rows = _rows(exp / "results.csv")
    names = sorted(p.name for p in (exp / "runs").iterdir())
    assert len(rows) == 4 * 2
    assert sorted((r["run"], r["dataset"]) for r in rows) == sorted((n, d) for n in names for d in ("test", "other"))
    for column in (*TrainConfig.field_names(), "val_score", "selection_score", "accuracy", "accuracy_ci95_low",
                   "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
                   "f1_weighted", "roc_auc", "train_seconds", "images_per_s", "n_test", "rank"):
        assert column in rows[0], column
    for r in rows:
        run_dir = exp / "runs" / r["run"]
        source = "metrics.json" if r["dataset"] == "test" else "evaluations/other/metrics.json"
        metrics = _json(run_dir / source)
        assert float(r["accuracy"]) == pytest.approx(metrics["accuracy"])
        assert float(r["f1_macro"]) == pytest.approx(metrics["f1"])
        assert int(r["n_test"]) == metrics["n_test"] == (7 if r["dataset"] == "test" else 3)
        assert r["strategy"] == "freeze" and r["optimizer"] in ("sgd", "adam") and r["head"] in ("0", "16")
        assert r["precision"] == "fp32"  # the config field, not a metric
        assert r["val_score"] == ""  # no validation split
        assert r["selection_by"] == "final training accuracy"
    assert sorted({int(r["rank"]) for r in rows}) == [1, 2, 3, 4]


def test_results_markdown_and_references(grid):
    exp = grid["exp"]
    md = (exp / "results.md").read_text(encoding="utf-8")
    assert "Ranked by final training accuracy" in md and "No validation split" in md
    for label in ("sgd · head 0", "sgd · head 16", "adam · head 0", "adam · head 16"):
        assert md.count(f"| {label} |") == 3  # test table, other table, cross-dataset table
    assert md.count("reference: majority class") == 3 and md.count("reference: logistic-regression probe") == 3
    assert "**" in md and "McNemar" in md
    refs = _json(exp / "references.json")
    for dataset in ("test", "other"):
        assert {"majority", "probe"} <= set(refs["datasets"][dataset])
    majority = refs["datasets"]["test"]["majority"][0]
    assert majority["class"] == "blue"  # 6 blue (+0) vs 6 red training images: ties go to the first class
    assert majority["accuracy"] == pytest.approx(4 / 7)  # 3 blue + the leaked copy among 7 test images
    assert 0 <= refs["datasets"]["test"]["probe"][0]["accuracy"] <= 1


def test_leakage_check_finds_the_copied_image(grid):
    leakage = _json(grid["exp"] / "references.json")["leakage"]
    assert leakage["threshold"] == NEAR_DUPLICATE_THRESHOLD  # one measured threshold, the audit's
    assert leakage["n_test"] == 7 and leakage["n_train"] == 12
    assert leakage["n_test_images"] >= 1
    top = leakage["pairs"][0]
    assert Path(top["test"]).name == "leaked.png" and Path(top["train"]).name == "blue_1.png"
    assert top["similarity"] == pytest.approx(1.0, abs=1e-4)
    html = (grid["exp"] / "report.html").read_text(encoding="utf-8")
    assert "leaked.png" in html


def test_run_directory_names_are_readable_and_hashed(grid):
    exp, data = grid["exp"], grid["data"]
    pattern = re.compile(r"^timm_test_efficientnet-freeze-(sgd|adam)-h(0|16)-s0-([0-9a-f]{8})$")
    fingerprint = data_fingerprint(data)
    for run_dir in (exp / "runs").iterdir():
        match = pattern.match(run_dir.name)
        assert match, run_dir.name
        config = TrainConfig.from_dict(_json(run_dir / "config.json")["train"])
        assert run_hash(config, fingerprint) == match.group(3)


def test_hash_ignores_paths_and_display_options_but_not_results(grid, tmp_path):
    data = grid["data"]
    base = TrainConfig(data_dir=str(data), backbone=TINY_BACKBONE, strategy="freeze", **OPTIONS)
    axes = {"backbones": [TINY_BACKBONE], "strategies": ["freeze"], "optimizers": ["adam"], "heads": ["0"],
            "seeds": [0]}
    name = build_grid(base, axes)[0].name
    moved = shutil.copytree(data, tmp_path / "elsewhere" / "data", copy_function=shutil.copyfile)  # new mtimes
    same = [base.replace(data_dir=str(moved)), base.replace(precision="auto"),
            base.replace(cache_dir=str(tmp_path / "cache")), base.replace(device="cpu")]
    for cfg in same:
        assert build_grid(cfg, axes)[0].name == name
    for cfg in (base.replace(epochs=3), base.replace(lr=0.5), base.replace(val_size=0.2), base.replace(dropout=0.0)):
        assert build_grid(cfg, axes)[0].name != name
    assert build_grid(base, {**axes, "seeds": [1]})[0].name != name
    make_image(moved / "train" / "red" / "new.png", (200, 0, 0), 5)
    assert build_grid(base.replace(data_dir=str(moved)), axes)[0].name != name
    (moved / "train" / "red" / "new.png").unlink()
    image = moved / "train" / "red" / "red_0.png"
    image.write_bytes(image.read_bytes()[:-1] + bytes([image.read_bytes()[-1] ^ 1]))  # same size, one bit
    assert build_grid(base.replace(data_dir=str(moved)), axes)[0].name != name
    # epochs default (None) resolves per strategy before hashing: 30 for freeze
    assert build_grid(base.replace(epochs=None), axes)[0].name == build_grid(base.replace(epochs=30), axes)[0].name


def test_rerun_skips_finished_runs(grid, monkeypatch):
    exp = grid["exp"]
    before = {p.name: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/config.json")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(transferlab.experiment.runner, "Trainer", no_training)
    monkeypatch.setattr(transferlab.experiment.runner, "evaluate", no_training)
    started = time.perf_counter()
    result = run_experiment(grid["data"], exp, **grid["kwargs"])
    seconds = time.perf_counter() - started
    assert (result.trained, result.skipped) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in (exp / "runs").glob("*/config.json")} == before
    assert len(_rows(exp / "results.csv")) == 8
    assert seconds < max(10.0, grid["seconds"] / 2), f"re-rendering a finished experiment took {seconds:.1f}s"


def test_an_unfinished_run_is_trained_again(grid, tmp_path):
    exp = shutil.copytree(grid["exp"], tmp_path / "exp")
    victim = sorted((exp / "runs").iterdir())[0]
    (victim / "metrics.json").unlink()
    result = run_experiment(grid["data"], exp, **grid["kwargs"])
    assert (result.trained, result.skipped) == (1, 3)
    assert (victim / "metrics.json").is_file()
    # a run trained again is evaluated again (its old evaluation belongs to the old weights)
    evaluated = (victim / "evaluations" / "other" / "metrics.json").stat().st_mtime_ns
    assert evaluated >= (victim / "config.json").stat().st_mtime_ns


def test_frozen_runs_share_one_backbone_file(grid):
    exp = grid["exp"]
    blobs = list((exp / "shared").iterdir())
    assert len(blobs) == 1 and re.fullmatch(r"[0-9a-f]{64}\.safetensors", blobs[0].name)
    inodes = {(p.stat().st_dev, p.stat().st_ino) for p in (exp / "runs").glob("*/backbone.safetensors")}
    assert inodes == {(blobs[0].stat().st_dev, blobs[0].stat().st_ino)}
    assert blobs[0].stat().st_nlink == 1 + 4
    from safetensors.torch import load_file

    for run_dir in (exp / "runs").iterdir():
        config = _json(run_dir / "config.json")
        head = load_file(str(run_dir / "model.safetensors"))
        assert head and all(k.startswith("head.") for k in head)
        assert config["weight_files"] == {"model.safetensors": config["model_sha256"],
                                          "backbone.safetensors": blobs[0].name.split(".")[0]}
        assert all(k.startswith("backbone.") for k in load_file(str(run_dir / "backbone.safetensors")))


def test_predict_works_on_a_run_with_a_shared_backbone(grid, tmp_path):
    exp, data = grid["exp"], grid["data"]
    run_dir = sorted((exp / "runs").iterdir())[0]
    # a copy of the folder (no hard link, shared/ gone) still loads: it holds every weight file
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    images = sorted((data / "val" / "red").glob("*.png"))
    rc, out, _ = _cli(["predict", str(copy), *map(str, images), "--top-k", "2"])
    assert rc == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == [p.name for p in images]
    # same probabilities as written at training time
    written = {Path(r["path"]).name: float(r["score"]) for r in _rows(run_dir / "test_predictions.csv")}
    for r in rows:
        assert r["score"] == pytest.approx(written[Path(r["path"]).name], abs=1e-4)
    with open(copy / "backbone.safetensors", "r+b") as fh:  # flip one byte of the backbone
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 1]))
    with pytest.raises(TransferlabError, match="backbone.safetensors: SHA-256 differs"):
        Run.load(copy)
    original = _json(run_dir / "config.json")
    assert Run.load(run_dir).config["weight_files"] == original["weight_files"]  # the original is untouched


def test_test_predictions_csv(grid):
    run_dir = sorted((grid["exp"] / "runs").iterdir())[0]
    rows = _rows(run_dir / "test_predictions.csv")
    metrics = _json(run_dir / "metrics.json")
    assert len(rows) == metrics["n_test"] == 7
    assert list(rows[0]) == ["path", "true", "pred", "score", "prob_blue", "prob_red"]
    correct = sum(r["true"] == r["pred"] for r in rows)
    assert correct / len(rows) == pytest.approx(metrics["accuracy"])
    for r in rows:
        assert Path(r["path"]).is_absolute() and Path(r["path"]).is_file()
        assert float(r["prob_blue"]) + float(r["prob_red"]) == pytest.approx(1.0, abs=1e-5)
        assert float(r["score"]) == pytest.approx(max(float(r["prob_blue"]), float(r["prob_red"])))


def test_standalone_train_keeps_one_weight_file(tmp_path):
    data = make_class_folders(tmp_path / "data")
    run = transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=1, **TINY)
    config = _json(tmp_path / "run" / "config.json")
    assert "weight_files" not in config and not (tmp_path / "run" / "backbone.safetensors").exists()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    assert (tmp_path / "run" / "test_predictions.csv").is_file()
    assert Run.load(run.directory).classes == ["blue", "red"]


def test_mcnemar_exact():
    from scipy.stats import binomtest

    result = mcnemar([1, 1, 0, 0, 1, 1], [1, 0, 0, 1, 0, 1])
    assert (result["only_a"], result["only_b"], result["both_right"], result["both_wrong"]) == (2, 1, 2, 1)
    assert result["p_value"] == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    assert mcnemar([1] * 10, [0] * 10)["p_value"] == pytest.approx(2 * 0.5**10)
    assert mcnemar([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair


def test_seeds_show_mean_and_std_and_validation_ranks(tmp_path):
    """Two seeds x (freeze, unfreeze) with a carved validation split: mean ± std, ranked by validation."""
    data = make_class_folders(tmp_path / "data", per_class=8)
    result = run_experiment(data, tmp_path / "exp", strategies="freeze,unfreeze", optimizers="adam", heads="0",
                            seeds="0,1", backbones=TINY_BACKBONE, epochs=1,
                            options={**OPTIONS, "val_size": 0.25, "head_epochs": 1})
    exp = tmp_path / "exp"
    assert result.trained == 4
    rows = _rows(exp / "results.csv")
    assert len(rows) == 4 and sorted({r["seed"] for r in rows}) == ["0", "1"]
    assert all(r["val_score"] != "" and r["selection_by"] == "validation accuracy" for r in rows)
    results = collect(exp)
    assert [sorted(g["seeds"]) for g in results["groups"]] == [[0, 1], [0, 1]]
    md = (exp / "results.md").read_text(encoding="utf-8")
    assert "Ranked by validation accuracy" in md and "±" in md and "## Every run" in md
    # frozen runs of different seeds (random init differs per seed) share nothing; unfreeze runs store one file
    unfreeze = [p for p in (exp / "runs").iterdir() if "-unfreeze-" in p.name]
    assert len(unfreeze) == 2
    for run_dir in unfreeze:
        assert not (run_dir / "backbone.safetensors").exists()
        assert "weight_files" not in _json(run_dir / "config.json")
    assert len(list((exp / "shared").iterdir())) == 2
    html = (exp / "report.html").read_text(encoding="utf-8")
    assert "±" in html and "No validation split exists" not in html


def test_cli_experiment_report_and_study_file(tmp_path):
    data = make_class_folders(tmp_path / "data")
    exp = tmp_path / "exp"
    rc, out, err = _cli(["experiment", str(data), "--out", str(exp), "--strategies", "freeze", "--optimizers",
                         "adam", "--heads", "0", "--epochs", "1", *TINY_CLI])
    assert rc == 0, err
    assert "1 run(s) trained, 0 skipped" in out and "report.html" in out
    meta = _json(exp / "experiment.json")
    assert meta["command"].startswith("transferlab experiment ") and "--strategies freeze" in meta["command"]
    assert len(_rows(exp / "results.csv")) == 1

    (exp / "report.html").unlink()
    rc, out, err = _cli(["report", str(exp)])
    assert rc == 0, err
    assert (exp / "report.html").is_file() and "report:" in out

    # the same grid from a TOML file (paths relative to it): the finished run is found and skipped
    study = tmp_path / "study.toml"
    study.write_text('data_dir = "data"\nout = "exp"\nstrategies = ["freeze"]\noptimizers = "adam"\nheads = ["0"]\n'
                     f'backbones = ["{TINY_BACKBONE}"]\nepochs = 1\nquestion = "Does it work?"\n\n[train]\n'
                     'weights = "none"\nimage_size = 64\nbatch_size = 8\nprecision = "fp32"\n', encoding="utf-8")
    assert load_study(study)["data_dir"] == str(data)
    rc, out, err = _cli(["experiment", str(study)])
    assert rc == 0, err
    assert "0 run(s) trained, 1 skipped" in out
    meta = _json(exp / "experiment.json")
    assert meta["question"] == "Does it work?" and "[train]" in meta["study_toml"]
    assert "Does it work?" in (exp / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("argv, message", [
    (["--heads", "12y"], "--head 12y"),
    (["--strategies", "melt"], "--strategy melt: choose one of"),
    (["--seeds", "0,x"], "--seeds 0,x: 'x' is not a valid value"),
    (["--eval-on", "/nonexistent/folder"], "--eval-on /nonexistent/folder: folder not found"),
    (["--eval-on", "{other}"], "class 'green' is not one of the training classes"),
])
def test_cli_experiment_errors(tmp_path, argv, message):
    data = make_class_folders(tmp_path / "data", per_class=3)
    other = make_class_folders(tmp_path / "other", per_class=1, classes=("red", "green"))
    argv = [a.format(other=other) for a in argv]
    rc, _, err = _cli(["experiment", str(data), "--out", str(tmp_path / "exp"), *TINY_CLI, *argv])
    assert rc == 2
    assert not (tmp_path / "exp" / "runs").exists()  # nothing trained before the error
    assert err.startswith("transferlab: error: ") and message in err and "Traceback" not in err


def test_cli_report_and_study_errors(tmp_path):
    rc, _, err = _cli(["report", str(tmp_path)])
    assert rc == 2 and "not an experiment folder" in err
    study = tmp_path / "s.toml"
    study.write_text('data_dir = "d"\nstrategy = "freeze"\n', encoding="utf-8")
    rc, _, err = _cli(["experiment", str(study), "--out", str(tmp_path / "e")])
    assert rc == 2 and "unknown key 'strategy'" in err
