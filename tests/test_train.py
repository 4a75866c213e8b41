"""End-to-end training with the tiny backbone: run directory contents, splits, strategies, reload, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, TINY, TINY_BACKBONE, make_class_folders, make_image

import transferlab
from transferlab import TrainConfig, TransferlabError
from transferlab.run import Run

METRIC_KEYS = {"accuracy", "accuracy_ci95", "precision", "recall", "f1", "precision_weighted", "recall_weighted",
               "f1_weighted", "per_class", "confusion_matrix", "classes", "n_test", "roc_auc", "ece"}
TIMING_KEYS = {"train_seconds", "total_seconds"}
PNGS = ("confusion_matrix.png", "class_distribution.png", "training_curves.png")


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model.safetensors"))


def _initial_backbone_state() -> dict[str, torch.Tensor]:
    """The random init train() starts from (it seeds everything with seed 0 before building the backbone)."""
    from transferlab.models.backbones import create_backbone

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return {f"backbone.{k}": v for k, v in create_backbone(TINY_BACKBONE, "none").state_dict().items()}


def _assert_valid_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 50 and im.height > 50
        im.verify()


@pytest.fixture(scope="module")
def freeze_run(tmp_path_factory):
    """One freeze run on two easy classes (6 images each), shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("freeze")
    data = make_class_folders(root / "data")
    run = transferlab.train(data, out=root / "run", strategy="freeze", epochs=3, **TINY)
    return data, root / "run", run


# ------------------------------------------------------------------------------------------ run directory


def test_run_directory_config(freeze_run):
    data, out, run = freeze_run
    config = _read_json(out / "config.json")
    assert config["format_version"] == 1
    assert config["classes"] == ["blue", "red"]  # sorted folder names = index order
    assert run.classes == ["blue", "red"]
    pre = config["preprocess"]
    assert (pre["input_size"], pre["interpolation"]) == (64, "bicubic")
    assert pre["resize_size"] >= 64 and len(pre["mean"]) == len(pre["std"]) == 3
    train = config["train"]
    assert train["data_dir"] == str(data)
    assert (train["strategy"], train["epochs"], train["image_size"], train["backbone"]) == \
        ("freeze", 3, 64, TINY_BACKBONE)
    assert (train["lr"], train["weight_decay"]) == (1e-3, 1e-2)  # resolved defaults are recorded
    assert set(train) == set(TrainConfig.field_names())
    assert set(config["versions"]) >= {"transferlab", "torch", "torchvision", "timm", "python"}
    assert config["versions"]["torch"] == torch.__version__
    assert config["backbone"]["name"] == TINY_BACKBONE and config["backbone"]["weights"] == "none"
    assert config["model_sha256"] == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_run_directory_metrics_history_report_and_figures(freeze_run):
    _, out, _ = freeze_run
    metrics = _read_json(out / "metrics.json")
    assert METRIC_KEYS <= set(metrics)
    assert metrics["classes"] == ["blue", "red"]
    assert metrics["n_test"] == 2  # round(0.2 * 6) = 1 per class
    assert np.array(metrics["confusion_matrix"]).shape == (2, 2)
    assert np.array(metrics["confusion_matrix"]).sum() == 2
    assert [metrics["per_class"][c]["support"] for c in ("blue", "red")] == [1, 1]
    assert 0.0 <= metrics["accuracy"] <= 1.0
    low, high = metrics["accuracy_ci95"]
    assert 0.0 <= low <= metrics["accuracy"] <= high <= 1.0
    assert TIMING_KEYS <= set(metrics)

    assert (out / "history.csv").read_text().splitlines()[0] == \
        "stage,epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds"
    rows = _history(out)
    assert [(r["stage"], r["epoch"]) for r in rows] == [("head", "1"), ("head", "2"), ("head", "3")]
    assert all(r["val_acc"] == "" and float(r["train_loss"]) > 0 for r in rows)

    report = _read_json(out / "data_report.json")
    assert report["counts"]["train"] == {"blue": 5, "red": 5}
    assert report["counts"]["test"] == {"blue": 1, "red": 1}
    assert report["counts"]["validation"] == {}
    assert report["skipped"] == [] and report["layout"] == "class folders"
    for name in PNGS:
        _assert_valid_png(out / name)


def test_freeze_keeps_the_backbone_weights(freeze_run):
    _, out, _ = freeze_run
    saved, initial = _weights(out), _initial_backbone_state()
    assert set(initial) < set(saved)
    for key, tensor in initial.items():
        assert torch.equal(saved[key], tensor), key


def test_reload_predicts_the_same(freeze_run):
    data, out, run = freeze_run
    loaded = Run.load(out, precision="fp32")
    assert loaded.classes == run.classes and loaded.preprocess == run.preprocess
    images = sorted(data.rglob("*.png"))
    a, b = run.predict(images, top_k=2), loaded.predict(images, top_k=2)
    assert [r["path"] for r in a] == [str(p) for p in images]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([[s for _, s in r["top_k"]] for r in a], [[s for _, s in r["top_k"]] for r in b],
                               atol=1e-5)
    from transferlab.data.images import decode_for_model

    tensors = [decode_for_model(p, run.preprocess) for p in images]
    pa, pb = run.predict_tensors(tensors), loaded.predict_tensors(tensors)
    assert pa.shape == (12, 2)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pa.sum(1), torch.ones(12))


def test_safetensors_file_holds_the_model(freeze_run):
    _, out, run = freeze_run
    saved = _weights(out)
    own = run.model.state_dict()
    assert set(saved) == set(own)
    for key, tensor in saved.items():
        assert tensor.is_contiguous(), key
        assert torch.equal(tensor, own[key].cpu().contiguous()), key


def test_recreate_from_config_is_deterministic(freeze_run, tmp_path):
    _, out, _ = freeze_run
    cfg = TrainConfig.from_dict(_read_json(out / "config.json")["train"])
    transferlab.train(config=cfg, out=tmp_path / "again")
    first, second = _read_json(out / "metrics.json"), _read_json(tmp_path / "again" / "metrics.json")
    assert set(first) == set(second) and TIMING_KEYS <= set(first)
    # wall-clock timings differ, and where the features came from (the second run reads the first's cache)
    for key in (k for k in first if not k.endswith("_seconds") and k != "inference"):
        assert first[key] == second[key], key
    assert second["inference"]["features"] == {"from_cache": 12, "computed": 0}
    w1, w2 = _weights(out), _weights(tmp_path / "again")
    assert set(w1) == set(w2) and all(torch.equal(w1[k], w2[k]) for k in w1)
    a = [{k: v for k, v in r.items() if k != "seconds"} for r in _history(out)]
    assert a == [{k: v for k, v in r.items() if k != "seconds"} for r in _history(tmp_path / "again")]
    assert _read_json(tmp_path / "again" / "config.json")["train"] == _read_json(out / "config.json")["train"]


def test_unknown_option_is_refused(tmp_path, tiny_data):
    with pytest.raises(TransferlabError, match="unknown option 'bogus'"):
        transferlab.train(tiny_data, out=tmp_path / "r", bogus=1, **TINY)


# ------------------------------------------------------------------------------------------------- splits


def test_stratified_split_sizes(tmp_path):
    data = tmp_path / "data"
    for name, n in (("red", 7), ("blue", 11), ("green", 9)):
        for i in range(n):
            make_image(data / name / f"{i}.png", COLORS[name], seed=100 * n + i)
    run = transferlab.train(data, out=tmp_path / "run", strategy="freeze", epochs=1, **TINY)
    # round(0.2 * n) per class: red 1.4 -> 1, blue 2.2 -> 2, green 1.8 -> 2
    assert run.metrics["n_test"] == 5
    report = _read_json(tmp_path / "run" / "data_report.json")
    assert report["counts"]["test"] == {"blue": 2, "green": 2, "red": 1}
    assert report["counts"]["train"] == {"blue": 9, "green": 7, "red": 6}
    assert [run.metrics["per_class"][c]["support"] for c in ("blue", "green", "red")] == [2, 2, 1]


def test_unfreeze_on_train_val_layout(tiny_split_data, tmp_path):
    out = tmp_path / "run"
    run = transferlab.train(tiny_split_data, out=out, strategy="unfreeze", epochs=1, head_epochs=1, **TINY)
    # hymenoptera-style train/ + val/: val is the test split
    assert run.metrics["n_test"] == 6
    report = _read_json(out / "data_report.json")
    assert report["counts"]["train"] == {"blue": 8, "red": 8}
    assert report["counts"]["test"] == {"blue": 3, "red": 3}
    assert report["layout"].startswith("train/")
    assert [(r["stage"], r["epoch"]) for r in _history(out)] == [("head", "1"), ("finetune", "1")]
    saved, initial = _weights(out), _initial_backbone_state()
    assert not torch.equal(saved["backbone.model.conv_stem.weight"], initial["backbone.model.conv_stem.weight"])
    # bn frozen (default): running statistics never move, even while fine-tuning
    bn_stats = [k for k in initial if k.endswith("running_mean")]
    assert bn_stats and all(torch.equal(saved[k], initial[k]) for k in bn_stats)
    for name in PNGS:
        _assert_valid_png(out / name)


def test_partial_trains_only_the_last_block(tiny_data, tmp_path):
    from transferlab.models.backbones import create_backbone

    out = tmp_path / "run"
    transferlab.train(tiny_data, out=out, strategy="partial", unfreeze_last=1, epochs=1, head_epochs=1, **TINY)
    assert _read_json(out / "config.json")["train"]["unfreeze_last"] == 1
    saved, initial = _weights(out), _initial_backbone_state()
    blocks = create_backbone(TINY_BACKBONE, "none").blocks
    last_convs = [f"backbone.{n}" for n in blocks[-1] if n.endswith("conv_pw.weight") or "conv_head" in n]
    assert last_convs and any(not torch.equal(saved[k], initial[k]) for k in last_convs)
    for name in (n for block in blocks[:-1] for n in block):
        assert torch.equal(saved[f"backbone.{name}"], initial[f"backbone.{name}"]), name


# ------------------------------------------------------------------------------------------- bad images


def _with_broken_image(tiny_data: Path) -> Path:
    broken = tiny_data / "red" / "broken.jpg"
    broken.write_text("this is not a JPEG")
    return broken


def test_bad_image_is_skipped_and_reported(tiny_data, tmp_path):
    broken = _with_broken_image(tiny_data)
    run = transferlab.train(tiny_data, out=tmp_path / "run", strategy="freeze", epochs=1, **TINY)
    report = _read_json(tmp_path / "run" / "data_report.json")
    assert len(report["skipped"]) == 1
    entry = report["skipped"][0]
    assert entry["path"] == str(broken) and entry["label"] == "red" and entry["reason"]
    counts = report["counts"]
    assert counts["train"]["red"] + counts["test"]["red"] == 6  # the 6 good images, not 7
    assert run.metrics["n_test"] == 2


def test_bad_image_with_strict_raises(tiny_data, tmp_path):
    _with_broken_image(tiny_data)
    with pytest.raises(TransferlabError, match=r"broken\.jpg"):
        transferlab.train(tiny_data, out=tmp_path / "run", strategy="freeze", epochs=1, strict=True, **TINY)
    assert not (tmp_path / "run" / "config.json").exists()


# --------------------------------------------------------------------------- validation and early stopping


def test_validation_split_and_early_stopping(tiny_data, tmp_path, monkeypatch):
    import transferlab.data.splits as splits
    import transferlab.training.trainer as trainer

    calls = []
    real_split = splits.split_per_class

    def spy(samples, fraction, seed, split_name, **kw):
        keep, held = real_split(samples, fraction, seed, split_name, **kw)
        calls.append((split_name, {s.path for s in keep}, {s.path for s in held}))
        return keep, held

    monkeypatch.setattr(splits, "split_per_class", spy)
    # lr 0: the head never changes, so validation can never improve
    monkeypatch.setattr(trainer, "make_optimizer",
                        lambda name, groups, lr: torch.optim.SGD([g | {"lr": 0.0} for g in groups], lr=0.0))
    out = tmp_path / "run"
    run = transferlab.train(tiny_data, out=out, strategy="freeze", epochs=10, val_size=0.25, patience=2, **TINY)

    rows = _history(out)
    assert len(rows) == 3 < 10  # best at epoch 1, then 2 epochs without improvement
    assert all(r["val_acc"] != "" and 0 <= float(r["val_acc"]) <= 1 for r in rows)
    assert len({r["val_loss"] for r in rows}) == 1

    assert [name for name, _, _ in calls] == ["test", "validation"]
    (_, rest, test), (_, train, val) = calls
    assert train | val == rest
    assert not (test & val) and not (test & train) and not (train & val)
    report = _read_json(out / "data_report.json")
    assert report["counts"] == {"train": {"blue": 4, "red": 4}, "validation": {"blue": 1, "red": 1},
                                "test": {"blue": 1, "red": 1}}
    assert run.metrics["n_test"] == len(test) == 2


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_on_a_subset_of_classes(freeze_run, tmp_path):
    _, run_dir, _ = freeze_run
    other = make_class_folders(tmp_path / "other", per_class=4, classes=("red",), start_seed=700)
    metrics = transferlab.evaluate(run_dir, other, out=tmp_path / "eval")
    assert metrics["n_test"] == 4 and metrics["classes"] == ["blue", "red"]
    matrix = np.array(metrics["confusion_matrix"])
    assert matrix.shape == (2, 2) and matrix[1].sum() == 4 and matrix[0].sum() == 0
    assert metrics["roc_auc"] is None  # one class present
    assert _read_json(tmp_path / "eval" / "metrics.json")["accuracy"] == metrics["accuracy"]
    _assert_valid_png(tmp_path / "eval" / "confusion_matrix.png")
    assert _read_json(tmp_path / "eval" / "data_report.json")["counts"]["evaluation"] == {"blue": 0, "red": 4}
    # default output folder: RUN_DIR/evaluations/<folder name>
    transferlab.evaluate(run_dir, other)
    assert (run_dir / "evaluations" / "other" / "metrics.json").is_file()


def test_evaluate_unknown_class_needs_a_class_map(freeze_run, tmp_path):
    _, run_dir, _ = freeze_run
    other = make_class_folders(tmp_path / "other", per_class=2, classes=("red", "green"))
    with pytest.raises(TransferlabError, match="--class-map") as info:
        transferlab.evaluate(run_dir, other, out=tmp_path / "eval")
    assert "'green'" in str(info.value)


def test_evaluate_with_class_map(freeze_run, tmp_path):
    _, run_dir, _ = freeze_run
    named = make_class_folders(tmp_path / "named", per_class=3, classes=("red", "blue"), start_seed=900)
    renamed = make_class_folders(tmp_path / "renamed", per_class=3, classes=("red", "blue"), start_seed=900)
    (renamed / "red").rename(renamed / "rouge")  # the same images, the class under another name
    expected = transferlab.evaluate(run_dir, named, out=tmp_path / "e1")
    mapped = transferlab.evaluate(run_dir, renamed, out=tmp_path / "e2", class_map={"rouge": "red"})
    for key in METRIC_KEYS:
        assert mapped[key] == expected[key], key
    report = _read_json(tmp_path / "e2" / "data_report.json")
    assert report["class_map"] == {"rouge": "red"}
    assert report["counts"]["evaluation"] == {"blue": 3, "red": 3}


def test_evaluate_a_train_test_layout_uses_its_test_split(freeze_run, tiny_split_data, tmp_path):
    _, run_dir, _ = freeze_run
    metrics = transferlab.evaluate(run_dir, tiny_split_data, out=tmp_path / "eval")
    assert metrics["n_test"] == 6  # the 3 + 3 images of val/, not the 16 of train/
    report = _read_json(tmp_path / "eval" / "data_report.json")
    assert report["layout"] == "test split" and report["counts"]["evaluation"] == {"blue": 3, "red": 3}


def test_imbalanced_95_to_5_keeps_both_classes_in_test_without_warnings(tmp_path):
    import warnings

    root = tmp_path / "imbalanced"
    for i in range(57):
        make_image(root / "red" / f"r{i}.png", COLORS["red"], seed=i)
    for i in range(3):
        make_image(root / "blue" / f"b{i}.png", COLORS["blue"], seed=100 + i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zero-division or other warning spam
        run = transferlab.train(root, out=tmp_path / "run", strategy="freeze", epochs=2, class_weights="balanced",
                                **TINY)
    metrics = run.metrics
    assert metrics["per_class"]["blue"]["support"] >= 1 and metrics["per_class"]["red"]["support"] >= 1
    assert metrics["n_test"] == 12  # round(0.2 * 57) + max(1, round(0.2 * 3))
