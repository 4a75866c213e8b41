"""The data audit's parts on generated data: k-fold label scores, duplicate groups, the learning-curve fit,
health checks, and `transferlab audit` end to end on tiny folders (bad input included)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
from conftest import TINY, make_class_folders, make_image
from PIL import Image

from transferlab.audit import curve as curves
from transferlab.audit.duplicates import Item, duplicate_groups, exact_pairs
from transferlab.audit.health import health_checks, image_facts
from transferlab.audit.labels import out_of_fold, rank_label_issues
from transferlab.cli import main

TINY_ARGS = ["--backbone", TINY["backbone"], "--weights", "none", "--image-size", "64", "--precision", "fp32"]


def _clusters(n_per_class: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 32)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    return centres[y] + rng.normal(size=(len(y), 32)), y


def test_out_of_fold_scores_put_planted_flips_first():
    x, y = _clusters(60, 3)
    noisy = y.copy()
    flipped = np.array([5, 70, 130, 150])
    noisy[flipped] = (y[flipped] + 1) % 3
    oof = out_of_fold(x, noisy, ["a", "b", "c"], seed=0)
    assert oof.folds == 5 and len(oof.index) == len(y) and oof.c in oof.log_loss
    assert np.allclose(oof.probabilities.sum(axis=1), 1.0)
    quality, flagged = rank_label_issues(noisy, oof.probabilities)
    assert set(np.argsort(quality)[:4]) == set(flipped)  # every flip ranked above every clean image
    assert flagged[flipped].all() and flagged.sum() <= 8


def test_small_classes_lower_k_and_single_images_are_not_scored():
    x, y = _clusters(10, 3)
    y = np.concatenate([y[:20], y[20:23], [2]])  # class 2: 3 + 1 images
    y[-1] = 3  # class 3: one image
    x = x[:24]
    oof = out_of_fold(x, y, ["a", "b", "c", "d"], seed=0)
    assert oof.folds == 3 and any("3 folds instead of 5" in n for n in oof.notes)
    assert any("class 'd' has 1 image" in n for n in oof.notes)
    assert 23 not in oof.index and len(oof.index) == 23
    assert out_of_fold(x[:11], np.array([0] * 10 + [1]), ["a", "b"]) is None  # one class left to score


def test_duplicate_groups_exact_near_conflict_and_splits():
    items = [Item("a.jpg", "cat", "train"), Item("b.jpg", "cat", "test"), Item("c.jpg", "dog", "train"),
             Item("d.jpg", "cat", "train"), Item("e.jpg", "dog", "train"), Item("f.jpg", "dog", "train")]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 64))
    x[1] = x[0] + 0.01 * rng.normal(size=64)  # near copy, other split
    x[3] = x[2] + 0.01 * rng.normal(size=64)  # near copy with another label
    digests = ["h0", "h1", "h2", "h3", "h4", "h4"]  # e and f: the same bytes
    x[5] = x[4]
    groups = duplicate_groups(items, digests, x)
    assert len(groups) == 3
    assert groups[0]["conflict"] and {m["path"] for m in groups[0]["members"]} == {"c.jpg", "d.jpg"}
    assert groups[1]["cross_split"] and groups[1]["kind"] == "near"
    assert groups[2]["kind"] == "exact" and not groups[2]["conflict"]
    assert exact_pairs(["x", None, "x", None]) == [(0, 2, 1.0)]


def test_power_law_fit_recovers_a_curve_and_says_when_it_cannot():
    rng = np.random.default_rng(0)
    truth = curves.PowerLaw(0.95, 0.6, 0.5)
    points = [{"per_class": n, "accuracy": float(truth(n) + rng.normal(0, 0.003))}
              for n in (10, 20, 40, 80, 160) for _ in range(3)]
    fit = curves.fit_curve(points, n_eval=2000)
    assert fit["fitted"] and abs(fit["law"].a - 0.95) < 0.02
    at = curves.predict(fit, 320)
    assert at["low"] < truth(320) < at["high"] and at["high"] - at["low"] < 0.05
    need = curves.images_needed(fit, 0.90)
    assert need["reachable"] and need["low"] < truth.images_for(0.90) < need["high"]
    far = curves.images_needed(fit, fit["law"].a - 0.002)  # within measurement noise of the ceiling
    assert far["reachable"] and far["high"] is None
    assert not curves.images_needed(fit, 0.99)["reachable"]
    few = curves.fit_curve(points[:9], n_eval=100)
    assert not few["fitted"] and "not enough points" in few["reason"]


def test_health_facts_and_checks():
    grey = image_facts((300, 300), np.full((8, 8, 3), 128, np.uint8))
    assert grey["grey"] and grey["contrast"] < 1
    colour = image_facts((40, 400), np.random.default_rng(0).integers(0, 255, (8, 8, 3)).astype(np.uint8))
    assert not colour["grey"] and colour["aspect"] == 10
    items = [Item(f"{i}.png", "a", "train") for i in range(4)]
    checks = {c["check"]: c for c in health_checks(items, [grey, colour, colour, colour], input_size=224)}
    assert checks["small"]["count"] == 3 and checks["aspect"]["count"] == 3 and checks["blank"]["count"] == 1
    assert checks["grey"]["finding"] and checks["grey"]["examples"][0]["path"] == "0.png"
    all_grey = {c["check"]: c for c in health_checks(items[:2], [grey, grey], input_size=224)}
    assert not all_grey["grey"]["finding"]  # a grey data set is not a finding


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_audit_writes_every_file_and_reports_bad_input(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=8)
    (data / "empty").mkdir()  # an empty class folder
    make_image(data / "green" / "only.png", (40, 200, 60), seed=9)  # a class with one image
    (data / "red" / "broken.png").write_bytes(b"not an image")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(data / "blue" / "blank.png")
    rc, out, err = _run(["audit", str(data), "--out", str(tmp_path / "audit"), *TINY_ARGS])
    assert rc == 0, err
    audit_dir = tmp_path / "audit"
    for name in ("audit.json", "label_issues.csv", "audit.html", "learning_curve.png", "class_distribution.png"):
        assert (audit_dir / name).is_file(), name
    record = json.loads((audit_dir / "audit.json").read_text())
    health = record["health"]
    assert [Path(e).name for e in health["empty_classes"]] == ["empty"]
    assert [Path(u["path"]).name for u in health["unreadable"]] == ["broken.png"]
    notes = record["label_issues"]["notes"]
    assert health["few_images"] == ["green"] and any("class 'green' has 1 image" in n for n in notes)
    blank = next(c for c in health["checks"] if c["check"] == "blank")
    assert [Path(e["path"]).name for e in blank["examples"]] == ["blank.png"]
    with open(audit_dir / "label_issues.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == record["label_issues"]["scored"] == 17  # 8 red (+0: broken skipped), 9 blue; green not scored
    assert [int(r["rank"]) for r in rows] == list(range(1, 18))
    assert [float(r["quality"]) for r in rows] == sorted(float(r["quality"]) for r in rows)
    assert "label issues:" in out and "audit:" in out
    page = (audit_dir / "audit.html").read_text()
    assert "Label issues" in page and "broken.png" in page and "data:image/png;base64," in page


def test_cli_audit_one_class_is_a_one_line_error(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3, classes=("red",))
    rc, out, err = _run(["audit", str(data), "--out", str(tmp_path / "audit"), *TINY_ARGS])
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "at least two class folders" in lines[0] and "Traceback" not in err
    rc, _, err = _run(["audit", str(tmp_path / "missing"), "--out", str(tmp_path / "a2"), *TINY_ARGS])
    assert rc == 2 and "folder not found" in err
