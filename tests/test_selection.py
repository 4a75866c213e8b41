"""One rule decides the best epoch (validation accuracy, then the lower loss) for keep-best, early stopping
and the experiment's ranking: with tied accuracies all three name the same epoch."""

from __future__ import annotations

import csv

import pytest
import torch
from conftest import TINY, TINY_BACKBONE, make_class_folders
from safetensors.torch import load_file

import transferlab
from transferlab.api import run_experiment
from transferlab.experiment.results import collect, selection
from transferlab.selection import best_epoch, epoch_score, improves, ranking_key
from transferlab.training.loop import Callback

OPTIONS = {k: v for k, v in TINY.items() if k != "backbone"}


def test_best_epoch_breaks_accuracy_ties_by_the_lower_loss():
    rows = [{"epoch": 1, "val_acc": 0.5, "val_loss": 0.1}, {"epoch": 2, "val_acc": 1.0, "val_loss": 0.6},
            {"epoch": 3, "val_acc": 1.0, "val_loss": 0.4}, {"epoch": 4, "val_acc": 1.0, "val_loss": 0.5}]
    assert best_epoch(rows)["epoch"] == 3
    # full ties keep the earlier epoch; rows read back from history.csv (strings) rank the same
    assert best_epoch(rows + [{"epoch": 5, "val_acc": 1.0, "val_loss": 0.4}])["epoch"] == 3
    as_csv = [{k: str(v) for k, v in r.items()} for r in rows]
    assert best_epoch(as_csv)["epoch"] == "3"
    assert best_epoch([{"epoch": 1, "val_acc": "", "val_loss": ""}]) is None
    assert improves(epoch_score(rows[2]), epoch_score(rows[1])) and not improves(epoch_score(rows[3]),
                                                                                   epoch_score(rows[2]))
    assert sorted([(0.9, 0.2), (1.0, 0.5), (1.0, 0.3), (None, None)], key=lambda r: ranking_key(*r)) == \
        [(1.0, 0.3), (1.0, 0.5), (0.9, 0.2), (None, None)]


def test_experiment_selection_reads_the_same_epoch_from_history():
    row = {"stage": "head", "val_acc": "1.0", "train_acc": "1", "train_loss": "1"}
    history = [row | {"epoch": "1", "val_loss": "0.7"}, row | {"epoch": "2", "val_loss": "0.6"}]
    chosen = selection(history)
    assert (chosen["epoch"], chosen["val_loss"]) == (2, 0.6)  # the first maximum would be epoch 1


class HeadSnapshots(Callback):
    """The head's weights after every epoch of the head stage."""

    def __init__(self):
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def after_epoch(self, loop, row):
        if loop.stage == "head":
            self.states[row["epoch"]] = {k: v.detach().clone() for k, v in loop.module.state_dict().items()}


def _history(run_dir):
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_kept_weights_history_row_and_experiment_selection_are_the_same_epoch(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    snapshots = HeadSnapshots()
    run = transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=10, val_size=0.25,
                            callbacks=[snapshots], **TINY)
    rows = _history(tmp_path / "run")
    accs = [float(r["val_acc"]) for r in rows]
    top = [r for r in rows if float(r["val_acc"]) == max(accs)]
    # the case this test is about: several epochs share the best accuracy with different losses, and the
    # first of them is not the one with the lowest loss
    assert len(top) >= 2 and len({r["val_loss"] for r in top}) == len(top)
    lowest = min(top, key=lambda r: float(r["val_loss"]))
    assert lowest is not top[0]

    saved = {k.removeprefix("head."): v for k, v in load_file(str(tmp_path / "run" / "model.safetensors")).items()
             if k.startswith("head.")}
    kept = [epoch for epoch, state in snapshots.states.items()
            if all(torch.equal(state[k], saved[k]) for k in saved)]
    assert kept == [int(lowest["epoch"])]
    assert run.metrics["selected_epoch"] == {"stage": "head", "epoch": int(lowest["epoch"])}

    result = run_experiment(data, tmp_path / "exp", strategies="freeze", optimizers="adamw", heads="256",
                            backbones=TINY_BACKBONE, epochs=10, options={**OPTIONS, "val_size": 0.25}, render=False)
    record = next(r for r in collect(result.directory)["runs"] if r["finished"])
    exp_run = tmp_path / "exp" / "runs" / record["name"]
    exp_head = {k: v for k, v in load_file(str(exp_run / "model.safetensors")).items() if k.startswith("head.")}
    assert exp_head.keys() == {f"head.{k}" for k in saved}
    assert all(torch.equal(exp_head[f"head.{k}"], v) for k, v in saved.items())  # the same training
    assert record["selected_epoch"] == int(lowest["epoch"])
    assert record["selection_score"] == pytest.approx(float(lowest["val_acc"]))
    assert record["selection_loss"] == pytest.approx(float(lowest["val_loss"]))
    with open(tmp_path / "exp" / "results.csv", newline="") as fh:
        table_row = next(csv.DictReader(fh))
    assert float(table_row["selection_loss"]) == pytest.approx(float(lowest["val_loss"]))
