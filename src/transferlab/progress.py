"""Progress display: tqdm bars on a terminal; nothing on a non-TTY or with ``--quiet``."""

from __future__ import annotations

import sys
from collections.abc import Iterable

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def bars_quiet() -> bool:
    return _quiet


def bars_enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def progress_bar(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True,
                 leave: bool = False):
    if not (enabled and bars_enabled()):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True)
