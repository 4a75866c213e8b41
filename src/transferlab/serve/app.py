"""The web app of a trained run: a page to drop images on, and a JSON API (FastAPI).

    GET  /          the page (static/index.html): top classes with bars and a Grad-CAM heat map per image
    GET  /info      the run: classes, test accuracy and its interval, backbone, date, report link
    GET  /health    {"status": "ok", queue length, batches, mean batch size}
    POST /predict   multipart, one or more files in the field ``file`` -> the records of ``transferlab predict``
    POST /explain   multipart ``file`` (+ optional ``label``) -> PNG: the heat map over the image
    GET  /report    the experiment's report.html, when the run belongs to one
    GET  /docs      OpenAPI documentation

Errors are JSON ``{"detail": ...}``: 413 upload too large (:mod:`transferlab.serve.limits`: checked before
and while the body streams in), 415 not an image, 400 a broken image or a decompression bomb, 422 a missing
``file`` field, 503 the queue is full.
The server never reads a path sent by a client and sends no CORS headers unless origins are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import prediction
from ..data.decode import ImageDecodeError, decode_array
from ..io.rundir import RunDir
from ..predictor import load_predictor
from .limits import UploadLimit
from .worker import InferenceWorker, QueueFull

STATIC = Path(__file__).parent / "static"
NOT_AN_IMAGE = "not an image Pillow can identify"


@dataclass
class ServeSettings:
    max_upload_mb: float = 20.0
    batch_size: int = 16
    batch_wait_ms: float = 5.0
    queue_size: int = 64
    top_k: int = 3
    explain: bool = True  # load the torch model for Grad-CAM (/explain)
    cors_origins: list[str] = field(default_factory=list)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class ServerState:
    """What the endpoints share: the predictor (the exported model when the run has a current one), the
    Grad-CAM explainer, the inference worker and the run's summary."""

    def __init__(self, run_dir: str | os.PathLike, settings: ServeSettings):
        self.run_dir, self.settings = RunDir(run_dir), settings
        self.predictor = load_predictor(run_dir)
        self.classes = list(self.predictor.classes)
        self.preprocess = self.predictor.preprocess
        self.explainer = None
        if settings.explain:
            from ..explain import Explainer

            self.explainer = Explainer(run_dir)
        self.worker = InferenceWorker(self._predict, self._explain, batch_size=settings.batch_size,
                                      wait_ms=settings.batch_wait_ms, queue_size=settings.queue_size)

    def _predict(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, dict]]:
        """Per image: its probabilities (calibrated with a trust layer) and the fields the trust layer adds."""
        probs, trusted = self.predictor.predict_outputs(images)
        if trusted is None:
            return [(p, {}) for p in probs]
        return [(trusted.probs[i], trusted.fields(i, self.classes)) for i in range(len(probs))]

    def _explain(self, image: np.ndarray, label: str | None) -> bytes:
        return self.explainer.explain(image, label).overlay_png()

    def info(self) -> dict:
        config, metrics = self.run_dir.read_config(), self.run_dir.read_metrics() or {}
        return {"classes": self.classes, "backbone": config["backbone"]["name"], "created": config.get("created"),
                "strategy": config["train"].get("strategy"), "accuracy": metrics.get("accuracy"),
                "accuracy_ci95": metrics.get("accuracy_ci95"), "n_test": metrics.get("n_test"),
                "report": "/report" if self.report_path() else None, "explain": self.explainer is not None,
                "engine": type(self.predictor).__name__, "trust": self.trust_info(metrics)}

    def trust_info(self, metrics: dict) -> dict | None:
        """What the page says about calibration, unknown and prediction sets (None: the run has none)."""
        trust = self.predictor.trust
        if trust is None:
            return None
        sets = metrics.get("prediction_sets", {})
        return {"temperature": trust.temperature, "keep_known": trust.keep_known, "coverage": trust.coverage,
                "test_coverage": sets.get("empirical_coverage"), "test_mean_set_size": sets.get("mean_set_size")}

    def report_path(self) -> Path | None:
        """The report of the experiment the run belongs to (EXP_DIR/runs/<run>/ -> EXP_DIR/report.html)."""
        from ..io.expdir import REPORT_FILE

        candidate = self.run_dir.path.resolve().parent.parent / REPORT_FILE
        return candidate if candidate.is_file() else None


def decode_upload(data: bytes, preprocess) -> np.ndarray:
    """An uploaded file's image, or an HTTP error naming what is wrong with it."""
    if not data:
        raise HTTPException(400, "empty file")
    try:
        return decode_array(data, preprocess)
    except ImageDecodeError as exc:
        raise HTTPException(415 if str(exc) == NOT_AN_IMAGE else 400, str(exc)) from None


def create_app(run_dir: str | os.PathLike, settings: ServeSettings | None = None):
    """The FastAPI application serving ``run_dir``."""
    settings = settings or ServeSettings()
    state = ServerState(run_dir, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.worker.close()

    app = FastAPI(title="transferlab", summary="Predictions and Grad-CAM heat maps of a trained run", lifespan=lifespan)
    app.state.transferlab = state
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes, message=_too_large(settings))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"])
    _add_errors(app, settings)
    _add_pages(app, state)
    _add_api(app, state)
    return app


def _add_errors(app, settings: ServeSettings) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        detail = _too_large(settings) if exc.status_code == 413 else exc.detail
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=exc.headers)


def _too_large(settings: ServeSettings) -> str:
    return f"upload larger than the limit of {settings.max_upload_mb:g} MB"


def _add_pages(app, state: ServerState) -> None:
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/info")
    def info() -> dict:
        return state.info()

    @app.get("/health")
    def health() -> dict:
        worker = state.worker
        return {"status": "ok", "queued": worker.queued, "batches": worker.batches, "images": worker.images,
                "mean_batch_size": round(worker.mean_batch_size, 3)}

    @app.get("/report", include_in_schema=False)
    def report():
        path = state.report_path()
        if path is None:
            raise HTTPException(404, "this run has no experiment report")
        return FileResponse(path, media_type="text/html")


async def _submit(state: ServerState, kind: str, images: list[np.ndarray], label: str | None = None):
    try:
        future = state.worker.submit(kind, images, label)
    except QueueFull:
        raise HTTPException(503, "the inference queue is full; try again shortly") from None
    return await asyncio.wrap_future(future)


def _add_api(app, state: ServerState) -> None:
    @app.post("/predict")
    async def predict(file: list[UploadFile] = File(..., description="one or more images"),  # noqa: B008
                      top_k: int = Form(3)) -> list[dict]:
        if top_k < 1:
            raise HTTPException(422, "top_k must be at least 1")
        decoded, records, errors = [], [], []
        for upload in file:
            try:
                decoded.append(await run_in_threadpool(decode_upload, await upload.read(), state.preprocess))
                records.append(None)
            except HTTPException as exc:  # one bad file among good ones: its record says why, as in predict
                errors.append(exc)
                records.append({"path": upload.filename, "error": exc.detail})
        if not decoded:
            raise errors[0]
        outputs = iter(await _submit(state, "predict", decoded))

        def predicted(name: str) -> dict:
            probs, added = next(outputs)
            return prediction.record(name, probs, state.classes, top_k) | added

        return [r if r is not None else predicted(upload.filename) for upload, r in zip(file, records, strict=True)]

    @app.post("/explain", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(file: UploadFile = File(...), label: str | None = Form(None)):  # noqa: B008
        if state.explainer is None:
            raise HTTPException(404, "explanations are off (started with --no-explain)")
        if label is not None and label not in state.classes:
            raise HTTPException(422, f"label '{label}' is not one of the model's classes")
        image = await run_in_threadpool(decode_upload, await file.read(), state.preprocess)
        return Response(await _submit(state, "explain", [image], label), media_type="image/png")
