"""Decoding image files, without torch: Pillow in, a CHW uint8 numpy array out.

The one owner of what a decodable image is: modes, EXIF orientation, size limits, and what makes a file
unusable (the reason recorded in data_report.json). Images are decoded in background threads (Pillow
releases the GIL while decoding), a bounded number ahead of the consumer.
"""

from __future__ import annotations

import io
import itertools
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np


class ResizeSpec(Protocol):
    """What decoding needs of a :class:`~transferlab.models.preprocessing.PreprocessConfig`."""

    resize_size: int  # short side after decoding
    interpolation: str  # bicubic | bilinear | nearest

# Classification never needs more: a bigger image is a decompression bomb or a mistake.
MAX_IMAGE_PIXELS = 64_000_000
# A long side beyond this many multiples of the short side is cropped away at decode time
# (keeps panoramas and 1 x N strips from exhausting memory; the centre crop never sees it).
MAX_ASPECT = 3


def available_cpus() -> int:
    """CPUs this process may run on (affinity and container limits included, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def decode_workers() -> int:
    """Threads that decode images: one per CPU, capped (decoding is I/O + Pillow; more threads than
    16 only add memory)."""
    return min(16, available_cpus())


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


def load_rgb(source: str | os.PathLike | bytes, min_side: int | None = None):
    """Open an image (a file, or its bytes: an upload) as an upright RGB PIL image, or raise
    :class:`ImageDecodeError`.

    EXIF orientation is applied; palette, grey, CMYK, alpha and 16-bit modes become 8-bit RGB
    (transparency composited on white); truncated files are errors, never grey-filled.
    ``min_side`` lets big JPEGs decode at a reduced scale (draft mode) that is still large enough.
    A declared size over ``MAX_IMAGE_PIXELS`` is refused before decoding, and Pillow's decompression-bomb
    warning is not triggered for it (see :func:`_open_image`).
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _load_open(io.BytesIO(source), "upload", min_side)
    path = Path(source)
    try:
        with open(path, "rb") as fp:
            return _load_open(fp, str(path), min_side)
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageDecodeError(f"file not found (dangling symlink to {os.readlink(path)})") from None
        raise ImageDecodeError("file not found") from None
    except PermissionError:
        raise ImageDecodeError("permission denied") from None
    except OSError as exc:  # opening failed: "Too many levels of symbolic links", "Is a directory"
        raise ImageDecodeError(f"cannot decode: {exc.strerror or exc}") from None


def _load_open(fp, name: str, min_side: int | None):
    from PIL import Image, ImageOps

    try:
        with _open_image(fp, name) as im:
            if min_side and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # A check left in a plugin; the warning arrives here as an exception when filters say "error".
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
            ArithmeticError, MemoryError, RuntimeError, Warning) as exc:
        # Pillow's decoders raise a range of types for corrupt data; all mean "unusable file". A Warning
        # (corrupt EXIF, ...) is only raised when the warning filters turn it into an error.
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            text = exc.strerror
        if "truncated" in text:
            text = "truncated image file"
        raise ImageDecodeError(f"cannot decode: {text}") from None


def decode_array(source: str | os.PathLike | bytes, cfg: ResizeSpec) -> np.ndarray:
    """Decode (a file or its bytes) to a CHW uint8 array whose short side is ``cfg.resize_size`` (aspect
    kept, capped)."""
    from PIL import Image

    im = load_rgb(source, min_side=cfg.resize_size)
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
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def stream(paths: Sequence[str | os.PathLike], decode: Callable, workers: int | None = None,
           lookahead: int = 128) -> Iterator[tuple[object | None, str | None]]:
    """Apply ``decode`` (path -> image, raising :class:`ImageDecodeError`) to ``paths`` in background
    threads, yielding ``(image, None)`` or ``(None, reason)`` in input order. At most ``lookahead`` images
    are decoded ahead of the consumer, so decoding overlaps the consumer's work (a forward pass) and memory
    stays bounded on large folders."""
    workers = workers or decode_workers()

    def work(path):
        try:
            return decode(path), None
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




# EXIF orientations that turn the image by 90 degrees (width and height swap when applied).
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})


def probe(source: str | os.PathLike, side: int = 64) -> tuple[tuple[int, int], np.ndarray]:
    """The upright size of an image file and a small HWC uint8 RGB copy (long side at most ``side``), for
    data-health checks; raises :class:`ImageDecodeError` like :func:`load_rgb`."""
    from PIL import Image

    image = load_rgb(source, min_side=side)
    try:
        with open(source, "rb") as fp, _open_image(fp, str(source)) as header:
            width, height = header.size
            if header.getexif().get(0x0112) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
    except (OSError, ImageDecodeError, SyntaxError, ValueError):
        width, height = image.size
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    return (width, height), np.asarray(image, dtype=np.uint8)
