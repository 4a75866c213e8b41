"""The web app with real weights (EfficientNet-Lite0, frozen, trained on hymenoptera): Grad-CAM checked for
meaning, the page in headless Chromium against the server on loopback, and a bounded load test.

`pytest tests/test_serve_integration.py -s` prints the load test's figures (the README quotes them).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need_shared

import transferlab

pytest.importorskip("fastapi")
from transferlab.data.decode import decode_array  # noqa: E402
from transferlab.explain import Explainer  # noqa: E402
from transferlab.serve.app import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.integration
BEE = "val/bees/1032546534_06907fe3b3.jpg"
LOAD_REQUESTS, LOAD_CLIENTS = 400, 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = need_shared("hymenoptera")
    root = tmp_path_factory.mktemp("serve-real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERLAB_CACHE_DIR", str(root / "cache"))
        transferlab.train(data, out=root / "run", strategy="freeze")
    return {"data": data, "run": root / "run", "root": root}


@pytest.fixture(scope="module")
def explainer(trained):
    return Explainer(trained["run"])


def _pasted(photo: Path, corner: str, out: Path) -> Path:
    """The middle of a real photo pasted into one corner of a plain grey canvas."""
    from PIL import Image

    src = Image.open(photo).convert("RGB")
    w, h = src.size
    piece = src.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4)).resize((170, 170))
    canvas = Image.new("RGB", (400, 400), (128, 128, 128))
    canvas.paste(piece, {"top_left": (0, 0), "bottom_right": (230, 230)}[corner])
    canvas.save(out)
    return out


def _quadrant_share(heatmap: np.ndarray, corner: str) -> float:
    s = heatmap.shape[0] // 2
    part = heatmap[:s, :s] if corner == "top_left" else heatmap[s:, s:]
    return float(part.sum() / heatmap.sum())


def test_gradcam_follows_the_object(trained, explainer, tmp_path):
    pre = explainer.run.preprocess
    maps = {}
    for corner in ("top_left", "bottom_right"):
        image = decode_array(_pasted(trained["data"] / BEE, corner, tmp_path / f"{corner}.png"), pre)
        e = explainer.explain(image, "bees")
        maps[corner] = e.heatmap
        share = _quadrant_share(e.heatmap, corner)
        print(f"pasted {corner}: {share:.2f} of the heat in that quadrant, p(bees) {e.probability:.3f}")
        assert e.heatmap.std() > 0.05  # not constant
        assert share > 0.6
    peaks = {c: np.unravel_index(np.argmax(m), m.shape) for c, m in maps.items()}
    assert peaks["top_left"][0] < 112 <= peaks["bottom_right"][0]  # the peak moves with the object
    assert peaks["top_left"][1] < 112 <= peaks["bottom_right"][1]


def test_gradcam_depends_on_the_weights(trained, explainer):
    image = decode_array(trained["data"] / BEE, explainer.run.preprocess)
    trained_map = explainer.explain(image, "bees").heatmap
    scrambled = Explainer(trained["run"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in scrambled.run.model.parameters():
            p.copy_(torch.randn_like(p) * p.std().clamp_min(1e-3))
    random_map = scrambled.explain(image, "bees").heatmap
    difference = float(np.abs(trained_map - random_map).mean())
    print(f"mean |trained - randomised| heat: {difference:.3f}")
    assert difference > 0.1


@contextlib.contextmanager
def serving(app):
    """The app under uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_page_in_a_real_browser(trained, tmp_path):
    from browser import browser_or_skip, chromium

    browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(create_app(trained["run"])) as url, chromium(width=1100) as driver:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: "test accuracy" in d.find_element(By.ID, "summary").text)
        driver.find_element(By.ID, "files").send_keys(str(trained["data"] / BEE))
        label = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".label")))
        assert label.text == "bees"
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(
            "var im = document.querySelector('img.heatmap'); return im && im.complete && im.naturalWidth > 0;"))
        bars = driver.find_elements(By.CSS_SELECTOR, ".bar .name")
        assert [b.text for b in bars] == ["bees", "ants"]
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        shot = Path(os.environ.get("TRANSFERLAB_SCREENSHOT", tmp_path / "serve.png"))
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000


def test_load_on_loopback(trained):
    """LOAD_REQUESTS single-image requests from LOAD_CLIENTS concurrent clients: no error, batching happens;
    the throughput is printed beside batch predict's on the same images (the goal, >= 0.8 of it, is a
    figure to read, not an assertion: timings depend on the machine)."""
    import httpx

    paths = sorted((trained["data"] / "val").rglob("*.jpg"))
    bodies = [p.read_bytes() for p in paths]
    predictor = transferlab.load_predictor(trained["run"])
    started = time.perf_counter()
    list(predictor.iter_predictions([paths[i % len(paths)] for i in range(LOAD_REQUESTS)]))
    batch_ips = LOAD_REQUESTS / (time.perf_counter() - started)
    app = create_app(trained["run"], ServeSettings(explain=False, batch_size=16, queue_size=LOAD_REQUESTS))
    latencies, failures = [], []
    with serving(app) as url:
        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=60) as http:
                for i in range(k, LOAD_REQUESTS, LOAD_CLIENTS):
                    t0 = time.perf_counter()
                    answer = http.post("/predict", files={"file": (f"{i}.jpg", io.BytesIO(bodies[i % len(bodies)]),
                                                                   "image/jpeg")})
                    latencies.append(time.perf_counter() - t0)
                    if answer.status_code != 200 or "label" not in answer.json()[0]:
                        failures.append(answer.status_code)

        started = time.perf_counter()
        with ThreadPoolExecutor(LOAD_CLIENTS) as pool:
            list(pool.map(client, range(LOAD_CLIENTS)))
        wall = time.perf_counter() - started
        health = httpx.get(url + "/health").json()
    served_ips = LOAD_REQUESTS / wall
    q = statistics.quantiles(latencies, n=100)
    print(f"load: {LOAD_REQUESTS} requests, {LOAD_CLIENTS} clients: {len(failures)} errors, latency p50 "
          f"{q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, {served_ips:.1f} images/s, mean batch "
          f"{health['mean_batch_size']:.2f}; batch predict {batch_ips:.1f} images/s; ratio "
          f"{served_ips / batch_ips:.2f} (goal >= 0.8)")
    assert failures == [] and len(latencies) == LOAD_REQUESTS
    assert health["images"] == LOAD_REQUESTS and health["mean_batch_size"] > 1
