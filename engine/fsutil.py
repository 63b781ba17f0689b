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


class WritebackError(OSError):
    """The file system failed to write a file's data back. Linux marks the lost pages clean and reports the
    error once: a second sync succeeds without writing them ("fsyncgate"), so the file can no longer be
    trusted to be on disk and must be written again, into a new file, from a copy known to be whole."""


def sync_data(path: Path) -> None:
    """fdatasync a file written earlier (by this or another process); a failed sync is a WritebackError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise WritebackError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        os.close(fd)


def sync_or_rewrite(path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o600) -> bool:
    """Sync ``path``, whose content ``data`` was just read and checked; if the sync fails, write ``data`` to a new
    file under the name instead (the old one's lost pages would pass the next sync). True if it was rewritten."""
    try:
        sync_data(path)
    except WritebackError:
        write_durably(path, data, mode=mode)
        return True
    return False


def write_durably(path: Path, data: bytes | bytearray | memoryview, *, fsync: bool = True,
                  mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that after a crash it is either absent or complete.

    Write to a temporary name, fsync it, rename, fsync the directory: readers and
    recovery never see a torn file under the final name (``fsync=False``: only a process crash).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        _write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def write_in_place(path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o600,
                   reuse: Callable[[Path], bool] | None = None) -> None:
    """Write ``data`` under its final name at once, neither synced nor atomic: only for files whose every
    reader checks them whole (spool blobs: a start authenticates each one and replays a torn one from the
    write-ahead log). A temporary name and a rename cost two more system calls per blob, and each call is
    a GIL hand-over for the thread making it. ``reuse`` may put an old file at ``path`` (engine/filepool.py);
    it is then overwritten in place rather than created."""
    reused = reuse is not None and reuse(path)
    fd = os.open(path, os.O_WRONLY) if reused else _create_new(path, mode)
    try:
        _write_all(fd, data)
        if reused:
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def _create_new(path: Path, mode: int) -> int:
    """A new file at ``path``: a file already there may have other names (a blob hard-linked into the
    local cache store), so it is unlinked rather than truncated and overwritten."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        path.unlink()
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only; it holds keys or tokens."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
