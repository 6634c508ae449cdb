"""Durable file writes: what "on disk" means wherever the agent promises it (spool, embedded
bus, SR outbox). A write is durable when the file's data and the directory entry naming it
have both been fsync'd."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that entries created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, buffers: Sequence[bytes | memoryview]) -> int:
    """Write every byte of ``buffers`` to ``fd`` (``writev`` may write less than asked);
    returns the number of bytes written."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


def atomic_write(target: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Replace ``target`` with ``data`` atomically and durably: a temporary file (in
    ``tmp_dir``, same file system, default ``target``'s folder), fsync, rename, fsync of the
    folder. Readers see the old file or the whole new one."""
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir or target.parent, prefix=f".{target.name}.",
                                    suffix=".tmp")
    try:
        try:
            write_all(fd, [data])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)
