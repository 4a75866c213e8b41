"""Frozen-backbone features, computed once per image and cached on disk.

A frozen backbone maps an image to the same feature vector every time, so transferlab computes it once
and keeps it: heads of any size, optimizers and seeds then train on cached vectors, and a grid of
frozen experiments on the same data costs one backbone pass.

Cache layout: ``CACHE_DIR/features/<model key>/<ab>/<image digest>.npy``, where the model key is a hash
of everything that changes a feature (backbone name, its weights' bytes, preprocessing, pooling,
precision, library versions) and the image digest a hash of the file's bytes. A changed image or key part
therefore misses the cache; stale entries are simply never read again. Each entry is written atomically,
so concurrent runs sharing a cache are safe (they write identical bytes). Atomic writes alone would still let
two processes (the workers of a sharded experiment) compute the same features at the same time, so computing
the misses of one model key holds ``CACHE_DIR/features/<model key>/.lock`` (:mod:`transferlab.io.lock`): the
second process waits, then reads what the first one wrote and computes only what is still missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data.decode import decode_workers
from .data.discovery import Sample
from .data.images import collect_decoded, iter_decoded
from .errors import TransferlabError
from .io.digest import file_digest
from .io.files import atomic_path
from .io.lock import file_lock
from .progress import progress_bar
from .provenance import result_versions
from .runtime.inference import engine_of, forward_fn, predict_in_batches
from .runtime.precision import Policy

log = logging.getLogger("transferlab")


def default_cache_dir() -> Path:
    """TRANSFERLAB_CACHE_DIR, else $XDG_CACHE_HOME/transferlab, else ~/.cache/transferlab."""
    if os.environ.get("TRANSFERLAB_CACHE_DIR"):
        return Path(os.environ["TRANSFERLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferlab"


def cache_root(option: str | None) -> Path | None:
    """``--cache-dir``: None -> the default folder; "none" -> no cache."""
    if option == "none":
        return None
    return Path(option) if option else default_cache_dir()


def model_key(model, policy: Policy, view: str = "center") -> str:
    """Hash of everything that changes a pooled feature vector of ``model.features`` (``view``: which
    deterministic view of the image, see :data:`~transferlab.models.preprocessing.TTA_VIEWS`)."""
    digest = hashlib.sha256()
    spec = {"backbone": model.backbone.name, "pool": model.pool, "preprocess": model.backbone.preprocess.to_dict(),
            "precision": policy.precision, "device": policy.device, **result_versions()}
    if view != "center":  # keys of centre-crop features stay as they were before views existed
        spec["view"] = view
    digest.update(json.dumps(spec, sort_keys=True).encode())
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class FeatureResult:
    features: dict[Sample, torch.Tensor]
    skipped: list[dict] = field(default_factory=list)
    engine: str | None = None  # what computed the misses (None: everything came from the cache)
    hits: int = 0
    misses: int = 0


class FeatureCache:
    """On-disk store of feature vectors keyed by (model key, image digest); ``root=None`` disables it.

    Vectors read or written are also kept in memory (up to :attr:`MEMORY_BYTES` per process, least
    recently used dropped first, shared by every cache object and guarded by a lock), so the runs of an
    experiment read each file once.
    """

    MEMORY_BYTES = 512 * 2**20
    _memory: OrderedDict[Path, tuple[tuple, torch.Tensor]] = OrderedDict()  # path -> (file stat, vector)
    _memory_bytes = 0
    _lock = threading.Lock()

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) / "features" if root is not None else None

    def _path(self, key: str, digest: str) -> Path:
        return self.root / key / digest[:2] / f"{digest}.npy"

    @contextlib.contextmanager
    def computing(self, key: str):
        """Hold the lock of ``key`` while its missing entries are computed (nothing without a cache, or where
        the lock file cannot be created: a read-only cache stores nothing another process could reuse)."""
        with contextlib.ExitStack() as stack:
            if self.root is not None:
                with contextlib.suppress(OSError):
                    stack.enter_context(file_lock(self.root / key / ".lock"))
            yield

    @classmethod
    def _remember(cls, path: Path, vector: torch.Tensor) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        with cls._lock:
            cls._forget_locked(path)
            cls._memory[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), vector)
            cls._memory_bytes += vector.nbytes
            while cls._memory_bytes > cls.MEMORY_BYTES and cls._memory:
                cls._memory_bytes -= cls._memory.popitem(last=False)[1][1].nbytes

    @classmethod
    def _forget(cls, path: Path) -> None:
        with cls._lock:
            cls._forget_locked(path)

    @classmethod
    def _forget_locked(cls, path: Path) -> None:
        if path in cls._memory:
            cls._memory_bytes -= cls._memory.pop(path)[1].nbytes

    @classmethod
    def _recall(cls, path: Path, stat: tuple) -> torch.Tensor | None:
        with cls._lock:
            remembered = cls._memory.get(path)
            if remembered is None or remembered[0] != stat:
                return None
            cls._memory.move_to_end(path)
            return remembered[1]

    def get(self, key: str, digest: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self._path(key, digest)
        try:
            st = os.stat(path)
        except OSError:
            self._forget(path)
            return None
        remembered = self._recall(path, (st.st_ino, st.st_size, st.st_mtime_ns))
        if remembered is not None:
            return remembered
        try:
            vector = torch.from_numpy(np.load(path, allow_pickle=False))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):  # a damaged entry is recomputed
            path.unlink(missing_ok=True)
            self._forget(path)
            return None
        self._remember(path, vector)
        return vector

    def put(self, key: str, digest: str, vector: torch.Tensor) -> None:
        if self.root is None:
            return
        path = self._path(key, digest)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, vector.numpy(), allow_pickle=False)
        except (OSError, TransferlabError) as exc:  # a full or read-only cache must not stop a run
            log.warning("feature cache: cannot write to %s (%s); continuing without caching", self.root, exc)
            self.root = None
            return
        self._remember(path, vector)


def _digest_or_none(sample: Sample) -> str | None:
    try:
        return file_digest(sample.path)
    except OSError:
        return None  # unreadable: decoding reports the reason


class FeatureExtractor:
    """Pooled features of ``model.features`` (eval mode, preprocessing ``model.backbone.preprocess``) per
    sample, from the cache where possible; images are decoded only for cache misses (or taken from the
    decoded ``images`` a caller already holds)."""

    def __init__(self, model, policy: Policy, cache: FeatureCache, engine: str = "auto", batch_size: int = 64):
        self.model, self.policy, self.cache, self.engine, self.batch_size = model, policy, cache, engine, batch_size

    def extract(self, samples: list[Sample], images: Mapping[Sample, torch.Tensor] | None = None,
                strict: bool = False, view: str = "center", lock: bool = True) -> FeatureResult:
        """Features of ``samples`` (cached ones read, the rest computed and cached). ``lock`` False: compute
        without holding the model key's lock (the processes of one DDP training share out disjoint samples)."""
        key = model_key(self.model, self.policy, view) if self.cache.root is not None else ""
        result = FeatureResult({})
        todo = self._lookup(samples, key, result)
        result.hits = len(result.features)
        if todo:
            with self.cache.computing(key) if lock else contextlib.nullcontext():
                if self.cache.root is not None:  # another process may have computed them while we waited
                    todo = self._lookup(list(todo), key, result)
                    result.hits = len(result.features)
                if todo:
                    self._compute(todo, key, result, images, strict, view)
        result.misses = len(result.features) - result.hits
        if self.cache.root is not None:
            log.info("features%s: %d from cache, %d computed", "" if view == "center" else f" ({view})",
                     result.hits, result.misses)
        return result

    def _lookup(self, samples: list[Sample], key: str, result: FeatureResult) -> dict[Sample, str | None]:
        """Fill ``result`` with cached vectors; return the misses with their file digests (None: unknown)."""
        if self.cache.root is None:
            return {s: None for s in samples}
        with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
            digests = list(pool.map(_digest_or_none, samples))
        todo = {}
        for sample, digest in zip(samples, digests, strict=True):
            vector = self.cache.get(key, digest) if digest else None
            if vector is None:
                todo[sample] = digest
            else:
                result.features[sample] = vector
        return todo

    def _compute(self, todo: dict[Sample, str | None], key: str, result: FeatureResult,
                 images: Mapping[Sample, torch.Tensor] | None, strict: bool, view: str) -> None:
        model, preprocess = self.model, self.model.backbone.preprocess
        missing = list(todo)
        model.eval()
        extract = forward_fn(model.features, self.policy, self.engine, preprocess.input_size, len(missing),
                             owner=model)
        result.engine = engine_of(extract)
        batch: list[tuple[Sample, torch.Tensor]] = []

        def flush() -> None:
            vectors = predict_in_batches(extract, [image for _, image in batch], preprocess, self.policy,
                                         self.batch_size, view=view)
            for (sample, _), vector in zip(batch, vectors, strict=True):
                vector = vector.clone()
                result.features[sample] = vector
                if todo[sample]:
                    self.cache.put(key, todo[sample], vector)
            batch.clear()

        def add(sample: Sample, image: torch.Tensor) -> None:
            batch.append((sample, image))
            if len(batch) == self.batch_size:
                flush()

        desc = "features" if view == "center" else f"features ({view})"
        if images is not None:
            for sample in progress_bar(missing, total=len(missing), desc=desc):
                if sample in images:
                    add(sample, images[sample])
        else:  # decoding of the next images overlaps the forward pass of this batch
            decoded = iter_decoded([s.path for s in missing], preprocess, lookahead=2 * self.batch_size)
            result.skipped = collect_decoded(missing, decoded, strict=strict, desc=desc, on_image=add).skipped
        if batch:
            flush()
