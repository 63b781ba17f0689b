"""Used log-blob files kept for the next spool write instead of deleted.

Every log blob is a file: written into the spool, linked into the local cache store, deleted once
applied. At 1000 disks that is hundreds of files a second, and creating them was a third of the
server's CPU: ext4 without a journal will not reuse an inode deleted in the last few seconds, so each
create scans past every recently deleted one (``recently_deleted`` in the kernel's profile). A file
renamed here instead keeps its inode and its blocks; the next spool write renames it into place and
overwrites it, and nothing is freed or allocated.

The pool is shared between processes (the applier process gives, the server takes) through nothing
but the directory: a rename is atomic, and a taker that loses a race gets ``FileNotFoundError`` and
tries the next name. Only a file with a single name is taken in: one still linked elsewhere (a spool
blob the cache store also holds) is another file's content and is simply unlinked.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path

DEFAULT_MAX_FILES = 256  # what the pool may hold: a fraction of a second of blobs at 1000 disks
RESCAN_INTERVAL_S = 0.1  # how often a process re-reads the directory (others give and take too)


class FilePool:
    def __init__(self, directory: Path, *, max_files: int = DEFAULT_MAX_FILES) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory = directory
        self.max_files = max_files
        self._prefix = uuid.uuid4().hex[:12]  # names never collide with another process's or an earlier run's
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._names: deque[str] = deque()  # taken from the directory, not yet tried
        self._scanned_at = float("-inf")
        self._count = 0  # files in the directory at the last scan, plus what this process gave since
        self._counted_at = float("-inf")
        self._enabled = True  # off once a rename across file systems failed: then every give unlinks

    def give(self, path: Path) -> None:
        """Blocking: keep ``path`` for reuse, or delete it (pool full, or linked elsewhere)."""
        try:
            if not self._enabled or os.stat(path).st_nlink != 1 or not self._room():
                path.unlink(missing_ok=True)
                return
        except FileNotFoundError:
            return  # already gone
        try:
            os.rename(path, self.directory / f"{self._prefix}.{next(self._counter)}")
            return
        except FileNotFoundError:  # the pool's directory was removed: recreated for the next one
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            if exc.errno == errno.EXDEV:  # the pool is on another file system than the blob: never again
                self._enabled = False
        path.unlink(missing_ok=True)

    def take(self, target: Path) -> bool:
        """Blocking: move a pooled file to ``target`` (to be overwritten); False if none is left."""
        while True:
            with self._lock:
                if not self._names:
                    if time.monotonic() - self._scanned_at < RESCAN_INTERVAL_S:
                        return False
                    try:
                        self._rescan()
                    except OSError:  # the directory was removed (or cannot be read): write a new file
                        self._scanned_at = time.monotonic()
                        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                        return False
                    if not self._names:
                        return False
                name = self._names.popleft()
                self._count -= 1
            try:
                os.rename(self.directory / name, target)
                return True
            except FileNotFoundError:
                if target.parent.is_dir():  # another process took it
                    continue
                with self._lock:  # the target's directory is missing: the file is still ours to give out
                    self._names.appendleft(name)
                    self._count += 1
                raise

    def _rescan(self) -> None:
        with os.scandir(self.directory) as entries:
            names = [entry.name for entry in entries]
        now = time.monotonic()
        self._scanned_at = self._counted_at = now
        self._count = len(names)
        self._names = deque(names)

    def _room(self) -> bool:
        with self._lock:
            if time.monotonic() - self._counted_at >= RESCAN_INTERVAL_S:
                try:
                    with os.scandir(self.directory) as entries:
                        self._count = sum(1 for _ in entries)
                except FileNotFoundError:
                    self._count = 0  # removed; give() recreates it
                self._counted_at = time.monotonic()
            if self._count >= self.max_files:
                return False
            self._count += 1
            return True
