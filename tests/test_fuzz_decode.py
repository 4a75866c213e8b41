"""Fuzzing the decoder: corrupted bytes of real images either decode to a valid image or raise ImageDecodeError.

Seeds are small real images written by Pillow; hypothesis flips, inserts, deletes and overwrites bytes and
truncates them. Derandomized (the same examples in every run and on CI) and without an example database.
"""

from __future__ import annotations

import importlib
import io
import pkgutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

import transferlab
from transferlab.data.decode import ImageDecodeError, load_rgb
from transferlab.data.images import decode_for_model
from transferlab.models.preprocessing import PreprocessConfig

# Hypothesis now and then draws a constant found in the project's loaded modules: with all of them loaded,
# the derandomized examples are the same whether this file runs alone or after other tests.
for _module in pkgutil.walk_packages(transferlab.__path__, "transferlab."):
    importlib.import_module(_module.name)

CFG = PreprocessConfig(input_size=16, resize_size=18, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
FUZZ = {"deadline": None, "derandomize": True, "database": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (10, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8)))
    return {
        "jpeg": _save(rgb, "JPEG", quality=85),
        "jpeg-progressive-exif": _save(rgb, "JPEG", quality=85, progressive=True, exif=exif.tobytes()),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "png": _save(rgb, "PNG"),
        "png-palette-transparent": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG",
                                         transparency=0),
        "png-rgba": _save(rgba, "PNG"),
        "png-16bit": _save(Image.fromarray(rng.integers(0, 65536, (12, 20), dtype=np.uint16)), "PNG"),
        "gif-animated": gif.getvalue(),
        "bmp-palette": _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "BMP"),
        "tiff-lzw": _save(rgb, "TIFF", compression="tiff_lzw"),
        "webp": _save(rgb, "WEBP", quality=80),
    }


SEEDS = _seeds()
# An edit: what, where (an offset in the first 64 bytes, where the headers are, or a fraction of the file), a byte.
mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "set"]),
                     st.one_of(st.integers(0, 63), st.floats(0, 1)), st.integers(0, 255))


def _mutate(raw: bytes, edits: list[tuple[str, int | float, int]]) -> bytes:
    out = bytearray(raw)
    for kind, where, value in edits:
        i = min(where if isinstance(where, int) else int(where * len(out)), max(len(out) - 1, 0))
        if kind == "insert":
            out[i:i] = bytes([value])
        elif not out:
            continue
        elif kind == "delete":
            del out[i]
        elif kind == "flip":
            out[i] ^= 1 << (value % 8)
        else:
            out[i] = value
    return bytes(out)


def _suffix(seed_name: str) -> str:
    return "." + seed_name.split("-")[0]  # .jpeg, .png, .gif, .bmp, .tiff, .webp


def _check_decode(raw: bytes, suffix: str) -> str:
    """Decode ``raw`` both ways; returns 'ok' or 'error'. Anything but ImageDecodeError propagates (fails),
    and Pillow's decompression-bomb warning must not be emitted (the size limit is applied before it)."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # truncated files must be errors, never grey-filled
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = Path(folder) / f"fuzz{suffix}"
        path.write_bytes(raw)
        try:
            im = load_rgb(path)
        except ImageDecodeError:
            outcome = "error"
        else:
            assert im.mode == "RGB" and im.width >= 1 and im.height >= 1
            outcome = "ok"
        try:
            t = decode_for_model(path, CFG)
        except ImageDecodeError:
            outcome = "error"
        else:
            assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3
            assert min(t.shape[1:]) == CFG.resize_size
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], caught
    return outcome


def test_seeds_decode():
    """The unmutated seeds are valid images: the fuzz targets start from real, decodable data."""
    for name, raw in SEEDS.items():
        assert _check_decode(raw, _suffix(name)) == "ok", name


@settings(max_examples=160, **FUZZ)
@given(name=st.sampled_from(sorted(SEEDS)), edits=st.lists(mutation, min_size=1, max_size=6))
# Found by longer fuzzing runs: Pillow raises ValueError or SyntaxError (not OSError) for these.
@example(name="png", edits=[("flip", 11, 58)])  # ValueError: Truncated IHDR chunk
@example(name="png-rgba", edits=[("set", 36, 43)])  # SyntaxError: broken PNG file
@example(name="gif-animated", edits=[("delete", 55, 172)])  # ValueError: tile cannot extend outside image
@example(name="bmp-palette", edits=[("set", 0.419, 33), ("flip", 30, 48)])  # ValueError: not enough image data
@example(name="jpeg-progressive-exif", edits=[("insert", 10, 30), ("flip", 31, 187)])  # SyntaxError: not a TIFF
@example(name="tiff-lzw", edits=[("insert", 34, 57), ("flip", 62, 113), ("flip", 2, 208)])  # ValueError: seek
# 65290 x 1544 pixels, between Pillow's warning (89 MP) and error (179 MP) limits: the GIF screen, the first frame
@example(name="gif-animated", edits=[("set", 7, 0xFF), ("set", 9, 0x06)])
@example(name="gif-animated", edits=[("set", 58, 0xFF), ("set", 60, 0x06)])
def test_mutated_bytes_decode_or_raise_decode_error(name, edits):
    event(_check_decode(_mutate(SEEDS[name], edits), _suffix(name)))


@settings(max_examples=100, **FUZZ)
@given(name=st.sampled_from(sorted(SEEDS)), keep=st.floats(0, 1, exclude_max=True),
       edits=st.lists(mutation, max_size=2))
def test_truncated_bytes_decode_or_raise_decode_error(name, keep, edits):
    raw = _mutate(SEEDS[name], edits)
    event(_check_decode(raw[: int(keep * len(raw))], _suffix(name)))
