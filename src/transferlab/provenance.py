"""Where a result came from: library versions, the machine, and seeding.

torch, torchvision and timm are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import platform
import random
from pathlib import Path

from . import __version__


def result_versions() -> dict:
    """The versions that can change a result (part of an experiment run's hash and a feature cache key)."""
    import timm
    import torch
    import torchvision

    return {"transferlab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def versions() -> dict:
    """:func:`result_versions` plus Python's, as recorded in a run's config.json."""
    return result_versions() | {"python": platform.python_version()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(policy: dict | None = None) -> dict:
    """The machine an experiment ran on, for its experiment.json and report."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"versions": versions(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu, "policy": policy}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (a run's initialisation starts from here)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
