"""Durable file primitives. Blocking: call them from a worker thread, not the loop."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (POSIX needs the directory synced too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_data(path: Path) -> None:
    """fdatasync a file written earlier (by this or another process)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | bytearray | memoryview, *, fsync: bool = True, mode: int = 0o600,
                  reuse: Callable[[Path], bool] | None = None) -> None:
    """Write ``data`` to ``path`` so that after a crash it is either absent or complete.

    Write to a temporary name, fsync it, rename, fsync the directory: readers and
    recovery never see a torn file under the final name. ``reuse`` may put an old file at the
    temporary name (engine/filepool.py); it is then overwritten in place rather than created.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    reused = reuse is not None and reuse(tmp)
    fd = os.open(tmp, os.O_WRONLY if reused else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if reused:
            os.ftruncate(fd, len(data))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only; it holds keys or tokens."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
