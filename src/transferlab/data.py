"""Image folders: discovery of classes and splits, robust decoding, stratified seeded splits.

The one owner of class order (sorted folder names, or sorted CSV labels) and of what counts as an image.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import random
import struct
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import TransferlabError
from .precision import decode_workers
from .preprocessing import PreprocessConfig

log = logging.getLogger("transferlab")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
TEST_FOLDER_NAMES = ("test", "val", "validation", "valid")
# Classification never needs more: a bigger image is a decompression bomb or a mistake.
MAX_IMAGE_PIXELS = 64_000_000
# A long side beyond this many multiples of the short side is cropped away at decode time
# (keeps panoramas and 1 x N strips from exhausting memory; the centre crop never sees it).
MAX_ASPECT = 3
MIN_TRAIN_PER_CLASS = 1


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str


@dataclass
class Splits:
    """Samples per split. ``val``/``test`` are None when they must be carved from ``train``."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample] | None = None
    test: list[Sample] | None = None
    layout: str = ""
    ignored: list[str] = field(default_factory=list)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise TransferlabError(f"{what} {path}: folder not found")
    if not path.is_dir():
        raise TransferlabError(f"{what} {path}: not a folder")


def _visible_subdirs(path: Path, ignored: list[str] | None = None) -> list[Path]:
    """Non-hidden sub-folders of ``path``, symlinked ones included, except a symlink to ``path`` itself or
    to one of its ancestors (``root/loop -> root``): following it would list the tree again under a bogus
    class name. Such a loop (or a symlink that cannot be resolved) is recorded in ``ignored``."""
    try:
        here = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop on Python < 3.13
        here = path.absolute()
    found = []
    for p in path.iterdir():
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink():
            try:
                target = p.resolve(strict=True)
            except (OSError, RuntimeError):
                target = None
            if target is None or here.is_relative_to(target):
                if ignored is not None:
                    ignored.append(str(p))
                continue
        found.append(p)
    return sorted(found)


def _walk_images(folder: Path, ignored: list[str]) -> list[Path]:
    found = []
    # followlinks=False: a symlinked folder (possibly a loop) is not descended into.
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            if is_image_file(path):
                found.append(path)
            elif not name.startswith("."):
                ignored.append(str(path))
    return found


def read_class_folders(folder: Path, what: str = "DATA_DIR", ignored: list[str] | None = None) -> list[Sample]:
    """``folder/<class>/**/<image>`` -> samples. Errors: missing folder, no class, class without images."""
    ignored = [] if ignored is None else ignored
    _require_dir(folder, what)
    class_dirs = _visible_subdirs(folder, ignored)
    if not class_dirs:
        raise TransferlabError(f"{what} {folder}: no class folders inside (expected {folder}/<class>/<image>)")
    samples = []
    for class_dir in class_dirs:
        images = _walk_images(class_dir, ignored)
        if not images:
            raise TransferlabError(f"{what} {folder}: class '{class_dir.name}' has no images in {class_dir}")
        samples += [Sample(p, class_dir.name) for p in images]
    return samples


def read_labels_csv(csv_path: Path, root: Path) -> list[Sample]:
    """A CSV with columns ``path,label``; relative paths are relative to ``root``."""
    if not csv_path.is_file():
        raise TransferlabError(f"--labels {csv_path}: file not found")
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise TransferlabError(f"--labels {csv_path}: needs a header with columns 'path' and 'label'")
        samples = []
        for line_no, row in enumerate(reader, start=2):
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            if not path or not label:
                raise TransferlabError(f"--labels {csv_path}: line {line_no} has an empty path or label")
            p = Path(path)
            samples.append(Sample(p if p.is_absolute() else root / p, label))
    if not samples:
        raise TransferlabError(f"--labels {csv_path}: no rows")
    return samples


def discover(data_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
             labels_csv: str | os.PathLike | None = None) -> Splits:
    """Find the classes and the splits a data folder ships with.

    Layouts: ``<class>/*``; ``train/<class>/*`` with ``test/`` (or ``val``/``validation`` standing for
    test when there is no ``test``); ``train``, ``val`` and ``test`` (val selects the model, test scores
    it); ``--test-dir`` names the test folder; ``--labels`` a CSV instead of folders.
    """
    data_dir = Path(data_dir)
    _require_dir(data_dir, "DATA_DIR")
    ignored: list[str] = []
    val = test = None
    if labels_csv is not None:
        train = read_labels_csv(Path(labels_csv), data_dir)
        layout = f"labels CSV {labels_csv}"
    else:
        names = {p.name.lower(): p for p in _visible_subdirs(data_dir)}
        if "train" in names:
            train = read_class_folders(names["train"], "DATA_DIR/train", ignored)
            present = [n for n in TEST_FOLDER_NAMES if n in names]
            if "test" in names:
                test = read_class_folders(names["test"], "DATA_DIR/test", ignored)
                val_name = next((n for n in present if n != "test"), None)
                if val_name:
                    val = read_class_folders(names[val_name], f"DATA_DIR/{val_name}", ignored)
            elif present:
                test = read_class_folders(names[present[0]], f"DATA_DIR/{present[0]}", ignored)
            layout = "train/" + "".join(f", {s}/" for s, v in (("val", val), ("test", test)) if v)
        else:
            train = read_class_folders(data_dir, "DATA_DIR", ignored)
            layout = "class folders"
    if test_dir is not None:
        test = read_class_folders(Path(test_dir), "--test-dir", ignored)
        layout += f", --test-dir {test_dir}"
    classes = sorted({s.label for s in train})
    if len(classes) < 2:
        raise TransferlabError(f"DATA_DIR {data_dir}: found {len(classes)} class ({', '.join(classes)}); "
                               "classification needs at least two class folders")
    for name, split in (("val", val), ("test", test)):
        unknown = sorted({s.label for s in split or []} - set(classes))
        if unknown:
            raise TransferlabError(f"DATA_DIR {data_dir}: class '{unknown[0]}' is in the {name} split "
                                   "but has no training images")
    return Splits(classes, train, val, test, layout, ignored)


def split_per_class(samples: list[Sample], fraction: float, seed: int, split_name: str,
                    min_train: int = MIN_TRAIN_PER_CLASS) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split: every class gives round(fraction * n) samples, at least one.

    A class needs ``min_train + 1`` images; with fewer, the error names it.
    """
    by_class: dict[str, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    keep, held = [], []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        n_held = max(1, round(fraction * len(items)))
        if len(items) - n_held < min_train:
            raise TransferlabError(
                f"class '{label}' has {len(items)} usable image(s): carving a {split_name} split needs at "
                f"least {min_train + 1} per class (add images, or provide a {split_name} folder)")
        random.Random(f"{seed}-{split_name}-{label}").shuffle(items)
        held += items[:n_held]
        keep += items[n_held:]
    return keep, held


# ----------------------------------------------------------------------------------------------- decoding


class ImageDecodeError(Exception):
    """The file is not a usable image; the message is the reason recorded in data_report.json."""


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or arr.max() > 255) else 255.0
        im = Image.fromarray(np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(f"image too large ({width}x{height} pixels, limit {MAX_IMAGE_PIXELS:,})")


def _gif_size(fp) -> tuple[int, int]:
    """The size Pillow's GIF reader gives an image: its screen, grown to cover the first frame."""
    fp.seek(6)
    width, height, flags = struct.unpack("<HHB", fp.read(5))
    fp.seek(2 + (3 << (flags & 7) + 1 if flags & 0x80 else 0), 1)  # background, aspect, global palette
    while (block := fp.read(1)) and block != b";":
        if block == b"!":  # an extension: its label, then sub-blocks up to an empty one
            fp.read(1)
            while (n := fp.read(1)) and n[0]:
                fp.seek(n[0], 1)
        elif block == b",":  # the first frame: x0, y0, width, height
            x0, y0, w, h = struct.unpack("<4H", fp.read(8))
            return max(width, x0 + w), max(height, y0 + h)
    return width, height


def _open_image(fp, filename: str):
    """Identify an open image file like ``PIL.Image.open`` does, with our size limit in place of Pillow's.

    Pillow checks the declared size while opening: it *warns* (DecompressionBombWarning) above
    ``Image.MAX_IMAGE_PIXELS`` (89 MP) and raises above twice that. We refuse more than ``MAX_IMAGE_PIXELS``
    (64 MP) before anything is decoded, so Pillow's check could only add a warning, printed from a worker
    thread. The ways to silence a warning are process-wide: ``warnings.catch_warnings`` swaps the global
    filter list (threads entering and leaving it interleaved leave the wrong filters behind, and
    ``decode_samples`` decodes in threads while the main thread runs the model), and ``Image.MAX_IMAGE_PIXELS``
    is the user's setting. So the file is identified here, with Pillow's own plugin registry, which skips
    ``Image.open``'s check, and our limit is applied first. The GIF reader checks a first frame larger than
    the screen while identifying, so that size is read from the GIF header before. Checks left in other
    plugins (ICO, multi-frame formats) are turned into ImageDecodeError by ``load_rgb``.
    """
    from PIL import Image

    prefix = fp.read(16)
    if prefix[:6] in (b"GIF87a", b"GIF89a"):
        try:
            _check_size(*_gif_size(fp))
        except struct.error:  # a truncated header: Pillow's reader reports it
            pass
    tried: set[str] = set()
    for loader in (Image.preinit, Image.init):  # common plugins first, then all (as Image.open)
        loader()
        for fmt in [f for f in Image.ID if f not in tried]:
            tried.add(fmt)
            factory, accept = Image.OPEN[fmt]
            try:
                result = not accept or accept(prefix)
                if result and not isinstance(result, str):
                    fp.seek(0)
                    im = factory(fp, filename)
                    _check_size(im.width, im.height)
                    return im
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format
                continue
    raise ImageDecodeError("not an image Pillow can identify")


def load_rgb(path: str | os.PathLike, min_side: int | None = None):
    """Open an image file as an upright RGB PIL image, or raise :class:`ImageDecodeError`.

    EXIF orientation is applied; palette, grey, CMYK, alpha and 16-bit modes become 8-bit RGB
    (transparency composited on white); truncated files are errors, never grey-filled.
    ``min_side`` lets big JPEGs decode at a reduced scale (draft mode) that is still large enough.
    A declared size over ``MAX_IMAGE_PIXELS`` is refused before decoding, and Pillow's decompression-bomb
    warning is not triggered for it (see :func:`_open_image`).
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with open(path, "rb") as fp, _open_image(fp, str(path)) as im:
            if min_side and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageDecodeError(f"file not found (dangling symlink to {os.readlink(path)})") from None
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A check left in a plugin; the warning arrives here as an exception when filters say "error".
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
            ArithmeticError, MemoryError, RuntimeError, Warning) as exc:
        # Pillow's decoders raise a range of types for corrupt data; all mean "unusable file". A Warning
        # (corrupt EXIF, ...) is only raised when the warning filters turn it into an error.
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            text = exc.strerror  # the path is known: "Too many levels of symbolic links", "Is a directory"
        if "truncated" in text:
            text = "truncated image file"
        raise ImageDecodeError(f"cannot decode: {text}") from None


def decode_for_model(path: str | os.PathLike, cfg: PreprocessConfig) -> torch.Tensor:
    """Decode to a CHW uint8 tensor whose short side is ``cfg.resize_size`` (aspect kept, capped)."""
    from PIL import Image

    im = load_rgb(path, min_side=cfg.resize_size)
    w, h = im.size
    scale = cfg.resize_size / min(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    limit = cfg.resize_size * MAX_ASPECT
    if max(new_w, new_h) > limit:  # crop the long side around the centre before resizing
        if w > h:
            keep = max(1, round(limit / scale))
            im = im.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
            new_w = limit
        else:
            keep = max(1, round(limit / scale))
            im = im.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))
            new_h = limit
    resample = getattr(Image.Resampling, cfg.interpolation.upper())
    im = im.resize((new_w, new_h), resample=resample)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


@dataclass
class DecodedImages:
    """Samples that decoded, their uint8 tensors, and the files skipped with their reason."""

    samples: list[Sample]
    images: list[torch.Tensor]
    skipped: list[dict]


def iter_decoded(paths: Sequence[str | os.PathLike], cfg: PreprocessConfig, workers: int | None = None,
                 lookahead: int = 128) -> Iterator[tuple[torch.Tensor | None, str | None]]:
    """Decode ``paths`` in background threads (Pillow releases the GIL while decoding), yielding
    ``(tensor, None)`` or ``(None, reason)`` in input order. At most ``lookahead`` images are decoded
    ahead of the consumer, so decoding overlaps the consumer's work (a forward pass) and memory stays
    bounded on large folders."""
    workers = workers or decode_workers()

    def work(path):
        try:
            return decode_for_model(path, cfg), None
        except ImageDecodeError as exc:
            return None, str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        remaining = iter(paths)
        try:
            for path in itertools.islice(remaining, max(1, lookahead)):
                pending.append(pool.submit(work, path))
            while pending:
                result = pending.popleft().result()
                for path in itertools.islice(remaining, 1):
                    pending.append(pool.submit(work, path))
                yield result
        finally:
            for future in pending:  # the consumer stopped early (--strict, Ctrl-C)
                future.cancel()


def decode_samples(samples: list[Sample], cfg: PreprocessConfig, strict: bool = False,
                   workers: int | None = None, desc: str = "decoding", progress: bool = True) -> DecodedImages:
    """Decode every sample once, in parallel threads."""
    return collect_decoded(samples, iter_decoded([s.path for s in samples], cfg, workers), strict, desc, progress)


def collect_decoded(samples: list[Sample], decoded: Iterable[tuple[torch.Tensor | None, str | None]],
                    strict: bool = False, desc: str = "decoding", progress: bool = True,
                    on_image: Callable[[Sample, torch.Tensor], None] | None = None) -> DecodedImages:
    """Sort decoding results into images and skipped files (``--strict``: the first failure is an
    error). ``on_image``, when given, receives each decoded image instead of it being kept."""
    from .progress import progress_bar

    ok_samples, images, skipped = [], [], []
    for sample, (tensor, reason) in progress_bar(zip(samples, decoded, strict=False), total=len(samples), desc=desc,
                                                 enabled=progress):
        if tensor is None:
            if strict:
                raise TransferlabError(f"{sample.path}: {reason} (--strict)")
            skipped.append({"path": str(sample.path), "label": sample.label, "reason": reason})
            continue
        ok_samples.append(sample)
        if on_image is not None:
            on_image(sample, tensor)
        else:
            images.append(tensor)
    if skipped:
        log.warning("skipped %d unreadable file(s) (listed with reasons in data_report.json), first: %s: %s",
                    len(skipped), skipped[0]["path"], skipped[0]["reason"])
    return DecodedImages(ok_samples, images, skipped)


def class_counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(c, 0) for c in classes}
