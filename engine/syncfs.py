"""One flush for a whole file system: syncfs(2), used where hundreds of small files must become durable at
once (the local cache store's upload rounds at 1000 disks). Synced one by one, each file is a system call
that gives up the GIL and takes it back, and under load that hand-over, not the disk, was what the server
spent its time on (docs/benchmarks.md).

syncfs is only trusted where it reports what went wrong: Linux 5.17 and later (before 5.8 it returned 0
after a failed write-back, before 5.17 it ignored the file system's own sync errors: a failed journal
commit or cache flush). An error is reported once per open file, so the file system is synced through one
descriptor opened up front, and an error sticks: after one, no later call claims anything durable — which
files lost data is unknown, and a retry would succeed without them.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path

MIN_LINUX = (5, 17)
UNSUPPORTED = {errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP}  # seccomp filters, some FUSE file systems


def kernel_reports_sync_errors(release: str) -> bool:
    """Whether a Linux kernel of this ``uname -r`` makes syncfs report every failure (see the module)."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return match is not None and (int(match.group(1)), int(match.group(2))) >= MIN_LINUX


def _libc_syncfs() -> Callable[[int], int] | None:
    if sys.platform != "linux" or not kernel_reports_sync_errors(os.uname().release):
        return None
    try:
        import ctypes  # here: a Python built without ctypes still runs, file by file

        call = ctypes.CDLL(None, use_errno=True).syncfs  # ctypes releases the GIL for the call
    except (ImportError, OSError, AttributeError):
        return None
    call.argtypes, call.restype = [ctypes.c_int], ctypes.c_int
    return call


_SYNCFS = _libc_syncfs()


class WholeFileSystemSync:
    """Sync the file system holding ``root``; ``sync()`` is False where that cannot be done (the caller
    then syncs file by file) and raises the first error for good."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._call = _SYNCFS
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)  # errors are reported from this moment on
        self._device = os.fstat(self._fd).st_dev
        self._same_device: set[Path] = set()
        self._lock = threading.Lock()
        self._failure: OSError | None = None

    @property
    def available(self) -> bool:
        return self._call is not None

    def covers(self, directory: Path) -> bool:
        """Whether ``directory`` is on the synced file system (a disk directory may be a mount of its own)."""
        if directory not in self._same_device:
            if os.stat(directory).st_dev != self._device:
                return False
            self._same_device.add(directory)
        return True

    def sync(self) -> bool:
        """Blocking: everything written to the file system so far is on the disk, names and data."""
        with self._lock:
            if self._failure is not None:
                raise self._failure
            if self._call is None:
                return False
            if self._call(self._fd) != 0:
                import ctypes

                err = ctypes.get_errno()
                if err in UNSUPPORTED:
                    self._call = None
                    return False
                self._failure = OSError(err, f"syncfs of the file system of {self.root}: {os.strerror(err)}; "
                                             "nothing written since is trusted as durable until a restart")
                raise self._failure
            try:
                # Without a journal, ext4's syncfs flushes the disk's cache before its last metadata
                # write-out (inode tables, directory blocks): this fsync's flush comes after it.
                os.fsync(self._fd)
            except OSError as exc:
                self._failure = exc
                raise
            return True

    def close(self) -> None:
        os.close(self._fd)
