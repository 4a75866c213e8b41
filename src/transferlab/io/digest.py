"""Content digests of files: SHA-256 for weights, a fast BLAKE2b for images."""

from __future__ import annotations

import functools
import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# lru_cache: bounded and safe to call from several threads. The key holds the file's inode, size and
# modification time, so a file rewritten in place is read again.
@functools.lru_cache(maxsize=1 << 16)
def _digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """Content digest of an image file, remembered per (path, inode, size, mtime) within a process, so the
    runs of an experiment read each image once."""
    st = os.stat(path)
    return _digest(os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
