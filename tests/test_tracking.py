"""--track: MLflow (a local SQLite store read back with MlflowClient) and TensorBoard (event files read back with
EventAccumulator) get the parameters, per-epoch metrics, final metrics, figures and files of each run; a tracker
that fails is one warning and never costs the run; tracking is not part of a run's identity."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
from conftest import TINY, TINY_BACKBONE, make_class_folders

import transferlab
from transferlab.api import run_experiment
from transferlab.cli import main
from transferlab.errors import TrainingInterrupted
from transferlab.experiment.spec import ExperimentSpec
from transferlab.io.rundir import RUN_FILES
from transferlab.training.callbacks import EpochLogger

OPTIONS = {k: v for k, v in TINY.items() if k != "backbone"}


def _need(module: str):
    """The optional extra's module; missing: skipped, or failed under CI=true (CI installs every extra)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed (make install installs the tensorboard and mlflow extras)")
        pytest.skip(f"{module} is not installed")


def _client(uri: str):
    return _need("mlflow").MlflowClient(tracking_uri=uri)


def _events(folder: Path):
    module = _need("tensorboard.backend.event_processing.event_accumulator")
    events = module.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 2-run grid (freeze x sgd, adam) with a validation split, tracked by MLflow and TensorBoard at once."""
    _need("mlflow")
    _need("tensorboard")
    root = tmp_path_factory.mktemp("tracked")
    data = make_class_folders(root / "data", per_class=8)
    kwargs = dict(strategies="freeze", optimizers="sgd,adam", heads="0", backbones=TINY_BACKBONE, epochs=3,
                  options={**OPTIONS, "val_size": 0.25}, audit=False)
    result = run_experiment(data, root / "study", track=["mlflow", "tensorboard"], **kwargs)
    return {"exp": root / "study", "data": data, "kwargs": kwargs, "result": result}


def test_mlflow_has_one_run_per_grid_entry_with_its_configuration(tracked):
    exp = tracked["exp"]
    client = _client(f"sqlite:///{exp / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("study")  # named after EXP_DIR
    runs = client.search_runs([experiment.experiment_id])
    meta = json.loads((exp / "experiment.json").read_text())
    assert sorted(r.info.run_name for r in runs) == sorted(e["name"] for e in meta["runs"])
    for entry in meta["runs"]:
        run = next(r for r in runs if r.info.run_name == entry["name"])
        assert run.info.status == "FINISHED"
        assert {k: run.data.tags[k] for k in entry["axes"]} == {k: str(v) for k, v in entry["axes"].items()}
        assert run.data.tags["transferlab.run"] == entry["name"]
        train = json.loads((exp / "runs" / entry["name"] / "config.json").read_text())["train"]
        assert run.data.params == {k: "None" if v is None else str(v) for k, v in train.items()}


def test_mlflow_metric_history_final_metrics_and_artifacts(tracked, tmp_path):
    exp = tracked["exp"]
    client = _client(f"sqlite:///{exp / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("study")
    for run in client.search_runs([experiment.experiment_id]):
        run_dir = exp / "runs" / run.info.run_name
        history = _history(run_dir)
        for name in ("train_loss", "val_acc"):
            logged = client.get_metric_history(run.info.run_id, name)
            assert [m.step for m in logged] == list(range(1, len(history) + 1))
            assert [m.value for m in logged] == pytest.approx([float(r[name]) for r in history], abs=1e-5)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
        assert run.data.metrics["test_images"] == metrics["n_test"]
        files = _artifacts(client, run.info.run_id)
        on_disk = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
        assert sorted(f.removeprefix("run_dir/") for f in files if f.startswith("run_dir/")) == on_disk
        assert {"figures/confusion_matrix.png", "figures/training_curves.png"} <= set(files)
        copy = client.download_artifacts(run.info.run_id, "run_dir/config.json", str(tmp_path))
        assert Path(copy).read_bytes() == (run_dir / "config.json").read_bytes()


def test_tensorboard_has_one_folder_per_run_with_scalars_images_and_hparams(tracked):
    exp = tracked["exp"]
    meta = json.loads((exp / "experiment.json").read_text())
    assert sorted(p.name for p in (exp / "tensorboard").iterdir()) == sorted(e["name"] for e in meta["runs"])
    for entry in meta["runs"]:
        run_dir = exp / "runs" / entry["name"]
        events = _events(exp / "tensorboard" / entry["name"])
        history = _history(run_dir)
        losses = events.Scalars("train_loss")
        assert [e.step for e in losses] == list(range(1, len(history) + 1))
        assert [e.value for e in losses] == pytest.approx([float(r["train_loss"]) for r in history], abs=1e-5)
        accuracy = json.loads((run_dir / "metrics.json").read_text())["accuracy"]
        assert events.Scalars("test_accuracy")[-1].value == pytest.approx(accuracy, abs=1e-6)
        assert "figures/confusion_matrix" in events.Tags()["images"]
        text = {t for t in events.Tags()["tensors"]}
        assert {"config/text_summary", "run_dir/text_summary"} <= text


def test_tracking_changes_no_run_name_nor_file(tracked):
    """The run names are the grid's hashes without tracking, and the run directories hold no tracking file."""
    exp, kwargs = tracked["exp"], tracked["kwargs"]
    plan = ExperimentSpec.create(tracked["data"], exp, **kwargs).plan()
    assert sorted(p.name for p in (exp / "runs").iterdir()) == sorted(r.name for r in plan.runs)
    for run_dir in (exp / "runs").iterdir():
        assert "track" not in json.loads((run_dir / "config.json").read_text())["train"]
        assert not {"mlruns.db", "tensorboard", "mlartifacts"} & {p.name for p in run_dir.iterdir()}


def test_cli_train_tracks_both_by_default_inside_the_run_directory(tmp_path):
    _need("mlflow")
    _need("tensorboard")
    data = make_class_folders(tmp_path / "data", per_class=8)
    out = tmp_path / "r1"
    rc, _, err = _cli(["train", str(data), "--out", str(out), "--backbone", TINY_BACKBONE, "--weights", "none",
                       "--image-size", "64", "--batch-size", "8", "--precision", "fp32", "--strategy", "unfreeze",
                       "--head-epochs", "1", "--epochs", "1", "--track", "tensorboard", "--track", "mlflow"])
    assert rc == 0, err
    history = _history(out)
    assert [r["stage"] for r in history] == ["head", "finetune"]  # one step count over both stages
    assert [e.step for e in _events(out / "tensorboard").Scalars("train_acc")] == [1, 2]
    client = _client(f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("transferlab").experiment_id])
    assert run.info.run_name == "r1" and run.data.params["strategy"] == "unfreeze"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_acc")] == [1, 2]
    assert "run_dir/model.onnx" in _artifacts(client, run.info.run_id)  # written after training, logged too
    assert not any(f.startswith(("run_dir/mlruns", "run_dir/tensorboard", "run_dir/mlartifacts"))
                   for f in _artifacts(client, run.info.run_id))


def test_an_unreachable_server_is_one_warning_and_a_complete_run(tmp_path, monkeypatch, caplog):
    _need("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    data = make_class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="transferlab"):
        run = transferlab.train(data, out=out, strategy="freeze", epochs=3, track="mlflow=http://127.0.0.1:9",
                                **TINY)
    warnings = [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()]
    assert len(warnings) == 1 and "http://127.0.0.1:9" in warnings[0] and "\n" not in warnings[0]
    assert all((out / name).is_file() for name in RUN_FILES)
    assert run.metrics["n_test"] > 0 and len(_history(out)) == 3


def test_an_interrupted_run_continues_its_mlflow_run(tmp_path, monkeypatch):
    _need("mlflow")
    data = make_class_folders(tmp_path / "data", per_class=6)
    out = tmp_path / "run"
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        if row["epoch"] == 3:
            raise KeyboardInterrupt
        original(self, loop, row)

    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(TrainingInterrupted):
        transferlab.train(data, out=out, strategy="freeze", epochs=4, track="mlflow", **TINY)
    client = _client(f"sqlite:///{out / 'mlruns.db'}")
    experiment_id = client.get_experiment_by_name("transferlab").experiment_id
    assert [r.info.status for r in client.search_runs([experiment_id])] == ["KILLED"]
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    transferlab.train(data, out=out, strategy="freeze", epochs=4, track="mlflow", **TINY)
    (run,) = client.search_runs([experiment_id])
    assert run.info.status == "FINISHED"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}  # last per step
    history = _history(out)
    assert sorted(logged) == [1, 2, 3, 4]
    assert [logged[s] for s in sorted(logged)] == pytest.approx([float(r["train_loss"]) for r in history], abs=1e-5)


@pytest.mark.parametrize("value, message", [
    ("wandb", "--track wandb: choose tensorboard, tensorboard=DIR, mlflow or mlflow=URI"),
    ("mlflow=", "--track mlflow=: give a location after '='"),
])
def test_bad_track_values_are_one_line_errors(tmp_path, value, message):
    data = make_class_folders(tmp_path / "data", per_class=3)
    rc, _, err = _cli(["train", str(data), "--out", str(tmp_path / "run"), "--track", value])
    assert rc == 2 and err.startswith("transferlab: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "metrics.json").exists()


def test_importing_transferlab_and_the_tracking_package_imports_no_tracker():
    import subprocess
    import sys

    code = ("import sys, transferlab, transferlab.api, transferlab.tracking, transferlab.experiment.runner; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
