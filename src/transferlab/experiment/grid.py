"""The experiment grid: every combination of backbones x strategies x optimizers x heads x seeds is a run.

A run directory's name ends with a hash of everything that changes the result (the resolved training
options minus paths and display options, a fingerprint of the data files, the library versions): the same
command skips the runs that already finished and trains the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RESULT_NEUTRAL, TrainConfig
from ..data.discovery import is_image_file
from ..errors import TransferlabError
from ..io.digest import file_digest, sha256_file
from ..provenance import result_versions

# Options that name where things are or how they are computed/displayed, not what the result is.
HASH_EXCLUDED = ("data_dir", "test_dir", "labels", "cache_dir", "precision", "device", *RESULT_NEUTRAL)

GRID_AXES = ("backbones", "strategies", "optimizers", "heads", "seeds")

AXIS_FIELD = {"backbones": "backbone", "strategies": "strategy", "optimizers": "optimizer", "heads": "head",
              "seeds": "seed"}



def parse_list(value, option: str, cast=str) -> list:
    """``"a,b"`` or ``["a", "b"]`` -> ["a", "b"] (stripped, empty parts dropped, duplicates removed)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            item = cast(item)
        except ValueError:
            raise TransferlabError(f"--{option} {value}: '{item}' is not a valid value") from None
        if item not in out:
            out.append(item)
    return out



@dataclass
class RunSpec:
    """One combination of the grid."""

    name: str  # the run directory's name: <readable>-<hash8>
    label: str  # the configuration as shown in tables (the grid axes that vary, seed excluded)
    group: str  # runs differing only by seed share a group
    config: TrainConfig  # resolved
    axes: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """The run's hash (:func:`run_hash`), the last part of its name."""
        return self.name.rsplit("-", 1)[-1]

    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "group": self.group, "seed": self.config.seed,
                "axes": self.axes}



def _image_digests(root: Path) -> list[tuple[str, str]]:
    """(path relative to ``root``, content digest) of every image file, sorted; digests in parallel threads."""
    paths = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        paths += [Path(dirpath) / name for name in files if is_image_file(Path(dirpath) / name)]

    def digest(path: Path) -> str:
        try:
            return file_digest(path)
        except OSError as exc:  # unreadable: the run reports it; the fingerprint only needs to be stable
            return f"unreadable:{exc.errno}"

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, paths))
    return sorted((p.relative_to(root).as_posix(), d) for p, d in zip(paths, digests, strict=True))



def data_fingerprint(data_dir: str | os.PathLike, test_dir: str | os.PathLike | None = None,
                     labels: str | os.PathLike | None = None, weights: str | None = None) -> str:
    """SHA-256 over the image files (path relative to their folder and a digest of the bytes), the labels
    CSV's bytes and a weights file's bytes: independent of where the folder lives or of file times (a copy
    or a fresh checkout of the same data finds its runs). Costs one read of the data (as the feature cache)."""
    digest = hashlib.sha256()
    for role, root in (("data", data_dir), ("test", test_dir)):
        if root is not None and Path(root).is_dir():
            digest.update(json.dumps([role, _image_digests(Path(root))]).encode())
    for role, path in (("labels", labels), ("weights", weights)):
        if path and path not in ("default", "none") and Path(path).is_file():
            digest.update(f"{role}:{sha256_file(path)}".encode())
    return digest.hexdigest()



def run_hash(config: TrainConfig, fingerprint: str, versions: dict | None = None) -> str:
    """8 hex digits of SHA-256 over what changes a run's result (not paths nor display options)."""
    options = {k: v for k, v in config.to_dict().items() if k not in HASH_EXCLUDED}
    blob = json.dumps({"train": options, "data": fingerprint, "versions": versions or result_versions()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]



def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(text)).strip("_") or "x"



def readable_name(config: TrainConfig) -> str:
    return "-".join([_slug(config.backbone), config.strategy, config.optimizer, f"h{_slug(config.head)}",
                     f"s{config.seed}"])



def build_grid(base: TrainConfig, grid: dict[str, list], versions: dict | None = None) -> list[RunSpec]:
    """Every combination, in grid order (backbone, strategy, optimizer, head, seed; the last varies fastest)."""
    versions = versions or result_versions()
    fingerprint = data_fingerprint(base.data_dir, base.test_dir, base.labels, base.weights)
    varying = [a for a in GRID_AXES[:-1] if len(grid[a]) > 1]
    specs = []
    for values in itertools.product(*(grid[a] for a in GRID_AXES)):
        axes = dict(zip(GRID_AXES, values, strict=True))
        cfg = base.replace(**{AXIS_FIELD[a]: v for a, v in axes.items()}, epochs=base.epochs).resolved()
        parts = [f"head {v}" if a == "heads" else str(v) for a, v in axes.items() if a in varying]
        label = " · ".join(parts) or f"{cfg.strategy} · {cfg.optimizer} · head {cfg.head}"
        group = "-".join([_slug(axes[a]) for a in GRID_AXES[:-1]])
        specs.append(RunSpec(f"{readable_name(cfg)}-{run_hash(cfg, fingerprint, versions)}", label, group, cfg,
                             {AXIS_FIELD[a]: v for a, v in axes.items()}))
    return specs

