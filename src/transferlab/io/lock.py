"""Advisory file locks between processes (shard workers on one machine, or on several over a shared folder).

``fcntl.flock`` on a lock file: the kernel releases it when the holder exits, so a killed worker never leaves a
stale lock behind. On Linux, NFS clients carry flock over as POSIX byte-range locks, so workers on several
machines exclude each other too (the server must offer locking: NFSv4, or NFSv3 with lockd). Where ``fcntl`` does
not exist (Windows) the lock is a no-op: every file is still written atomically (:mod:`transferlab.io.files`),
so sharing loses nothing but the avoided duplicate work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block; yields whether it is held.

    ``blocking=False``: do not wait; yields False when another process holds it. Each call opens the file anew,
    so two threads of one process exclude each other as two processes do. Raises OSError when the file cannot be
    created (a read-only folder): the caller decides whether to go on without it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
