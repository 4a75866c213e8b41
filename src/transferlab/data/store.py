"""Decoded images on disk, so the memory fine-tuning needs does not grow with the dataset.

Fine-tuning reads every training image once per epoch. Decoding it once and keeping the uint8 pixels in memory
costs ~200 KB per image (20 GB for 100,000 images); this store keeps them in files instead and reads them back
through memory maps, whose pages the kernel can drop at any time (file-backed, not anonymous memory).

Layout: ``CACHE_DIR/images/<key>/`` beside the feature cache, where the key hashes everything that changes a
decoded image (short side, interpolation, the decoder's limits and versions) and each image is found by the
digest of its file's bytes, so a changed image or preprocessing simply misses. Images are stored ragged: at the
working short side with their own aspect ratio (the random-resized crop sees what it sees today).

A build appends *segments*: ``<name>.u8`` holds CHW uint8 images back to back and ``<name>.json`` their index
(digest -> offset and shape, or the reason the file did not decode, so a broken file is not retried every run).
The data file is written under a temporary name, flushed and renamed, and only then is the index written
(atomically): readers see complete segments only, and a segment never changes once indexed, so any number of
processes read while another one adds segments. A killed build loses at most the segment it was writing; the
next build decodes only what is still missing. Builders of one key take ``<key>/.lock`` and look again once
they hold it (a second process waits, then finds the first one's work); the processes of one torchrun training
instead build disjoint shares without the lock. ``root=None`` (``--cache-dir none``): decoded images are kept
in memory, as before the store existed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import TransferlabError
from ..io.digest import file_digest
from ..io.files import write_json
from ..io.lock import file_lock
from ..progress import progress_bar
from . import decode
from .decode import ResizeSpec
from .discovery import Sample

log = logging.getLogger("transferlab")

SEGMENT_IMAGES = 512  # images per segment: what a killed build can lose
SEGMENT_BYTES = 256 * 2**20
STALE_PARTIAL_SECONDS = 600  # a temporary segment file untouched this long belongs to a killed build


def store_key(cfg: ResizeSpec) -> str:
    """Hash of everything that changes a decoded image."""
    import PIL

    spec = {"resize_size": int(cfg.resize_size), "interpolation": cfg.interpolation,
            "max_aspect": decode.MAX_ASPECT, "max_pixels": decode.MAX_IMAGE_PIXELS,
            "transferlab": __version__, "pillow": PIL.__version__, "numpy": np.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Location:
    segment: str  # path of the segment's data file
    offset: int
    shape: tuple[int, int, int]


class StoredImages(Sequence):
    """Images of a store by position: ``images[i]`` is a CHW uint8 tensor (a copy, read through a memory map);
    a slice gives a list. Memory maps open on first access in each process (a DataLoader worker opens its own)."""

    def __init__(self, locations: Sequence[_Location]):
        self.locations = list(locations)
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self[i] for i in range(*key.indices(len(self)))]
        where = self.locations[key]
        data = self._maps.get(where.segment)
        if data is None:
            data = self._maps[where.segment] = np.memmap(where.segment, dtype=np.uint8, mode="r")
        size = where.shape[0] * where.shape[1] * where.shape[2]
        return torch.from_numpy(np.array(data[where.offset:where.offset + size]).reshape(where.shape))

    def __getstate__(self) -> dict:
        return {"locations": self.locations, "_maps": {}}


class ImagesBySample(Mapping):
    """``images[sample]`` for the samples of a :class:`DecodedStore`, read on access."""

    def __init__(self, samples: Sequence[Sample], images: Sequence):
        self.images = images
        self.position = {s: i for i, s in enumerate(samples)}

    def __getitem__(self, sample: Sample) -> torch.Tensor:
        return self.images[self.position[sample]]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.position)

    def __len__(self) -> int:
        return len(self.position)


@dataclass
class DecodedStore:
    """The samples that decoded (in input order), their images (a :class:`StoredImages`, or a list in memory
    without a store) and the files skipped with their reason; ``built``: images decoded by this call."""

    samples: list[Sample]
    images: Sequence
    skipped: list[dict] = field(default_factory=list)
    built: int = 0

    def by_sample(self) -> ImagesBySample:
        return ImagesBySample(self.samples, self.images)


class _SegmentWriter:
    """Appends decoded images to segments of ``folder``, each made visible once complete."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._open()

    def _open(self) -> None:
        self.name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}"
        self.partial = self.folder / f".{self.name}.u8.partial"
        self.fh = open(self.partial, "wb")  # noqa: SIM115 (closed in _seal)
        self.images: dict[str, list] = {}
        self.failed: dict[str, str] = {}
        self.offset = 0

    def add(self, digest: str, image: np.ndarray | None, reason: str | None = None) -> None:
        if image is None:
            self.failed[digest] = reason
        elif digest not in self.images:
            self.fh.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            self.images[digest] = [self.offset, *image.shape]
            self.offset += image.size
        if len(self.images) + len(self.failed) >= SEGMENT_IMAGES or self.offset >= SEGMENT_BYTES:
            self._seal()
            self._open()

    def _seal(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        if not self.images and not self.failed:
            self.partial.unlink(missing_ok=True)
            return
        os.replace(self.partial, self.folder / f"{self.name}.u8")
        write_json(self.folder / f"{self.name}.json", {"images": self.images, "failed": self.failed})

    def close(self, complete: bool = True) -> None:
        if complete:
            self._seal()
        else:  # interrupted: the open segment is lost, the sealed ones stay
            self.fh.close()
            self.partial.unlink(missing_ok=True)


class ImageStore:
    """Decoded images of one preprocessing, on disk under ``root`` (``None``: in memory, nothing kept)."""

    def __init__(self, root: str | os.PathLike | None, cfg: ResizeSpec):
        self.cfg = cfg
        self.folder = Path(root) / "images" / store_key(cfg) if root is not None else None

    def load(self, samples: Sequence[Sample], strict: bool = False, *, lock: bool = True,
             desc: str = "decoding images", progress: bool = True) -> DecodedStore:
        """Every sample's image, decoding (and storing) those the store does not have yet. ``strict``: a file
        that does not decode is an error. ``lock``: hold the key's lock while building."""
        if self.folder is None:
            return self._in_memory(samples, strict, desc, progress)
        digests, unreadable = self._digests(samples)
        try:
            built, index = self._build_missing(digests, None, lock, desc, progress)
        except OSError as exc:  # a read-only or full cache: lose the reuse, not the run
            log.warning("image store %s: %s; decoding into memory instead", self.folder, exc.strerror or exc)
            return self._in_memory(samples, strict, desc, progress)
        return self._result(samples, digests, unreadable, index, strict, built)

    def build(self, samples: Sequence[Sample], shard: tuple[int, int] | None = None, *, lock: bool = True,
              desc: str = "decoding images", progress: bool = True) -> int:
        """Decode and store the samples the store does not have yet; ``shard=(rank, world)``: only every
        world-th of them (the processes of a torchrun training split the work, then each calls :meth:`load`).
        Returns how many this call decoded. Without a store nothing is kept, so nothing is built."""
        if self.folder is None:
            return 0
        digests, _ = self._digests(samples)
        try:
            return self._build_missing(digests, shard, lock, desc, progress)[0]
        except OSError:
            return 0  # load() says so, and decodes into memory

    def _build_missing(self, digests, shard, lock, desc, progress) -> tuple[int, dict]:
        wanted = list(dict(digests.values()).items())  # distinct images, in input order
        if shard is not None:  # a share of every image, not of the missing ones: the same in every process
            wanted = wanted[shard[0]::shard[1]]
        index = self._index()
        missing = [(d, p) for d, p in wanted if d not in index]
        if not missing:
            return 0, index
        with self._building(lock):
            index = self._index()  # another process may have built them while this one waited
            missing = [(d, p) for d, p in missing if d not in index]
            if not missing:
                return 0, index
            built = self._build(missing, desc, progress)
            return built, self._index()

    def _in_memory(self, samples, strict, desc, progress) -> DecodedStore:
        from .images import decode_samples

        decoded = decode_samples(list(samples), self.cfg, strict=strict, desc=desc, progress=progress)
        return DecodedStore(decoded.samples, decoded.images, decoded.skipped, built=len(decoded.samples))

    def _digests(self, samples) -> tuple[dict[Sample, tuple[str, Path]], dict[Sample, str]]:
        digests, unreadable = {}, {}
        for sample in samples:
            try:
                digests[sample] = (file_digest(sample.path), Path(sample.path))
            except OSError as exc:
                unreadable[sample] = f"cannot read the file ({exc.strerror or exc})"
        return digests, unreadable

    @contextlib.contextmanager
    def _building(self, lock: bool):
        self.folder.mkdir(parents=True, exist_ok=True)
        if not lock:
            yield
            return
        with file_lock(self.folder / ".lock"):
            self._remove_stale_partials()
            yield

    def _remove_stale_partials(self) -> None:
        now = time.time()
        for partial in self.folder.glob(".*.u8.partial"):
            with contextlib.suppress(OSError):
                if now - partial.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    partial.unlink()

    def _index(self) -> dict[str, _Location | str]:
        """digest -> location, or the reason it did not decode, over every complete segment."""
        index: dict[str, _Location | str] = {}
        if not self.folder.is_dir():
            return index
        for entry in sorted(self.folder.glob("*.json")):
            data_file = entry.with_suffix(".u8")
            try:
                segment = json.loads(entry.read_text())
            except (OSError, ValueError):
                log.warning("%s: unreadable index of the image store, ignored", entry)
                continue
            if not data_file.is_file():
                continue
            for digest, reason in segment.get("failed", {}).items():
                index.setdefault(digest, reason)
            for digest, (offset, c, h, w) in segment.get("images", {}).items():
                index[digest] = _Location(str(data_file), offset, (c, h, w))
        return index

    def _build(self, missing: list[tuple[str, Path]], desc: str, progress: bool) -> int:
        writer = _SegmentWriter(self.folder)
        decoded = decode.stream([path for _, path in missing], lambda path: decode.decode_array(path, self.cfg))
        complete = False
        try:
            for (digest, _), (image, reason) in progress_bar(zip(missing, decoded, strict=True), total=len(missing),
                                                             desc=desc, enabled=progress):
                writer.add(digest, image, reason)
            complete = True
        finally:
            writer.close(complete)
        log.info("image store: decoded %d image(s) into %s", len(missing), self.folder)
        return len(missing)

    def _result(self, samples, digests, unreadable, index, strict, built) -> DecodedStore:
        ok, locations, skipped = [], [], []
        for sample in samples:
            entry = index.get(digests[sample][0]) if sample in digests else unreadable[sample]
            if entry is None:
                raise TransferlabError(f"{sample.path}: missing from the image store {self.folder} (was it "
                                       "removed while in use?)")
            if isinstance(entry, str):
                if strict:
                    raise TransferlabError(f"{sample.path}: {entry} (--strict)")
                skipped.append({"path": str(sample.path), "label": sample.label, "reason": entry})
                continue
            ok.append(sample)
            locations.append(entry)
        if skipped:
            log.warning("skipped %d unreadable file(s) (listed with reasons in data_report.json), first: %s: %s",
                        len(skipped), skipped[0]["path"], skipped[0]["reason"])
        return DecodedStore(ok, StoredImages(locations), skipped, built)
