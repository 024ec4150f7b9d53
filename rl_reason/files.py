"""Durable file writes: what a crash-safe write does after its data and rename.

A written file's data reaches the disk with `os.fsync` of the file; its new
name (a rename into place) with `os.fsync` of the directory holding it. Some
filesystems refuse to fsync a directory; that is not an error here.
"""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike, *, missing_ok: bool = False) -> None:
    """fsync a file or directory by path (refusals of fsync itself ignored).

    missing_ok: a path that cannot be opened is skipped instead of raising.
    """
    try:
        fd = os.open(os.fspath(path) or ".", os.O_RDONLY)
    except OSError:
        if missing_ok:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
