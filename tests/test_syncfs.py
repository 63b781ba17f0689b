"""syncfs for a whole file system: only where it reports failures, and a failure is never forgotten."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

import pytest

import engine.syncfs
from engine.syncfs import WholeFileSystemSync, kernel_reports_sync_errors

LINUX_WITH_SYNCFS = sys.platform == "linux" and kernel_reports_sync_errors(os.uname().release)


@pytest.mark.parametrize(("release", "trusted"), [
    ("6.18.44-fc-v669", True), ("5.17.0", True), ("5.17", True), ("5.16.20-generic", False),
    ("5.10.0-rc1", False), ("4.19.0", False), ("6", False), ("", False), ("6.1+", True),
])
def test_syncfs_is_trusted_from_linux_5_17(release: str, trusted: bool) -> None:
    assert kernel_reports_sync_errors(release) is trusted


@pytest.mark.skipif(not LINUX_WITH_SYNCFS, reason="needs Linux 5.17 or later")
def test_a_file_system_is_synced_and_a_directory_elsewhere_is_not_covered(tmp_path: Path) -> None:
    sync = WholeFileSystemSync(tmp_path)
    try:
        (tmp_path / "blob").write_bytes(b"data")
        assert sync.sync() is True
        assert sync.covers(tmp_path)
        assert not sync.covers(Path("/proc")), "another file system: its files need syncs of their own"
    finally:
        sync.close()


def failing_with(code: int):
    calls: list[int] = []

    def syncfs(fd: int) -> int:
        calls.append(fd)
        ctypes.set_errno(code)
        return -1

    return syncfs, calls


def test_a_write_back_error_sticks_and_names_the_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error is reported once per open file: a retry would succeed without the lost data."""
    syncfs, calls = failing_with(errno.EIO)
    monkeypatch.setattr(engine.syncfs, "_SYNCFS", syncfs)
    sync = WholeFileSystemSync(tmp_path)
    try:
        with pytest.raises(OSError, match=f"syncfs of the file system of {tmp_path}: Input/output error"):
            sync.sync()
        monkeypatch.setattr(sync, "_call", lambda fd: 0)  # the kernel would say 0 now
        with pytest.raises(OSError, match="Input/output error; nothing written since is trusted"):
            sync.sync()
        assert len(calls) == 1
    finally:
        sync.close()


def test_a_refused_syncfs_falls_back_to_file_by_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncfs, calls = failing_with(errno.ENOSYS)  # a seccomp filter, or a file system without it
    monkeypatch.setattr(engine.syncfs, "_SYNCFS", syncfs)
    sync = WholeFileSystemSync(tmp_path)
    try:
        assert sync.sync() is False
        assert not sync.available
        assert sync.sync() is False and len(calls) == 1
    finally:
        sync.close()


def test_the_disk_is_flushed_again_after_the_last_metadata_write_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 without a journal flushes the disk's cache inside syncfs before its last metadata write-out:
    an fsync of the root comes after it, or the names a round just made might not survive a power loss."""
    calls: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(engine.syncfs, "_SYNCFS", lambda fd: (calls.append("syncfs"), 0)[1])
    monkeypatch.setattr(engine.syncfs.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    sync = WholeFileSystemSync(tmp_path)
    try:
        assert sync.sync() is True
        assert calls == ["syncfs", "fsync"]
    finally:
        sync.close()
