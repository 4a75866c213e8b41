"""The command line: train / predict / evaluate, JSON lines, user errors (exit 2, one line, no traceback)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_class_folders

from transferlab.cli import main

TINY_ARGS = ["--backbone", "timm/test_efficientnet", "--weights", "none", "--image-size", "64", "--batch-size", "8",
             "--precision", "fp32", "--epochs", "2", "--strategy", "freeze"]


def _read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`transferlab train` once on two easy classes; returns (data, run_dir, exit status, stdout)."""
    root = tmp_path_factory.mktemp("cli")
    data = make_class_folders(root / "data")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["train", str(data), "--out", str(root / "run"), *TINY_ARGS])
    return data, root / "run", rc, stdout.getvalue()


def _error_lines(capsys, argv: list[str]) -> list[str]:
    """Run a command that must fail as a user error; return the stderr lines. The error is one line, the last
    one, after at most the progress log lines written before the problem was found."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("transferlab: error: "), err
    assert sum(line.startswith("transferlab: error:") for line in lines) == 1, err
    assert len(lines) <= 3, err  # e.g. "device cpu, precision fp32" + "2 classes; train ..." + the error
    return lines


# ------------------------------------------------------------------------------------------- happy paths


def test_train(cli_run):
    data, run_dir, rc, stdout = cli_run
    assert rc == 0
    metrics = _read_json(run_dir / "metrics.json")
    assert f"accuracy {metrics['accuracy']:.4f}" in stdout
    assert f"on {metrics['n_test']} test images" in stdout
    assert f"run directory: {run_dir}" in stdout
    train = _read_json(run_dir / "config.json")["train"]
    assert (train["backbone"], train["weights"], train["image_size"], train["batch_size"]) == \
        ("timm/test_efficientnet", "none", 64, 8)
    assert (train["precision"], train["epochs"], train["strategy"], train["data_dir"]) == \
        ("fp32", 2, "freeze", str(data))
    for name in ("model.safetensors", "history.csv", "data_report.json", "confusion_matrix.png",
                 "class_distribution.png", "training_curves.png"):
        assert (run_dir / name).is_file(), name


def test_predict_json_lines(cli_run, capsys, tmp_path):
    data, run_dir, _, _ = cli_run
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(data / "red" / "red_0.png", folder / name)
    (folder / "b.jpg").write_text("not an image")
    rc = main(["predict", str(run_dir), str(folder), "--top-k", "2"])
    out, _ = capsys.readouterr()
    assert rc == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "c.png"]
    assert set(rows[1]) == {"path", "error"} and rows[1]["error"]
    for row in (rows[0], rows[2]):
        assert set(row) == {"path", "label", "score", "top_k"}
        assert len(row["top_k"]) == 2
        assert [c for c, _ in row["top_k"]] in (["blue", "red"], ["red", "blue"])
        assert row["top_k"][0] == [row["label"], row["score"]]
        assert row["top_k"][0][1] >= row["top_k"][1][1]
        assert sum(s for _, s in row["top_k"]) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["top_k"] == rows[2]["top_k"]  # the same image, the same answer

    rc = main(["predict", str(run_dir), str(folder / "a.png"), "--top-k", "1"])
    out, _ = capsys.readouterr()
    assert rc == 0
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["top_k"] == [[rows[0]["label"], rows[0]["score"]]]


def test_evaluate(cli_run, capsys, tmp_path):
    data, run_dir, _, _ = cli_run
    rc = main(["evaluate", str(run_dir), str(data), "--out", str(tmp_path / "eval")])
    out, _ = capsys.readouterr()
    assert rc == 0
    metrics = _read_json(tmp_path / "eval" / "metrics.json")
    assert metrics["n_test"] == 12
    assert f"accuracy {metrics['accuracy']:.4f}" in out and "on 12 test images" in out
    assert (tmp_path / "eval" / "confusion_matrix.png").is_file()

    renamed = make_class_folders(tmp_path / "renamed", per_class=2)
    (renamed / "red").rename(renamed / "rouge")
    rc = main(["evaluate", str(run_dir), str(renamed), "--out", str(tmp_path / "eval2"),
               "--class-map", '{"rouge": "red"}'])
    capsys.readouterr()
    assert rc == 0
    assert _read_json(tmp_path / "eval2" / "data_report.json")["counts"]["evaluation"] == {"blue": 2, "red": 2}


def test_backbones_and_version(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert all(f"efficientnet_lite{n}" in out for n in (0, 1, 2)) and "timm/NAME" in out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "transferlab 0.1.0" in capsys.readouterr().out


def test_train_config_recreates_and_options_override(cli_run, capsys, tmp_path):
    _, run_dir, _, _ = cli_run
    assert main(["-q", "train", "--config", str(run_dir / "config.json"), "--out", str(tmp_path / "same")]) == 0
    assert main(["-q", "train", "--config", str(run_dir / "config.json"), "--out", str(tmp_path / "short"),
                 "--epochs", "1"]) == 0
    capsys.readouterr()
    original = _read_json(run_dir / "config.json")["train"]
    same = _read_json(tmp_path / "same" / "config.json")["train"]
    short = _read_json(tmp_path / "short" / "config.json")["train"]
    assert same == original
    assert short == original | {"epochs": 1}
    m1, m2 = _read_json(run_dir / "metrics.json"), _read_json(tmp_path / "same" / "metrics.json")
    assert (m1["accuracy"], m1["confusion_matrix"], m1["ece"]) == (m2["accuracy"], m2["confusion_matrix"], m2["ece"])
    assert len((tmp_path / "short" / "history.csv").read_text().splitlines()) == 1 + 1
    assert len((tmp_path / "same" / "history.csv").read_text().splitlines()) == 1 + 2


# ------------------------------------------------------------------------------------------- user errors


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    return make_class_folders(tmp_path / "data", per_class=3)


def test_error_missing_data_dir(capsys, tmp_path):
    lines = _error_lines(capsys, ["-q", "train", "--out", str(tmp_path / "out")])
    assert len(lines) == 1 and "DATA_DIR" in lines[0]  # found before anything ran: the error is all of stderr
    line = _error_lines(capsys, ["-q", "train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])[-1]
    assert "nowhere" in line and "folder not found" in line


def test_error_fewer_than_two_classes(capsys, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3, classes=("red",))
    line = _error_lines(capsys, ["-q", "train", str(data), "--out", str(tmp_path / "out"), *TINY_ARGS])[-1]
    assert "at least two class" in line


def test_error_class_without_images(capsys, tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3, classes=("red",))
    (data / "blue").mkdir()
    (data / "blue" / "notes.txt").write_text("no images here")
    line = _error_lines(capsys, ["-q", "train", str(data), "--out", str(tmp_path / "out"), *TINY_ARGS])[-1]
    assert "class 'blue' has no images" in line


@pytest.mark.parametrize(("options", "expected"), [
    (["--head", "12a"], "--head 12a"),
    (["--test-size", "1.5"], "--test-size 1.5"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16"),
    (["--backbone", "no_such_net"], "--backbone no_such_net"),
    (["--backbone", "timm/no_such_model"], "--backbone timm/no_such_model"),
])
def test_error_bad_options(capsys, tiny_data_dir, tmp_path, options, expected):
    argv = ["-q", "train", str(tiny_data_dir), "--out", str(tmp_path / "out"), *TINY_ARGS, *options]
    assert expected in _error_lines(capsys, argv)[-1]
    assert not (tmp_path / "out" / "config.json").exists()


def test_error_modified_model_file(cli_run, capsys, tmp_path):
    data, run_dir, _, _ = cli_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with open(copy / "model.safetensors", "r+b") as fh:  # flip one byte of the weights
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    line = _error_lines(capsys, ["-q", "predict", str(copy), str(data / "red" / "red_0.png")])[-1]
    assert "SHA-256" in line and "model.safetensors" in line
    line = _error_lines(capsys, ["-q", "evaluate", str(copy), str(data), "--out", str(tmp_path / "eval")])[-1]
    assert "SHA-256" in line


@pytest.mark.parametrize(("option", "value"), [("--top-k", "0"), ("--batch-size", "0"), ("--batch-size", "-1")])
def test_error_predict_bad_numbers(cli_run, capsys, option, value):
    data, run_dir, _, _ = cli_run
    line = _error_lines(capsys, ["-q", "predict", str(run_dir), str(data / "red"), option, value])[-1]
    assert f"{option} {value}: must be at least 1" in line


def test_error_torchvision_weights_offline(capsys, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    line = _error_lines(capsys, ["-q", "train", str(tiny_data_dir), "--out", str(tmp_path / "out"),
                                 "--backbone", "vgg16", "--strategy", "freeze", "--epochs", "1"])[-1]
    assert "vgg16-397923af.pth" in line
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in line


def test_user_error_in_a_real_process_prints_no_traceback(tiny_data_dir, tmp_path):
    env = dict(os.environ, TRANSFERLAB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "transferlab.cli", "train", str(tiny_data_dir), "--out", str(tmp_path / "out"),
         "--backbone", "timm/no_such_model", "--precision", "fp32"],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("transferlab: error: --backbone timm/no_such_model")
    assert all(not line.startswith("transferlab: error:") for line in lines[:-1])


def test_main_leaves_the_logger_and_progress_setting_as_it_found_them(tmp_path, capsys):
    import logging

    from transferlab import progress

    log = logging.getLogger("transferlab")
    before = log.handlers[:], log.level, log.propagate, progress.bars_quiet()
    assert main(["-q", "train", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert (log.handlers[:], log.level, log.propagate, progress.bars_quiet()) == before
    assert "transferlab: error:" in capsys.readouterr().err
