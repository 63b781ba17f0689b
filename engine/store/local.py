"""The embedded default cache store: a directory, one sub-directory per disk."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import aiofiles
import aiofiles.os

from engine.filepool import FilePool
from engine.fsutil import fsync_dir, sync_data
from protocol.frames import disk_id_problem
from protocol.logblob import BLOB_SUFFIX, blob_name, parse_blob_name


class LocalStore:
    def __init__(self, root: Path, *, fsync: bool = True, pool: FilePool | None = None) -> None:
        """``pool``: where applied blobs go instead of being deleted (the spool's, on the same machine)."""
        self.root = root
        self.fsync = fsync
        self.pool = pool
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
        """Link every file into place, then one fsync per directory: group commit for uploads."""
        await asyncio.to_thread(self._put_files, [(self._path(name), path) for name, path in items])

    def _put_files(self, items: list[tuple[Path, Path]]) -> None:
        for target, source in items:
            self._link(target, source)
        if self.fsync:
            for directory in {target.parent for target, _ in items}:
                fsync_dir(directory)

    def _link(self, target: Path, source: Path) -> None:
        target.parent.mkdir(exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        if target.exists() and os.path.samefile(target, source):
            return  # stored before a restart (renaming a link onto its own file would leave the temp name)
        try:
            os.link(source, tmp)  # same file system: no copy; the spool keeps its own name
        except OSError:
            shutil.copyfile(source, tmp)
        if self.fsync:  # the spool does not sync its blobs: the final name must only ever mean whole data
            sync_data(tmp)
        os.replace(tmp, target)

    async def list_blobs(self) -> list[str]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[str]:
        names = []
        with os.scandir(self.root) as disks:
            for disk in disks:
                if not disk.is_dir():
                    continue
                with os.scandir(disk.path) as blobs:
                    names += [f"{disk.name}/{b.name}" for b in blobs
                              if b.name.endswith(BLOB_SUFFIX) and not b.name.startswith(".")]
        return sorted(names)

    async def get(self, name: str) -> bytes:
        async with aiofiles.open(self._path(name), "rb") as handle:
            return await handle.read()

    async def delete(self, name: str) -> None:
        if self.pool is not None:
            await asyncio.to_thread(self.pool.give, self._path(name))
            return
        try:
            await aiofiles.os.remove(self._path(name))
        except FileNotFoundError:
            pass

    async def close(self) -> None:
        return None
