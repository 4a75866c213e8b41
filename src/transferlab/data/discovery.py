"""Image folders: the one owner of class order (sorted folder names, or sorted CSV labels), of the
train/val/test layouts a folder ships with, and of what counts as an image file."""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import TransferlabError

log = logging.getLogger("transferlab")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
TEST_FOLDER_NAMES = ("test", "val", "validation", "valid")


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


def read_class_folders(folder: Path, what: str = "DATA_DIR", ignored: list[str] | None = None,
                       empty: list[str] | None = None) -> list[Sample]:
    """``folder/<class>/**/<image>`` -> samples. Errors: missing folder, no class, class without images
    (unless ``empty`` is a list: such classes are recorded there, as their folder, and left out)."""
    ignored = [] if ignored is None else ignored
    _require_dir(folder, what)
    class_dirs = _visible_subdirs(folder, ignored)
    if not class_dirs:
        raise TransferlabError(f"{what} {folder}: no class folders inside (expected {folder}/<class>/<image>)")
    samples = []
    for class_dir in class_dirs:
        images = _walk_images(class_dir, ignored)
        if not images and empty is not None:
            empty.append(str(class_dir))
            continue
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
             labels_csv: str | os.PathLike | None = None, empty: list[str] | None = None) -> Splits:
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
            train = read_class_folders(names["train"], "DATA_DIR/train", ignored, empty)
            present = [n for n in TEST_FOLDER_NAMES if n in names]
            if "test" in names:
                test = read_class_folders(names["test"], "DATA_DIR/test", ignored, empty)
                val_name = next((n for n in present if n != "test"), None)
                if val_name:
                    val = read_class_folders(names[val_name], f"DATA_DIR/{val_name}", ignored, empty)
            elif present:
                test = read_class_folders(names[present[0]], f"DATA_DIR/{present[0]}", ignored, empty)
            layout = "train/" + "".join(f", {s}/" for s, v in (("val", val), ("test", test)) if v)
        else:
            train = read_class_folders(data_dir, "DATA_DIR", ignored, empty)
            layout = "class folders"
    if test_dir is not None:
        test = read_class_folders(Path(test_dir), "--test-dir", ignored, empty)
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


def class_counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = Counter(s.label for s in samples)
    return {c: counts.get(c, 0) for c in classes}


def discover_evaluation(data_dir: str | os.PathLike) -> tuple[list[Sample], str]:
    """The images an evaluation scores: a dataset with a train/test layout gives its test split, any other
    folder its class folders. Returns (samples, layout)."""
    data_dir = Path(data_dir)
    names = {p.name.lower() for p in data_dir.iterdir() if p.is_dir()} if data_dir.is_dir() else set()
    if "train" in names and names & set(TEST_FOLDER_NAMES):
        return discover(data_dir).test, "test split"
    return read_class_folders(data_dir, "DATA_DIR"), "class folders"
