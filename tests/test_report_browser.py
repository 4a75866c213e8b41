"""report.html in a real browser: headless Chromium (Debian's chromium + chromium-driver) through Selenium.

Without the browser the test is skipped, except under CI=true where a missing browser is a failure.
A full-page screenshot is saved next to the report (report_screenshot.png) for a person to look at.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from browser import browser_or_skip, chromium
from conftest import TINY, make_class_folders, make_image


def open_report(report: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Load report.html from disk in headless Chromium; returns what the page shows, and saves a full-page
    screenshot. Usable by hand: ``python -c 'from test_report_browser import open_report; ...'``."""
    with chromium(width=width) as driver:
        driver.get(report.resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(function (im) {"
            " return {alt: im.alt, complete: im.complete, width: im.naturalWidth, src: im.src.slice(0, 30)}; });")
        tables = driver.execute_script(
            "return Array.from(document.querySelectorAll('table.results')).map(function (t) {"
            " return {dataset: t.dataset.dataset, runs: t.tBodies[0].rows.length, refs: t.tBodies[1].rows.length,"
            " labels: Array.from(t.tBodies[0].rows).map(function (r) { return r.cells[1].textContent; })}; });")
        external = driver.execute_script(
            "return Array.from(document.querySelectorAll('[src],[href]')).map(function (e) {"
            " return e.getAttribute('src') || e.getAttribute('href'); })"
            ".filter(function (u) { return !/^(data:|#)/.test(u); });")
        if screenshot is not None:  # the page as it opens, full height
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, min(int(height) + 100, 16000))
            driver.save_screenshot(str(screenshot))
        # sorting: click the accuracy header twice (descending), read the column back
        sorted_values = driver.execute_script(
            "var t = document.querySelector('table.results'); var head = t.tHead.rows[0].cells; var i = -1;"
            "for (var k = 0; k < head.length; k++) { if (head[k].textContent.trim() === 'accuracy') { i = k; } }"
            "head[i].click(); head[i].click();"
            "return Array.from(t.tBodies[0].rows).map(function (r) { return parseFloat(r.cells[i].dataset.v); });")
        console = driver.get_log("browser")
        return {"images": images, "tables": tables, "external": external, "console": console,
                "sorted": sorted_values, "title": driver.title}


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory) -> Path:
    """Two frozen runs on tiny data with a train/val layout, one --eval-on folder, one leaked test image."""
    import transferlab

    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    make_class_folders(data / "train", per_class=6)
    make_class_folders(data / "val", per_class=3, start_seed=500)
    shutil.copy(data / "train" / "red" / "red_0.png", data / "val" / "red" / "copy_of_red_0.png")
    make_image(data / "val" / "blue" / "broken.jpg", (0, 0, 0), 1).write_bytes(b"not an image")
    other = make_class_folders(root / "other", per_class=2, classes=("blue",), start_seed=900)
    options = {k: v for k, v in TINY.items() if k != "backbone"}
    transferlab.run_experiment(data, root / "exp", strategies="freeze", optimizers="sgd,adam", heads="0",
                               backbones=TINY["backbone"], epochs=2, eval_on=[other], options=options)
    return root / "exp"


def test_report_opens_offline_with_every_image_and_run(experiment_dir):
    browser_or_skip()
    report = experiment_dir / "report.html"
    shot = experiment_dir / "report_screenshot.png"
    page = open_report(report, shot)
    print(f"screenshot: {shot}")

    assert page["title"].startswith("transferlab experiment")
    assert page["images"], "the report shows no image"
    broken = [im for im in page["images"] if not (im["complete"] and im["width"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert all(im["src"].startswith("data:image/") for im in page["images"])
    # the one link allowed: the experiment's own audit page beside report.html
    external = [ref for ref in page["external"] if ref != "audit/audit.html"]
    assert external == [], f"the page refers to files or the network: {external}"
    errors = [e for e in page["console"] if e.get("level") in ("SEVERE", "ERROR")]
    assert not errors, f"console errors: {errors}"

    with open(experiment_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = {r["configuration"] for r in rows}
    tables = {t["dataset"]: t for t in page["tables"]}
    assert set(tables) == {"test", "other"}
    for table in tables.values():
        assert table["runs"] == 2 and set(table["labels"]) == labels
        assert table["refs"] == 2  # majority class + logistic-regression probe
    assert page["sorted"] == sorted(page["sorted"], reverse=True)
    # 2 runs x (confusion matrix + curves + confusion on the other folder), comparison x 2, class distribution,
    # leaked pair thumbnails (2) and at least the top-loss thumbnails there are
    assert len(page["images"]) >= 2 * 3 + 2 + 1 + 2
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
