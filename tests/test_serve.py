"""The web app's JSON API on a tiny model (FastAPI's TestClient): every kind of good and bad upload gets its
documented status and a JSON error, the server keeps serving; batching, a full queue, the page's routes."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import TINY, make_class_folders, make_image

import transferlab

pytest.importorskip("fastapi")  # the serve extra; `make` installs it
from fastapi.testclient import TestClient  # noqa: E402

from transferlab.serve.app import ServeSettings, create_app  # noqa: E402
from transferlab.serve.worker import InferenceWorker, QueueFull  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_class_folders(root / "data", per_class=6)
    transferlab.train(data, out=root / "run", strategy="freeze", epochs=2, **TINY)
    return root / "run"


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(run_dir, ServeSettings(max_upload_mb=0.5))) as c:
        yield c


def _png(color=(220, 40, 40), seed=0, size=(48, 40)) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_predict_one_and_several_images_gives_predict_records(client, run_dir, tmp_path):
    red, blue = _png((220, 40, 40), 1), _png((40, 60, 220), 2)
    one = client.post("/predict", files={"file": ("red.png", red, "image/png")})
    assert one.status_code == 200
    [record] = one.json()
    assert record.keys() == {"path", "label", "score", "top_k"} and record["path"] == "red.png"
    several = client.post("/predict", files=[("file", ("red.png", red, "image/png")),
                                             ("file", ("blue.png", blue, "image/png"))], data={"top_k": "1"})
    assert several.status_code == 200 and [r["path"] for r in several.json()] == ["red.png", "blue.png"]
    assert all(len(r["top_k"]) == 1 for r in several.json())
    # the same answer as `transferlab predict` on the same file
    (tmp_path / "red.png").write_bytes(red)
    cli = next(transferlab.load_predictor(run_dir).iter_predictions([tmp_path / "red.png"]))
    assert (record["label"], record["score"]) == (cli["label"], cli["score"])


@pytest.mark.parametrize(("name", "body", "status", "detail"), [
    ("broken.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 50, 415, "not an image"),
    ("notes.txt", b"just some text", 415, "not an image"),
    ("empty.png", b"", 400, "empty file"),
    ("huge.png", b"\x89PNG" + b"\0" * (600 * 1024), 413, "upload larger than the limit of 0.5 MB"),
])
def test_bad_uploads_get_their_status_and_a_json_error(client, name, body, status, detail):
    answer = client.post("/predict", files={"file": (name, body, "application/octet-stream")})
    assert answer.status_code == status
    assert detail in answer.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"  # and the server keeps serving
    assert client.post("/predict", files={"file": ("ok.png", _png(), "image/png")}).status_code == 200


def test_truncated_image_and_decompression_bomb_are_400(client, tmp_path):
    from PIL import Image

    good = _png(size=(120, 100))
    truncated = client.post("/predict", files={"file": ("cut.png", good[: len(good) // 2], "image/png")})
    assert truncated.status_code == 400 and "truncated" in truncated.json()["detail"]
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(bomb)  # 100 megapixels declared, a few kB on disk
    answer = client.post("/predict", files={"file": ("bomb.png", bomb.read_bytes(), "image/png")})
    assert answer.status_code == 400 and "too large" in answer.json()["detail"]


def test_wrong_field_name_and_bad_top_k_are_422(client):
    assert client.post("/predict", files={"photo": ("a.png", _png(), "image/png")}).status_code == 422
    answer = client.post("/predict", files={"file": ("a.png", _png(), "image/png")}, data={"top_k": "0"})
    assert answer.status_code == 422 and "top_k" in answer.json()["detail"]


def test_one_bad_file_among_good_ones_gets_an_error_record(client):
    answer = client.post("/predict", files=[("file", ("a.png", _png(), "image/png")),
                                            ("file", ("b.txt", b"text", "text/plain"))])
    assert answer.status_code == 200
    good, bad = answer.json()
    assert "label" in good and bad == {"path": "b.txt", "error": "not an image Pillow can identify"}


def test_streamed_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(20):
            yield b"x" * 65536

    answer = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]


def test_explain_returns_a_png_for_the_class_asked(client):
    from PIL import Image

    answer = client.post("/explain", files={"file": ("a.png", _png(size=(96, 80)), "image/png")},
                         data={"label": "red"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (64, 64)  # the crop the model sees
    assert client.post("/explain", files={"file": ("a.png", _png(), "image/png")},
                       data={"label": "green"}).status_code == 422


def test_page_info_health_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and "Drop images here" in page.text
    info = client.get("/info").json()
    assert info["classes"] == ["blue", "red"] and info["report"] is None and info["explain"] is True
    assert 0 <= info["accuracy"] <= 1 and info["engine"] == "OnnxClassifier"
    assert set(client.get("/openapi.json").json()["paths"]) == {"/info", "/health", "/predict", "/explain"}
    assert client.get("/report").status_code == 404


def test_worker_batches_requests_that_arrive_together():
    sizes = []

    def predict(images):
        sizes.append(len(images))
        time.sleep(0.01)
        return np.full((len(images), 2), 0.5, dtype=np.float32)

    worker = InferenceWorker(predict, batch_size=8, wait_ms=50, queue_size=64)
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: worker.submit("predict", [np.zeros((3, 8, 8))]).result(timeout=10),
                                    range(32)))
    finally:
        worker.close()
    assert all(r.shape == (1, 2) for r in results) and sum(sizes) == 32
    assert max(sizes) > 1 and worker.mean_batch_size > 1


def test_full_queue_refuses_with_503_then_recovers(run_dir):
    release = threading.Event()
    app = create_app(run_dir, ServeSettings(queue_size=1, batch_size=1, explain=False))
    state = app.state.transferlab
    real = state.worker._predict

    def slow(images):
        release.wait(timeout=20)
        return real(images)

    state.worker._predict = slow
    with TestClient(app) as client:
        files = {"file": ("a.png", _png(), "image/png")}
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(client.post, "/predict", files=files) for _ in range(6)]
            time.sleep(1.0)  # one request is being answered, one waits in the queue, the others are refused
            release.set()
            statuses = sorted(f.result(timeout=30).status_code for f in pending)
        assert statuses.count(503) >= 1 and statuses.count(200) >= 2, statuses
        refused = [f.result() for f in pending if f.result().status_code == 503][0]
        assert "queue is full" in refused.json()["detail"]
        assert client.post("/predict", files=files).status_code == 200  # recovered


def test_queue_full_is_raised_when_nothing_drains():
    gate = threading.Event()
    worker = InferenceWorker(lambda images: gate.wait(5) or np.zeros((len(images), 2)), batch_size=1, queue_size=1)
    try:
        worker.submit("predict", [np.zeros(1)])
        time.sleep(0.2)  # the worker holds the first job
        worker.submit("predict", [np.zeros(1)])
        with pytest.raises(QueueFull):
            worker.submit("predict", [np.zeros(1)])
    finally:
        gate.set()
        worker.close()


def test_predict_gradcam_writes_overlays(run_dir, tmp_path):
    from transferlab.cli import main

    images = [make_image(tmp_path / f"img{i}.png", (220, 40, 40), seed=i, size=(80, 70)) for i in range(2)]
    assert main(["predict", str(run_dir), *map(str, images), "--gradcam", str(tmp_path / "cams")]) == 0
    written = sorted(p.name for p in (tmp_path / "cams").iterdir())
    assert written == ["img0_gradcam.png", "img1_gradcam.png"]


def test_serve_command_refuses_bad_settings_in_one_line(run_dir, capsys):
    from transferlab.cli import main

    assert main(["serve", str(run_dir), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "transferlab: error: --batch-size 0: must be positive"
    assert main(["serve", str(run_dir.parent / "nowhere")]) == 2
    assert "folder not found" in capsys.readouterr().err


def test_a_run_without_an_export_is_served_through_torch(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model.onnx").unlink()
    with TestClient(create_app(copy, ServeSettings(explain=False))) as client:
        assert client.get("/info").json()["engine"] == "Run"
        answer = client.post("/predict", files={"file": ("a.png", _png(), "image/png")})
        assert answer.status_code == 200 and answer.json()[0]["label"] in ("blue", "red")
