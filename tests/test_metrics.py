"""transferlab.metrics against scikit-learn and hand-computed values; transferlab.fileio atomic writes."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from transferlab.errors import TransferlabError
from transferlab.io import files as fileio
from transferlab.metrics import compute_metrics, expected_calibration_error, wilson_interval


def random_probs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax scores that agree with the labels more often than chance."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def one_hot(indices, k: int) -> np.ndarray:
    out = np.zeros((len(indices), k))
    out[np.arange(len(indices)), indices] = 1.0
    return out


# ------------------------------------------------------------------------------------------ vs scikit-learn


def test_agrees_with_sklearn_multiclass():
    y, probs = random_probs(80, 4, seed=0)
    pred = probs.argmax(axis=1)
    m = compute_metrics(y, probs, ["a", "b", "c", "d"])
    assert 0.3 < m["accuracy"] < 1.0  # a non-trivial case
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for average, suffix in (("macro", ""), ("weighted", "_weighted")):
        assert m[f"precision{suffix}"] == pytest.approx(skm.precision_score(y, pred, average=average))
        assert m[f"recall{suffix}"] == pytest.approx(skm.recall_score(y, pred, average=average))
        assert m[f"f1{suffix}"] == pytest.approx(skm.f1_score(y, pred, average=average))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    per_f1 = skm.f1_score(y, pred, average=None)
    assert [m["per_class"][c]["f1"] for c in "abcd"] == pytest.approx(per_f1.tolist())
    assert [m["per_class"][c]["support"] for c in "abcd"] == np.bincount(y, minlength=4).tolist()
    assert m["n_test"] == 80 and m["classes"] == ["a", "b", "c", "d"]
    assert "top5_accuracy" not in m


def test_confusion_matrix_rows_are_true_labels():
    y = [0, 0, 0, 1]
    probs = one_hot([1, 1, 0, 1], 2)  # two class-0 images predicted as 1
    m = compute_metrics(y, probs, ["zero", "one"])
    assert m["confusion_matrix"] == [[1, 2], [0, 1]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["zero"]["recall"] == pytest.approx(1 / 3)
    assert m["per_class"]["one"]["precision"] == pytest.approx(1 / 3)


def test_binary_roc_auc_uses_class_one_column():
    y, probs = random_probs(60, 2, seed=1)
    m = compute_metrics(y, probs, ["neg", "pos"])
    expected = skm.roc_auc_score(y, probs[:, 1])
    assert 0.5 < expected < 1.0
    assert m["roc_auc"] == pytest.approx(expected)
    assert m["roc_auc"] != pytest.approx(skm.roc_auc_score(y, probs[:, 0]))


def test_roc_auc_hand_computed():
    y = [0, 0, 1, 1]
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # pairs (neg, pos): 0.1<0.4, 0.1<0.9, 0.6>0.4, 0.6<0.9 -> 3/4
    m = compute_metrics(y, np.stack([1 - p1, p1], axis=1), ["a", "b"])
    assert m["roc_auc"] == pytest.approx(0.75)


def test_roc_auc_none_with_one_class_present():
    y = [1, 1, 1]
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_wilson_interval_hand_computed():
    low, high = wilson_interval(90, 100)
    assert low == pytest.approx(0.8256, abs=2e-4)
    assert high == pytest.approx(0.9448, abs=2e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    low0, high0 = wilson_interval(0, 10)
    assert low0 == 0.0 and high0 == pytest.approx(0.2775, abs=2e-4)
    low1, high1 = wilson_interval(10, 10)
    assert high1 == pytest.approx(1.0) and low1 == pytest.approx(0.7225, abs=2e-4)


def test_accuracy_ci95_in_metrics():
    y = np.array([0] * 50 + [1] * 50)
    pred = y.copy()
    pred[:10] = 1  # 90 of 100 right
    m = compute_metrics(y, one_hot(pred, 2), ["a", "b"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["accuracy_ci95"] == pytest.approx([0.8256, 0.9448], abs=2e-4)


# --------------------------------------------------------------------------------------------------- top-5


def test_top5_only_with_more_than_five_classes():
    y, probs = random_probs(50, 5, seed=2)
    assert "top5_accuracy" not in compute_metrics(y, probs, list("abcde"))
    y, probs = random_probs(200, 8, seed=3)
    m = compute_metrics(y, probs, list("abcdefgh"))
    expected = skm.top_k_accuracy_score(y, probs, k=5, labels=list(range(8)))
    assert m["accuracy"] < expected < 1.0
    assert m["top5_accuracy"] == pytest.approx(expected)


def test_top5_hand_computed():
    probs = np.array([[0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05],
                      [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05]])
    m = compute_metrics([4, 6], probs, list("abcdefg"))  # rank 5 is in, rank 7 is out
    assert m["top5_accuracy"] == pytest.approx(0.5)
    assert m["accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------------- ECE


def test_ece_zero_for_confident_correct():
    y = np.array([0, 1, 2, 1])
    assert expected_calibration_error(y, one_hot(y, 3)) == 0.0
    assert compute_metrics(y, one_hot(y, 3), ["a", "b", "c"])["ece"] == 0.0


def test_ece_overconfident_wrong():
    y = np.array([0, 1, 2, 1])
    assert compute_metrics(y, one_hot([1, 2, 0, 0], 3), ["a", "b", "c"])["ece"] == pytest.approx(1.0)
    # confidence 0.8 everywhere, half right: |0.5 - 0.8| = 0.3
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]])
    assert expected_calibration_error(np.array([0, 1, 1, 0]), probs) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------- evaluation subset


def test_subset_of_classes_averages_over_present():
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 0])  # one prediction of a class absent from y_true
    probs = one_hot(pred, 3) * 0.7 + 0.1
    m = compute_metrics(y, probs, ["a", "b", "c"])
    for name, fn in (("precision", skm.precision_score), ("recall", skm.recall_score), ("f1", skm.f1_score)):
        assert m[name] == pytest.approx(fn(y, pred, labels=[0, 1], average="macro"))
        assert m[name] != pytest.approx(fn(y, pred, labels=[0, 1, 2], average="macro", zero_division=0))
    assert m["recall"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["confusion_matrix"] == [[2, 0, 1], [1, 2, 0], [0, 0, 0]]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_subset_roc_auc_two_of_three_present():
    y = np.array([0, 0, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6], [0.3, 0.0, 0.7]])
    m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["roc_auc"] == pytest.approx(1.0)  # class c always outranks a among the present classes


def test_zero_division_gives_no_warnings():
    y = np.array([0, 0, 1, 1, 2])
    probs = one_hot([0, 0, 0, 0, 0], 3)  # classes 1 and 2 never predicted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["precision"] == pytest.approx((2 / 5) / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["per_class"]["b"]["precision"] == 0.0


def test_metrics_json_serialisable():
    y, probs = random_probs(30, 6, seed=4)
    m = compute_metrics(y, probs, list("abcdef"))
    assert json.loads(json.dumps(m, allow_nan=False)) == m


# -------------------------------------------------------------------------------------------------- fileio


def test_write_json_round_trip_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "out.json"
    fileio.write_json(target, {"a": [1, 2.5], "ü": "x"})
    assert fileio.read_json(target) == {"a": [1, 2.5], "ü": "x"}
    assert target.read_text(encoding="utf-8").endswith("\n")
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_write_json_failed_replace_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    fileio.write_json(target, {"version": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", boom)
    with pytest.raises(TransferlabError, match="out.json: cannot write \\(disk full\\)"):
        fileio.write_json(target, {"version": 2})
    monkeypatch.undo()
    assert fileio.read_json(target) == {"version": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_write_json_unserialisable_keeps_old_content(tmp_path):
    target = tmp_path / "out.json"
    fileio.write_json(target, {"version": 1})
    with pytest.raises(ValueError):
        fileio.write_json(target, {"bad": float("nan")})
    with pytest.raises(TypeError):
        fileio.write_json(target, {"bad": object()})
    assert fileio.read_json(target) == {"version": 1}
    assert os.listdir(tmp_path) == ["out.json"]


def test_atomic_path_error_inside_block_cleans_up(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_read_json_errors(tmp_path):
    with pytest.raises(TransferlabError, match="file not found"):
        fileio.read_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TransferlabError, match="not valid JSON"):
        fileio.read_json(bad)


def test_check_writable_dir(tmp_path):
    created = fileio.check_writable_dir(tmp_path / "a" / "b")
    assert created.is_dir() and list(created.iterdir()) == []
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(TransferlabError, match="--out .*cannot write there") as err:
        fileio.check_writable_dir(blocker / "run")
    assert str(blocker / "run") in str(err.value)
    with pytest.raises(TransferlabError, match="--save"):
        fileio.check_writable_dir(blocker, option="--save")


def test_a_figure_drawn_twice_is_drawn_once(tmp_path, monkeypatch):
    from transferlab import plots

    counts = {"train": {"a": 5, "b": 7}, "test": {"a": 1, "b": 2}}
    plots.class_distribution_png(counts, tmp_path / "first.png")

    def no_drawing(*args):
        raise AssertionError("drawn again")

    monkeypatch.setattr(plots, "_figure", no_drawing)
    plots.class_distribution_png(counts, tmp_path / "second.png")
    assert (tmp_path / "first.png").read_bytes() == (tmp_path / "second.png").read_bytes()
    with pytest.raises(AssertionError, match="drawn again"):  # other inputs: a new figure
        plots.class_distribution_png({"train": {"a": 6, "b": 7}}, tmp_path / "third.png")


@pytest.mark.parametrize("k", [2, 3, 7])
def test_every_metric_matches_sklearn_on_random_cases_with_ties_and_absent_classes(k):
    rng = np.random.default_rng(k)
    for case in range(60):
        n = int(rng.integers(5, 80))
        labels = rng.choice(k, size=int(rng.integers(2, k + 1)), replace=False)  # some classes absent
        y = rng.choice(labels, size=n)
        if len(set(y.tolist())) < 2:
            y[0], y[1] = labels[0], labels[1]
        probs = rng.dirichlet(np.ones(k), size=n)
        if case % 2:
            probs = np.round(probs, 1) + 1e-9  # coarse scores: many ties
            probs /= probs.sum(axis=1, keepdims=True)
        m = compute_metrics(y, probs, [f"c{i}" for i in range(k)])
        pred = probs.argmax(axis=1)
        present = sorted(set(y.tolist()))
        for average, suffix in (("macro", ""), ("weighted", "_weighted")):
            p, r, f, _ = skm.precision_recall_fscore_support(y, pred, labels=present, average=average,
                                                             zero_division=0)
            assert (m[f"precision{suffix}"], m[f"recall{suffix}"], m[f"f1{suffix}"]) == pytest.approx((p, r, f))
        assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=list(range(k))).tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if k == 2:
                expected = skm.roc_auc_score(y, probs[:, 1])
            else:
                scores = probs[:, present] / probs[:, present].sum(axis=1, keepdims=True)
                expected = (skm.roc_auc_score(y == present[1], scores[:, 1]) if len(present) == 2 else
                            skm.roc_auc_score(y, scores, multi_class="ovr", average="macro", labels=present))
        assert m["roc_auc"] == pytest.approx(expected)
        if k > 5:
            assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs, k=5, labels=list(range(k))))
