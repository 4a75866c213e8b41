"""The torch-free predict path gives the model the same pixels as the torch path: both are compared with
golden arrays the torch path made (scripts/make_preprocess_golden.py) of real photos in every mode decoding
must handle (EXIF-rotated, CMYK, palette with transparency, grey, 16-bit grey, RGBA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from transferlab.data.decode import decode_array
from transferlab.data.images import decode_for_model
from transferlab.models.preprocessing import PreprocessConfig, eval_array, eval_batch

FIXTURES = Path(__file__).parent / "fixtures" / "preprocess"
CONFIGS = {"lite0": PreprocessConfig(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
           "small": PreprocessConfig(64, 73, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
GOLDEN = np.load(FIXTURES / "golden.npz")


@pytest.mark.parametrize("key", sorted(GOLDEN.files))
def test_numpy_and_torch_paths_match_the_golden_arrays(key):
    name, config = key.split(":")
    cfg = CONFIGS[config]
    golden = GOLDEN[key]
    numpy_path = eval_array([decode_array(FIXTURES / name, cfg)], cfg)[0]
    torch_path = eval_batch([decode_for_model(FIXTURES / name, cfg)], cfg)[0].numpy()
    diff_numpy, diff_torch = float(np.abs(numpy_path - golden).max()), float(np.abs(torch_path - golden).max())
    print(f"{key}: max abs difference numpy {diff_numpy:.2e}, torch {diff_torch:.2e}")
    assert numpy_path.dtype == np.float32 and numpy_path.shape == golden.shape == (3, cfg.input_size, cfg.input_size)
    assert diff_numpy <= 1e-6 and diff_torch <= 1e-6


def test_the_fixtures_cover_every_mode():
    from PIL import Image

    modes = {p.name: Image.open(p).mode for p in FIXTURES.iterdir() if p.suffix in (".jpg", ".png")}
    assert set(modes.values()) >= {"RGB", "CMYK", "P", "L", "I;16", "RGBA"}
    with Image.open(FIXTURES / "exif_rotated.jpg") as im:
        assert im.getexif().get(0x0112) == 6
    # the rotation is applied: stored landscape, decoded portrait
    stored = Image.open(FIXTURES / "exif_rotated.jpg").size
    decoded = decode_array(FIXTURES / "exif_rotated.jpg", CONFIGS["small"]).shape
    assert (stored[0] > stored[1]) != (decoded[2] > decoded[1])
