"""The embedded default cache store: a directory, one sub-directory per disk."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import aiofiles.os

from engine.filepool import FilePool
from engine.fsutil import WritebackError, fsync_dir, sync_data
from engine.store.base import UntrustedBlobFiles
from engine.threads import named_pool
from protocol.frames import disk_id_problem
from protocol.logblob import BLOB_SUFFIX, blob_name, parse_blob_name

SYNC_THREADS = 16  # blob and directory syncs of one upload group in flight at once


class LocalStore:
    def __init__(self, root: Path, *, fsync: bool = True, pool: FilePool | None = None) -> None:
        """``pool``: where applied blobs go instead of being deleted (the spool's, on the same machine)."""
        self.root = root
        self.fsync = fsync
        self.pool = pool
        self._copy = False  # set once a hard link failed across file systems: every blob is copied then
        self._syncs = named_pool(SYNC_THREADS, "store-sync")  # threads start on use
        # one round at a time links and syncs directories: see _put_files
        self._naming = threading.Lock()
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        parsed = parse_blob_name(name)
        if parsed is None or disk_id_problem(parsed[0]):  # a disk id is one safe path component ("a..b" too)
            raise ValueError(f"not a log-blob name: {name!r}")
        return self.root / name

    async def make_directory(self, disk: str) -> None:
        # not makedirs: a store root gone missing (an unmounted volume) must fail uploads, not be re-made
        await asyncio.to_thread(self._path(blob_name(disk, 0, 0)).parent.mkdir, exist_ok=True)

    async def put_file(self, name: str, path: Path) -> None:
        await self.put_files([(name, path)])

    async def put_files(self, items: list[tuple[str, Path]]) -> None:
        """Store a group of blobs durably: group commit for uploads."""
        await asyncio.to_thread(self._put_files, [(self._path(name), path) for name, path in items])

    def _put_files(self, items: list[tuple[Path, Path]]) -> None:
        """Every blob's data synced, then every name linked, then every directory synced. The syncs of a
        stage run side by side: the block layer folds concurrent flushes into one, so a group of hundreds
        of blobs in hundreds of directories (1000 disks) costs a few flushes of the disk instead of two
        per blob, one after the other, which kept the store at a third of what 1000 agents sent
        (docs/benchmarks.md)."""
        if self.fsync:  # in copy mode too: a failed writeback of the spool file shows only here
            sources = list({source for _, source in items})
            failures = {source: exc for source, exc in zip(sources, self._syncs.map(_writeback_failure, sources))
                        if exc is not None}
            if failures:
                raise UntrustedBlobFiles(failures)
        # Rounds run side by side (upload.concurrency), but not here: after one round's directory sync fails,
        # another's sync of the same directory would pass without writing names it linked before the failure.
        with self._naming:
            for target, source in items:
                self._link(target, source)
            if self.fsync:
                try:
                    list(self._syncs.map(fsync_dir, {target.parent for target, _ in items}))
                except OSError:  # synced again as they are, the directories would pass without their new names
                    for target, _ in items:
                        target.unlink(missing_ok=True)  # the retry makes them again, and the directories dirty
                    raise

    def _link(self, target: Path, source: Path) -> None:
        """Give ``source`` (its data already synced: the spool does not sync its blobs, and a new name may
        reach the disk before its directory is synced) the name ``target``, hard-linked (same file
        system: no copy, and the spool keeps its own name). Each system call is a GIL hand-over for the
        upload thread, and at 1000 disks there are hundreds of blobs a second."""
        if not self._copy:
            try:
                self._link_new(source, target)
                return
            except FileExistsError:
                if os.path.samefile(target, source):
                    return  # stored before a restart
            except OSError as exc:  # no hard links here: copy (for good if the store is another file system)
                if exc.errno == errno.EXDEV:
                    self._copy = True
        self._replace(target, source)

    @staticmethod
    def _link_new(source: Path, target: Path) -> None:
        try:
            os.link(source, target)
        except FileNotFoundError:  # the disk's directory was not made at open, or was removed since
            target.parent.mkdir(exist_ok=True)
            os.link(source, target)

    def _replace(self, target: Path, source: Path) -> None:
        """Through a temporary name: a copy, or a different file already under the name."""
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            if self._copy:
                shutil.copyfile(source, tmp)
            else:
                os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        if self.fsync:  # the final name must only ever mean whole data
            sync_data(tmp)
        os.replace(tmp, target)

    async def remove_temporaries(self) -> int:
        return await asyncio.to_thread(self._remove_temporaries)

    def _remove_temporaries(self) -> int:
        """A ``.<blob>.tmp`` name is a hard link to a spool file (or a partial copy): left behind, it would
        hold that file's blocks for good and keep it out of the pool (a file with two names is deleted,
        not reused)."""
        removed = 0
        for _, entry in self._entries():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.unlink(entry.path)
                removed += 1
        return removed

    async def list_blobs(self) -> list[str]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[str]:
        return sorted(f"{disk}/{entry.name}" for disk, entry in self._entries()
                      if entry.name.endswith(BLOB_SUFFIX) and not entry.name.startswith("."))

    def _entries(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Every name in every disk directory, with its disk."""
        with os.scandir(self.root) as disks:
            for disk in disks:
                if disk.is_dir():
                    with os.scandir(disk.path) as names:
                        yield from ((disk.name, entry) for entry in names)

    async def get(self, name: str) -> bytes:
        """One hand-over to a thread for the whole read (aiofiles makes three: open, read, close), and at 1000
        disks the applier reads hundreds of blobs a second."""
        return await asyncio.to_thread(self._path(name).read_bytes)

    async def delete(self, name: str) -> None:
        if self.pool is not None:
            await asyncio.to_thread(self.pool.give, self._path(name))
            return
        try:
            await aiofiles.os.remove(self._path(name))
        except FileNotFoundError:
            pass

    async def close(self) -> None:
        self._syncs.shutdown(wait=False)


def _writeback_failure(path: Path) -> WritebackError | None:
    """Sync one blob file's data; a failed writeback is returned, so a group names every file it hit."""
    try:
        sync_data(path)
    except WritebackError as exc:
        return exc
    return None
