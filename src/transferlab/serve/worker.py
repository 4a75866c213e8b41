"""One inference thread behind a bounded queue: requests that arrive within a few milliseconds of each other
are answered by one forward pass (up to ``batch_size`` images); explanations go through the same queue.

Request handlers decode their images themselves (in the server's thread pool) and submit arrays; a full
queue refuses at once (:class:`QueueFull`, HTTP 503) instead of letting latency grow without bound.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np


class QueueFull(Exception):
    """The inference queue holds as many requests as it may; try again later."""


@dataclass
class _Job:
    kind: str  # "predict" or "explain"
    images: list[np.ndarray]
    future: Future = field(default_factory=Future)
    label: str | None = None


_STOP = object()


class InferenceWorker:
    """``predict(images) -> one result per image`` (an array or a list: it is sliced per request);
    ``explain(image, label) -> anything``, both called only from the worker thread."""

    def __init__(self, predict: Callable[[list[np.ndarray]], np.ndarray], explain: Callable | None = None, *,
                 batch_size: int = 16, wait_ms: float = 5.0, queue_size: int = 64):
        self._predict, self._explain = predict, explain
        self.batch_size, self.wait_s = batch_size, wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._held: _Job | None = None  # a job taken while filling a batch that does not belong in it
        self.batches = self.images = 0
        self._thread = threading.Thread(target=self._run, name="transferlab-inference", daemon=True)
        self._thread.start()

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, kind: str, images: list[np.ndarray], label: str | None = None) -> Future:
        job = _Job(kind, images, label=label)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _next(self, timeout: float | None = None):
        if self._held is not None:
            job, self._held = self._held, None
            return job
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                return
            if job.kind == "explain":
                self._answer([job], lambda jobs: [self._explain(jobs[0].images[0], jobs[0].label)])
            else:
                self._answer(self._fill(job), self._predict_jobs)

    def _fill(self, first: _Job) -> list[_Job]:
        """More predict jobs, until the batch is full or ``wait_s`` has passed since the first one."""
        jobs, n = [first], len(first.images)
        deadline = time.perf_counter() + self.wait_s
        while n < self.batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                job = self._next(timeout=remaining)
            except queue.Empty:
                break
            if job is _STOP or job.kind != "predict":
                self._held = job  # handled after this batch (a stop request ends the loop then)
                break
            jobs.append(job)
            n += len(job.images)
        return jobs

    def _predict_jobs(self, jobs: list[_Job]) -> list[np.ndarray]:
        images = [image for job in jobs for image in job.images]
        probs = self._predict(images)
        self.batches += 1
        self.images += len(images)
        out, start = [], 0
        for job in jobs:
            out.append(probs[start:start + len(job.images)])
            start += len(job.images)
        return out

    @staticmethod
    def _answer(jobs: list[_Job], compute: Callable[[list[_Job]], list]) -> None:
        try:
            results = compute(jobs)
        except Exception as exc:  # the requests fail, the worker keeps serving
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)
