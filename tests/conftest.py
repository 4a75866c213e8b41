"""Shared fixtures: tiny generated image folders and a small random-init backbone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TRANSFERLAB_OFFLINE", "1")  # tests never download
# A fresh feature cache per test session: tests never read a developer's cache, nor leave one behind.
os.environ["TRANSFERLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="transferlab-test-cache-")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"
# A tiny timm architecture (random init, ~0.1 s per batch): the real code path, no weights needed.
TINY_BACKBONE = "timm/test_efficientnet"
TINY = {"backbone": TINY_BACKBONE, "weights": "none", "batch_size": 8, "precision": "fp32", "image_size": 64}

COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 200, 60)}


def make_image(path: Path, color: tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40),
               fmt: str | None = None) -> Path:
    """A noisy image dominated by ``color``: classes are easy to tell apart, images are not identical."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_class_folders(root: Path, per_class: int = 6, classes=("red", "blue"), start_seed: int = 0,
                       ext: str = ".png") -> Path:
    for ci, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"{name}_{i}{ext}", COLORS[name], seed=start_seed + 1000 * ci + i)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """root/<class>/*.png with two easy classes, 6 images each."""
    return make_class_folders(tmp_path / "data")


@pytest.fixture
def tiny_split_data(tmp_path: Path) -> Path:
    """root/{train,val}/<class>/*.png (val stands for test, as hymenoptera ships)."""
    root = tmp_path / "split"
    make_class_folders(root / "train", per_class=8)
    make_class_folders(root / "val", per_class=3, start_seed=500)
    return root


def need_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        path = BUNDLED_DATA / name
    if not path.is_dir():
        pytest.fail(f"real data '{name}' not found beside the clone ({SHARED_DATA}) or in {BUNDLED_DATA}")
    return path
