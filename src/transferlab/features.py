"""Frozen-backbone features, computed once per image and cached on disk.

A frozen backbone maps an image to the same feature vector every time, so transferlab computes it once
and keeps it: heads of any size, optimizers and seeds then train on cached vectors, and a grid of
frozen experiments on the same data costs one backbone pass.

Cache layout: ``CACHE_DIR/features/<model key>/<ab>/<image digest>.npy``, where the model key is a hash
of everything that changes a feature (backbone name, its weights' bytes, preprocessing, pooling,
precision, library versions) and the image digest a hash of the file's bytes. A changed image or key part
therefore misses the cache; stale entries are simply never read again. Each entry is written atomically,
so concurrent runs sharing a cache are safe (they write identical bytes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import Sample, collect_decoded, iter_decoded
from .errors import TransferlabError
from .fileio import atomic_path
from .precision import Policy, decode_workers
from .preprocessing import PreprocessConfig

log = logging.getLogger("transferlab")


def default_cache_dir() -> Path:
    """TRANSFERLAB_CACHE_DIR, else $XDG_CACHE_HOME/transferlab, else ~/.cache/transferlab."""
    if os.environ.get("TRANSFERLAB_CACHE_DIR"):
        return Path(os.environ["TRANSFERLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transferlab"


_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime) -> digest, for the runs of one process


def file_digest(path: str | os.PathLike) -> str:
    """Content digest of a file. Remembered per (path, inode, size, mtime) within a process, so the runs
    of an experiment read each image once; a file rewritten in place gets a new mtime and is re-read."""
    st = os.stat(path)
    memo_key = (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    _DIGESTS[memo_key] = digest.hexdigest()
    return _DIGESTS[memo_key]


def model_key(model, preprocess: PreprocessConfig, policy: Policy, view: str = "center") -> str:
    """Hash of everything that changes a pooled feature vector of ``model.features`` (``view``: which
    deterministic view of the image, see :data:`~transferlab.preprocessing.TTA_VIEWS`)."""
    import timm
    import torchvision

    from . import __version__

    digest = hashlib.sha256()
    spec = {"backbone": model.backbone.name, "pool": model.pool, "preprocess": preprocess.to_dict(),
            "precision": policy.precision, "device": policy.device, "transferlab": __version__,
            "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__}
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
    hits: int = 0
    misses: int = 0


class FeatureCache:
    """On-disk store of feature vectors keyed by (model key, image digest); ``root=None`` disables it.

    Vectors read or written are also kept in memory (up to :attr:`MEMORY_BYTES` per process, least
    recently used dropped first), so the runs of an experiment read each file once.
    """

    MEMORY_BYTES = 512 * 2**20
    _memory: OrderedDict[Path, tuple[tuple, torch.Tensor]] = OrderedDict()  # path -> (file stat, vector)
    _memory_bytes = 0

    def __init__(self, root: str | os.PathLike | None):
        self.root = Path(root) / "features" if root is not None else None

    def _path(self, key: str, digest: str) -> Path:
        return self.root / key / digest[:2] / f"{digest}.npy"

    @classmethod
    def _remember(cls, path: Path, vector: torch.Tensor) -> None:
        try:
            st = os.stat(path)
        except OSError:
            return
        cls._forget(path)
        cls._memory[path] = ((st.st_ino, st.st_size, st.st_mtime_ns), vector)
        cls._memory_bytes += vector.nbytes
        while cls._memory_bytes > cls.MEMORY_BYTES and cls._memory:
            cls._memory_bytes -= cls._memory.popitem(last=False)[1][1].nbytes

    @classmethod
    def _forget(cls, path: Path) -> None:
        if path in cls._memory:
            cls._memory_bytes -= cls._memory.pop(path)[1].nbytes

    def get(self, key: str, digest: str) -> torch.Tensor | None:
        if self.root is None:
            return None
        path = self._path(key, digest)
        try:
            st = os.stat(path)
        except OSError:
            self._forget(path)
            return None
        remembered = self._memory.get(path)
        if remembered is not None and remembered[0] == (st.st_ino, st.st_size, st.st_mtime_ns):
            self._memory.move_to_end(path)
            return remembered[1]
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


def compute_features(samples: list[Sample], model, preprocess: PreprocessConfig, policy: Policy,
                     cache: FeatureCache, images: dict[Sample, torch.Tensor] | None = None,
                     strict: bool = False, batch_size: int = 64, view: str = "center",
                     engine: str = "auto") -> FeatureResult:
    """Pooled features of ``model.features`` (model in eval mode) for each sample, from the cache where
    possible. Images are decoded only for cache misses (or taken from ``images`` when given)."""
    from .inference import forward_fn
    from .progress import progress_bar
    from .training import predict_in_batches

    key = model_key(model, preprocess, policy, view) if cache.root is not None else ""
    result = FeatureResult({})
    todo: list[tuple[Sample, str | None]] = []
    if cache.root is not None:
        def digest_of(sample: Sample) -> str | None:
            try:
                return file_digest(sample.path)
            except OSError:
                return None  # unreadable: decoding reports the reason
        with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
            digests = list(pool.map(digest_of, samples))
        for sample, digest in zip(samples, digests, strict=True):
            vector = cache.get(key, digest) if digest else None
            if vector is None:
                todo.append((sample, digest))
            else:
                result.features[sample] = vector
    else:
        todo = [(s, None) for s in samples]
    result.hits = len(result.features)
    if todo:
        digest_of_sample = dict(todo)
        missing = [s for s, _ in todo]
        model.eval()
        extract = forward_fn(model.features, policy, engine, preprocess.input_size, len(missing), owner=model)
        batch: list[tuple[Sample, torch.Tensor]] = []

        def flush() -> None:
            vectors = predict_in_batches(extract, [image for _, image in batch], preprocess, policy,
                                         batch_size, view=view)
            for (sample, _), vector in zip(batch, vectors, strict=True):
                vector = vector.clone()
                result.features[sample] = vector
                if digest_of_sample[sample]:
                    cache.put(key, digest_of_sample[sample], vector)
            batch.clear()

        def add(sample: Sample, image: torch.Tensor) -> None:
            batch.append((sample, image))
            if len(batch) == batch_size:
                flush()

        desc = "features" if view == "center" else f"features ({view})"
        if images is not None:
            for sample in progress_bar(missing, total=len(missing), desc=desc):
                if sample in images:
                    add(sample, images[sample])
        else:  # decoding of the next images overlaps the forward pass of this batch
            result.skipped = collect_decoded(missing, iter_decoded([s.path for s in missing], preprocess,
                                                                   lookahead=2 * batch_size),
                                             strict=strict, desc=desc, on_image=add).skipped
        if batch:
            flush()
        result.misses = len(result.features) - result.hits
    if cache.root is not None:
        log.info("features%s: %d from cache, %d computed", "" if view == "center" else f" ({view})",
                 result.hits, result.misses)
    return result
