"""Durable file writes: what "on disk" means wherever the agent promises it (spool, embedded
bus, SR outbox). A write is durable when the file's data and the directory entry naming it
have both been fsync'd. Also what those files cost: disk used under a folder, free space on
its file system (metrics and ``hust19 doctor``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

ST_BLOCK_BYTES: Final = 512
"""The unit of ``st_blocks`` (POSIX), whatever the file system's block size."""


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


def existing_ancestor(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing parent: where a folder not made yet
    will live (what disk it will be on)."""
    return path if path.exists() else next(
        (p for p in path.resolve().parents if p.exists()), Path("/"))


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds (or will hold) ``path``."""
    return shutil.disk_usage(existing_ancestor(path)).free


def disk_bytes(*roots: Path) -> int:
    """Bytes the files under ``roots`` take on disk (allocated blocks, not apparent size:
    pre-allocated and sparse files count for what they use); missing roots count 0."""
    total = 0
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # deleted while walking
                    total += os.lstat(os.path.join(folder, name)).st_blocks * ST_BLOCK_BYTES
    return total
