"""--strategy auto, the held-out policy and --time-limit (tiny generated images, a small random-init model)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, make_class_folders
from safetensors.numpy import load_file

import transferlab
from transferlab.auto.ranking import CrossValidation
from transferlab.auto.search import AutoSearch, Candidate, Finalist
from transferlab.auto.space import FeatureSet, SearchSpace, forward_gflops, training_speed
from transferlab.cli import main
from transferlab.config import TrainConfig
from transferlab.data.discovery import discover
from transferlab.data.heldout import AUTO_VAL_SIZE, default_val_size, stratified_folds
from transferlab.errors import TransferlabError
from transferlab.io.rundir import RunDir
from transferlab.options import parse_duration

CLASSES = ("red", "blue", "green")
AUTO = {**TINY, "strategy": "auto", "epochs": 2, "head_epochs": 1}


@pytest.fixture
def three_class_data(tmp_path: Path) -> Path:
    root = tmp_path / "three"
    make_class_folders(root / "train", per_class=12, classes=CLASSES)
    make_class_folders(root / "test", per_class=4, classes=CLASSES, start_seed=700)
    return root


# ------------------------------------------------------------------------------------- held-out policy

def test_only_auto_carves_a_validation_split_by_default():
    assert default_val_size("auto") == AUTO_VAL_SIZE > 0
    assert default_val_size("unfreeze") == default_val_size("freeze") == 0.0
    assert TrainConfig(data_dir="d", strategy="auto").resolved().val_size == AUTO_VAL_SIZE
    assert TrainConfig(data_dir="d", strategy="auto", val_size=0.3).resolved().val_size == 0.3


def test_stratified_folds_hold_every_image_out_once_and_lower_k_for_small_classes():
    labels = [0] * 10 + [1] * 3
    folds = stratified_folds(labels, k=5, seed=0)
    assert folds.k == 3 and "3 folds instead of 5" in folds.notes[0]
    held = np.concatenate([h for _, h in folds.splits])
    assert sorted(held.tolist()) == list(range(13))
    for train, held_out in folds.splits:
        assert not set(train) & set(held_out) and {labels[i] for i in held_out} == {0, 1}
    assert [h.tolist() for _, h in stratified_folds(labels, 5, 0).splits] == [h.tolist() for _, h in folds.splits]
    with pytest.raises(TransferlabError, match="at least 2 training images per class"):
        stratified_folds([0, 0, 0, 1], k=5)


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    for bad in ("ten minutes", "0", "-5m"):
        with pytest.raises(TransferlabError, match="--time-limit"):
            parse_duration(bad)


def test_bad_time_limit_is_a_one_line_error(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tiny_data), "--out", str(tmp_path / "r"), "--time-limit", "soon"])
    assert exc.value.code == 2
    assert "--time-limit" in capsys.readouterr().err


def test_auto_needs_a_validation_split(tiny_data, tmp_path):
    with pytest.raises(TransferlabError, match="validation split"):
        transferlab.train(tiny_data, out=tmp_path / "r", **AUTO, val_size=0.0)


# ------------------------------------------------------------------------------------------ time limit

def test_time_limit_stops_within_the_limit_plus_one_epoch(tiny_data, tmp_path):
    limit = 6.0
    started = time.perf_counter()
    run = transferlab.train(tiny_data, out=tmp_path / "r", **{**TINY, "strategy": "unfreeze"}, epochs=100_000,
                            head_epochs=1, time_limit=limit, export=False)
    elapsed = time.perf_counter() - started
    history = [r for r in RunDir(run.directory).read_history()
               if r["stage"] == "finetune"]
    longest = max(float(r["seconds"]) for r in history)
    assert 1 <= len(history) < 100_000
    assert elapsed <= limit + longest + 3.0, (elapsed, longest)  # + model build and writing the run
    metrics = run.metrics
    assert metrics["time_limit"] == {"seconds": limit,
                                     "stopped_after": {"stage": "finetune", "epoch": len(history)}}
    assert RunDir(run.directory).is_finished()
    assert transferlab.load_run(run.directory).predict([next(tiny_data.rglob("*.png"))])


# ------------------------------------------------------------------------------------------------ auto

def _weights(directory: Path) -> dict:
    return load_file(str(Path(directory) / "model.safetensors"))


def _permuted_copy(test_dir: Path, target: Path) -> Path:
    """The test folder with every image moved to the next class's folder: same images, wrong labels."""
    for i, cls in enumerate(CLASSES):
        for image in sorted((test_dir / cls).iterdir()):
            wrong = target / CLASSES[(i + 1) % len(CLASSES)]
            wrong.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, wrong / image.name)
    return target


@pytest.fixture(scope="module")
def auto_pair(tmp_path_factory):
    """The same auto search with the true test folder and with a label-permuted copy of it."""
    root = tmp_path_factory.mktemp("auto")
    make_class_folders(root / "data", per_class=12, classes=CLASSES)
    make_class_folders(root / "test", per_class=4, classes=CLASSES, start_seed=700)
    permuted = _permuted_copy(root / "test", root / "test-permuted")
    runs = [transferlab.train(root / "data", out=root / name, test_dir=test, **AUTO)
            for name, test in (("true", root / "test"), ("permuted", permuted))]
    return runs


def test_auto_writes_a_complete_run_with_its_search_record(auto_pair):
    run = auto_pair[0]
    record = json.loads((run.directory / "auto.json").read_text())
    heads = {c["head"] for c in record["candidates"]}
    assert heads == {"0", "256"}  # the head axis was searched; backbone and size were given
    assert all(c["cv_accuracy"] is not None and 0 <= c["cv_accuracy"] <= 1 for c in record["candidates"])
    assert all(c["gflops"] > 0 for c in record["candidates"])
    names = [f["name"] for f in record["finalists"]]
    assert names[0] == "freeze" and any(n.startswith("unfreeze") for n in names)
    assert record["chosen"] in names and record["reason"] and record["test_split_used_for_choice"] is False
    assert all(f["val_accuracy"] is not None for f in record["finalists"] if f["skipped"] is None)
    assert RunDir(run.directory).is_finished()
    markdown = (run.directory / "auto.md").read_text()
    assert record["chosen"] in markdown and "The test split ranked nothing" in markdown
    assert markdown.count("| timm/test_efficientnet |") == 2
    chosen = next(f for f in record["finalists"] if f["name"] == record["chosen"])
    assert chosen["run_dir"] == "."
    assert run.config["train"]["strategy"] == chosen["strategy"]
    for f in record["finalists"]:  # the others stay complete runs of their own
        if f["name"] != record["chosen"]:
            assert RunDir(run.directory / f["run_dir"]).is_finished()


def test_auto_never_reads_test_labels(auto_pair):
    true, permuted = auto_pair
    records = [json.loads((r.directory / "auto.json").read_text()) for r in auto_pair]
    def decisions(record: dict) -> list[dict]:  # timings and cache hits differ between the two runs
        return [{k: v for k, v in row.items() if "seconds" not in k and k != "features"}
                for row in record["candidates"]]

    assert records[0]["chosen"] == records[1]["chosen"] and decisions(records[0]) == decisions(records[1])
    assert [f["val_accuracy"] for f in records[0]["finalists"]] == [f["val_accuracy"] for f in records[1]["finalists"]]
    a, b = _weights(true.directory), _weights(permuted.directory)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert true.metrics["accuracy"] != permuted.metrics["accuracy"]  # the labels really differ


def test_fine_tuning_is_kept_only_when_it_beats_the_frozen_head_on_validation(tmp_path, tiny_data):
    search = AutoSearch(TrainConfig(data_dir=str(tiny_data), **AUTO), tmp_path / "r")
    cfg = search.cfg
    frozen = Finalist("freeze", cfg, tmp_path, val_accuracy=0.9)
    tuned = Finalist("unfreeze", cfg, tmp_path, val_accuracy=0.9)
    search.finalists = [frozen, tuned]
    assert search.choose(frozen)[0] is frozen  # a tie keeps the frozen head
    tuned.val_accuracy = 0.95
    assert search.choose(frozen)[0] is tuned
    tuned.skipped, tuned.val_accuracy = "time limit", None
    winner, reason = search.choose(frozen)
    assert winner is frozen and "time limit" in reason


def _candidate(backbone: str, size: int, head: str, accuracy: float, gflops: float) -> Candidate:
    return Candidate(backbone, size, head, CrossValidation(accuracy, 0.3, [], 0.0, 1000), gflops)


def test_fine_tuning_starts_with_the_cheapest_candidate_tied_with_the_best(tmp_path, tiny_data):
    search = AutoSearch(TrainConfig(data_dir=str(tiny_data), **AUTO), tmp_path / "r")
    best = _candidate("lite2", 260, "256", 0.962, 1.4)  # standard error at n=1000: 0.006
    scored = [best, _candidate("lite2", 260, "0", 0.960, 1.4), _candidate("lite0", 224, "256", 0.958, 0.8),
              _candidate("lite0", 224, "0", 0.957, 0.8), _candidate("lite1", 320, "256", 0.957, 1.9),
              _candidate("lite0", 320, "256", 0.950, 0.5)]  # cheapest of all, but not tied with the best
    assert search.finetune_choices(scored) == [scored[2], best]  # each set's best head, cheapest first
    alone = [best, _candidate("lite0", 224, "256", 0.90, 0.8)]
    assert search.finetune_choices(alone) == [best]
    cheap_best = [_candidate("lite0", 224, "0", 0.97, 0.8), _candidate("lite2", 352, "0", 0.968, 2.9),
                  _candidate("lite1", 240, "0", 0.966, 1.0)]
    assert search.finetune_choices(cheap_best) == [cheap_best[0], cheap_best[1]]  # then the best-scoring other


class _SpentBudget:
    """A time limit of which ``used`` seconds have passed, whatever the clock says."""

    def __init__(self, seconds: float, used: float):
        self.seconds, self._used, self.deadline = seconds, used, None

    def used(self) -> float:
        return self._used

    def left(self) -> float:
        return self.seconds - self._used


@pytest.mark.parametrize(("used", "ranked_sets"), [(10.0, 2), (60.0, 1)])
def test_ranking_keeps_the_second_half_of_a_time_limit_for_the_finalists(three_class_data, tmp_path, used,
                                                                         ranked_sets):
    space = SearchSpace((FeatureSet(TINY["backbone"], image_size=64), FeatureSet(TINY["backbone"], image_size=96)),
                        ("0",))
    search = AutoSearch(TrainConfig(data_dir=str(three_class_data), **AUTO, time_limit=100.0), tmp_path / "r",
                        space=space)
    search.budget = _SpentBudget(100.0, used)  # 40 s left in both cases: enough for the set and its final run
    search.splits = discover(three_class_data)
    search.rank()
    assert [c.cv is not None for c in search.candidates] == [True, ranked_sets == 2]
    if ranked_sets == 1:  # the first set is always ranked; past half the limit the next one is not
        assert "ranking's share (50%" in search.candidates[1].skipped


def test_forward_gflops_counts_the_model_at_its_input_size():
    import timm

    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).train()
    small, large = forward_gflops(model, 64), forward_gflops(model, 128)
    assert 0 < small and 3.5 < large / small < 4.5  # convolutions: cost grows with the pixel count
    assert model.training  # the mode is restored


@pytest.mark.parametrize("bn", ["frozen", "train"])
def test_training_speed_probes_the_step_fine_tuning_takes(bn):
    from transferlab.models.build import ModelSpec, build_model
    from transferlab.runtime.precision import resolve_policy

    cfg = TrainConfig(data_dir="d", **TINY)
    model = build_model(ModelSpec.of(cfg), 3, resolve_policy("fp32", "cpu"), seed=0)
    norm = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone()
    train_ips, eval_ips = training_speed(model, resolve_policy("fp32", "cpu"), 4, 64, bn=bn, passes=1)
    assert train_ips > 0 and eval_ips > 0
    # --bn frozen keeps ImageNet statistics during fine-tuning, and so does the probe of its cost
    assert torch.equal(norm.running_mean, before) == (bn == "frozen")
    assert not model.training


def test_given_options_fix_their_axis_of_the_search():
    cfg = TrainConfig(data_dir="d", strategy="auto", backbone="resnet18", image_size=160)
    space = SearchSpace.of(cfg, {"backbone", "image_size"})
    assert [(f.backbone, f.size_for(224)) for f in space.feature_sets] == [("resnet18", 160)]
    assert space.heads == ("0", "256")
    full = SearchSpace.of(TrainConfig(data_dir="d", strategy="auto"), set())
    assert {f.backbone for f in full.feature_sets} == {"efficientnet_lite0", "efficientnet_lite1",
                                                       "efficientnet_lite2"}
    assert sorted({f.size_for(224) for f in full.feature_sets}) == [224, 320]


def test_auto_with_a_time_limit_fits_it_and_leaves_a_complete_run(three_class_data, tmp_path):
    limit = 25.0
    started = time.perf_counter()
    run = transferlab.train(three_class_data, out=tmp_path / "r", **{**AUTO, "epochs": 100_000}, time_limit=limit)
    elapsed = time.perf_counter() - started
    record = json.loads((run.directory / "auto.json").read_text())
    tuned = [f for f in record["finalists"] if f["strategy"] == "unfreeze"]
    epoch_seconds = max([float(r["seconds"]) for r in RunDir(tmp_path / "r").read_history()] + [0.0])
    for f in tuned:
        if f["skipped"] is None:
            epochs = [r for r in RunDir(tmp_path / "r" / f["run_dir"]).read_history() if r["stage"] == "finetune"]
            epoch_seconds = max([epoch_seconds] + [float(r["seconds"]) for r in epochs])
            assert len(epochs) < 100_000
    assert elapsed <= limit + epoch_seconds + 3.0, (elapsed, epoch_seconds)
    assert RunDir(run.directory).is_finished() and record["time_limit"] == limit


def test_experiment_time_limit_leaves_the_rest_for_the_next_call(tmp_path):
    from transferlab.api import run_experiment

    data = make_class_folders(tmp_path / "data", per_class=8)
    kwargs = {"strategies": "unfreeze", "optimizers": "adam", "heads": "0", "seeds": "0,1,2,3,4,5,6,7",
              "backbones": TINY["backbone"], "epochs": 2, "audit": False,
              "options": {k: v for k, v in TINY.items() if k != "backbone"} | {"head_epochs": 1}}
    limited = run_experiment(data, tmp_path / "exp", time_limit="1s", **kwargs)
    assert limited.trained >= 1 and limited.not_started >= 1
    assert limited.trained + limited.not_started == 8
    assert (tmp_path / "exp" / "report.html").is_file()  # the report covers what ran
    rest = run_experiment(data, tmp_path / "exp", **kwargs)
    assert (rest.trained, rest.skipped, rest.not_started) == (limited.not_started, limited.trained, 0)
