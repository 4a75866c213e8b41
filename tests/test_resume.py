"""Checkpoints: an interrupted or killed run resumes and ends exactly like an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, make_class_folders
from safetensors.torch import load_file

import transferlab
from transferlab.errors import TrainingInterrupted, TransferlabError
from transferlab.training.callbacks import EpochLogger

OPTIONS = dict(TINY, strategy="unfreeze", epochs=4, head_epochs=3, val_size=0.25, cache_dir="none")


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def _history(run_dir: Path) -> list[list[str]]:
    rows = [line.split(",") for line in (run_dir / "history.csv").read_text().splitlines()]
    return [row[:-1] for row in rows]  # without the seconds column


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("resume") / "data", per_class=8)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    transferlab.train(data, out=out, **OPTIONS)
    assert not (out / "checkpoint").exists()  # removed once the run is complete
    return out


@pytest.mark.parametrize("stage, epoch", [("head", 2), ("finetune", 2)])
def test_ctrl_c_then_rerun_gives_the_uninterrupted_result(data, reference, tmp_path, monkeypatch, stage, epoch):
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        original(self, loop, row)
        if loop.stage == stage and row["epoch"] == epoch:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(TrainingInterrupted, match="resume"):
        transferlab.train(data, out=out, **OPTIONS)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == (stage, epoch - 1)
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    transferlab.train(data, out=out, **OPTIONS)
    assert _metrics(out) == _metrics(reference)
    assert _history(out) == _history(reference)
    assert _same_weights(out, reference)
    assert not (out / "checkpoint").exists()


def test_a_run_from_the_image_store_resumed_with_loader_workers_ends_like_the_uninterrupted_one(
        data, reference, tmp_path, monkeypatch):
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        original(self, loop, row)
        if loop.stage == "finetune" and row["epoch"] == 2:
            raise KeyboardInterrupt

    out, stored = tmp_path / "run", dict(OPTIONS, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(TrainingInterrupted):
        transferlab.train(data, out=out, **stored)
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    transferlab.train(data, out=out, **dict(stored, loader_workers=2))  # a speed option: the checkpoint still fits
    assert list((tmp_path / "cache" / "images").glob("*/*.u8"))
    assert _metrics(out) == _metrics(reference)  # the reference decoded in memory, without workers
    assert _history(out) == _history(reference)
    assert _same_weights(out, reference)


def test_checkpoint_of_another_configuration_is_refused(data, tmp_path, monkeypatch):
    def interrupt(self, loop, row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        transferlab.train(data, out=out, **OPTIONS)
    monkeypatch.undo()
    with pytest.raises(TransferlabError, match="different configuration"):
        transferlab.train(data, out=out, **dict(OPTIONS, epochs=5))


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TransferlabError, match="diverged"):
        transferlab.train(data, out=out, **dict(OPTIONS, optimizer="sgd", lr=1e12, head_epochs=3, label_smoothing=0))
    assert (out / "checkpoint" / "state.json").is_file() or not list(out.glob("*.safetensors"))
    assert not (out / "model.safetensors").exists()


def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=24)
    args = ["--backbone", "timm/test_efficientnet", "--weights", "none", "--image-size", "64", "--batch-size", "8",
            "--precision", "fp32", "--strategy", "unfreeze", "--epochs", "30", "--head-epochs", "2",
            "--cache-dir", "none"]
    cmd = [sys.executable, "-m", "transferlab.cli", "-q", "train", str(data)] + args
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "reference")], check=True, capture_output=True, env=env)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state_file = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            state = json.loads(state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = None
        # the first epoch of a stage is always checkpointed (later ones at most once a second), and 29 more
        # epochs remain after it: the kill lands mid-training however fast this machine is
        if state and state["stage"] == "finetune" and state["epoch"] >= 1:
            proc.send_signal(signal.SIGKILL)
            killed_at = state["epoch"]
            break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None, "the run finished before it could be killed mid-training"
    assert killed_at < 30
    assert not (out / "metrics.json").exists()
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True, env=env)
    assert _metrics(out) == _metrics(tmp_path / "reference")
    assert _same_weights(out, tmp_path / "reference")


def test_full_disk_keeps_the_previous_model_and_leaves_no_temporary_file(data, reference, tmp_path, monkeypatch):
    import errno
    import shutil

    import safetensors.torch

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "model.safetensors").read_bytes()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    with pytest.raises(TransferlabError, match="No space left on device"):
        transferlab.train(data, out=out, **OPTIONS)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in out.rglob("*.tmp")]


def test_resume_flag_requires_a_checkpoint(data, tmp_path, capsys):
    from transferlab.cli import main

    with pytest.raises(TransferlabError, match="no checkpoint to resume"):
        transferlab.train(data, out=tmp_path / "fresh", resume=True, **OPTIONS)
    args = ["train", str(data), "--out", str(tmp_path / "fresh-cli"), "--resume", "--backbone", TINY["backbone"],
            "--weights", "none", "--image-size", "64", "--epochs", "1", "--strategy", "freeze"]
    assert main(args) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_resume_flag_continues_an_interrupted_run(data, reference, tmp_path, monkeypatch):
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        original(self, loop, row)
        if loop.stage == "finetune" and row["epoch"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(TrainingInterrupted):
        transferlab.train(data, out=out, **OPTIONS)
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    transferlab.train(data, out=out, resume=True, **OPTIONS)
    assert _metrics(out) == _metrics(reference)


def test_fast_epochs_are_checkpointed_at_most_once_per_interval(data, tmp_path, monkeypatch):
    from transferlab.io import checkpoint
    from transferlab.training import callbacks

    saved = []
    real_save = checkpoint.save_checkpoint

    def recording_save(run_dir, state, config):
        saved.append((state.stage, state.epoch))
        return real_save(run_dir, state, config)

    clock = iter(range(0, 10_000, 1))  # every reading 0.3 s later than the one before
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock) * 0.3)
    monkeypatch.setattr(checkpoint, "save_checkpoint", recording_save)
    transferlab.train(data, out=tmp_path / "run", **dict(OPTIONS, strategy="freeze", epochs=9))
    head = [epoch for stage, epoch in saved if stage == "head"]
    assert head[0] == 1 and head[-1] == 9  # the first and the last epoch always
    assert 2 <= len(head) < 9  # in between, only when a second has passed since the last one
