"""Where a seed disk and its recovery journal live: the storage contract and the local backend.

A ``SeedVolume`` is one disk's image (the newest applied state), its applier
state record and its undo entries. The applier and failover speak only to this
contract, so a local file and an Azure page blob behave the same. Operations are
coarse (a whole apply group at a time) so a backend can batch and parallelise.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from engine.fsutil import fsync_dir, write_at
from engine.recovery.segment_journal import SegmentJournal
from engine.recovery.state_file import LEGACY_SUFFIX, STATE_SUFFIX, StateFile

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
COPY_CHUNK = 4 * 1024 * 1024


@dataclass
class SeedState:
    """Progress of one seed disk, recorded only after the disk itself is durable."""

    disk: str
    disk_size: int
    applied_seq: int = 0
    last_source_us: int = 0
    applied_bytes: int = 0
    failover_seq: int | None = None  # a (non-test) failover was made to this point
    committed_failover: bool = False  # ... and committed: replication of the disk has stopped


@dataclass(frozen=True)
class GroupCommit:
    """Steps 2–4 of an apply group (see engine.applier), for a volume to carry out in this order: read
    the before-images of ``ranges`` (back to back) and store ``encode_entry(images)`` durably as the undo entry
    ``entry_name``; apply ``writes`` and make them durable; then save ``state``. A crash anywhere in
    between leaves an entry newer than the saved state, which the applier rolls back when it opens the disk."""

    entry_name: str
    ranges: Sequence[tuple[int, int]]
    encode_entry: Callable[[bytes | bytearray], bytes]  # CPU-heavy (lz4): called on a worker thread
    writes: Sequence[tuple[int, bytes | memoryview]]
    state: SeedState


class SeedVolume(Protocol):
    disk: str

    async def load_state(self) -> SeedState | None: ...

    async def save_state(self, state: SeedState) -> None:
        """Atomic and durable: after a crash, either the old or the new state."""

    async def ensure_size(self, size: int) -> None: ...

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]: ...

    async def write_ranges(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        """Apply in the given order (later writes win where they overlap)."""

    async def flush(self) -> None:
        """Make every write so far durable."""

    async def put_entry(self, name: str, data: bytes) -> None:
        """Store an undo entry atomically and durably."""

    async def commit_group(self, group: GroupCommit) -> int:
        """Grow the disk to ``group.state.disk_size``, then carry out ``group``; returns the undo entry's size.

        One call for the whole group, so that a backend can run it as one unit: the local volume runs
        it on one thread (at 1000 disks the applier commits hundreds of small groups a second, and
        every hand-over between the event loop and a thread costs two context switches and the GIL).
        """

    async def list_entries(self) -> list[str]: ...

    async def get_entry(self, name: str) -> bytes: ...

    async def delete_entry(self, name: str) -> None: ...

    async def copy_image_to(self, path: Path, progress: Progress | None = None) -> int:
        """Copy the image to a local sparse file (holes stay holes); returns its size."""

    async def close(self) -> None: ...


class VolumeBroken(OSError):
    """An apply group failed once its undo entry may have been stored: the image may hold part of the group.
    A retry would read that part as the before-images of a new entry and lose the point before the group,
    so the volume takes no more changes; opening it again rolls the group back from the stored entry."""


class LocalVolumes:
    """Opens local volumes under one directory (the applier's seed_dir)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self._opened: set[str] = set()
        root.mkdir(parents=True, exist_ok=True)
        if fsync:  # once for every state file an earlier process renamed into it (LocalVolume.load_state)
            fsync_dir(root)

    def __call__(self, disk: str) -> LocalVolume:
        if self.fsync and disk in self._opened:  # opened again after it broke: a rename its state file's last
            fsync_dir(self.root)                 # save made (a new file after a failed sync) may not be durable
        self._opened.add(disk)
        return LocalVolume(self.root, disk, fsync=self.fsync)

    async def list_disks(self) -> list[str]:
        return sorted({p.name[: -len(suffix)] for suffix in (STATE_SUFFIX, LEGACY_SUFFIX)
                       for p in self.root.glob(f"*{suffix}")})


class LocalVolume:
    """``<root>/<disk>.img`` (sparse), ``<disk>.state`` (engine/recovery/state_file.py) and the undo entries
    in ``journal/<disk>/*.journal`` (engine/recovery/segment_journal.py)."""

    def __init__(self, root: Path, disk: str, *, fsync: bool = True) -> None:
        self.disk = disk
        self.root = root
        self.fsync = fsync
        self.image_path = root / f"{disk}.img"
        self._state = StateFile(root, disk, fsync=fsync)
        journal_dir = root / "journal" / disk
        journal_dir.mkdir(parents=True, exist_ok=True)
        self._journal = SegmentJournal(journal_dir, fsync=fsync)
        self._fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._broken: str | None = None  # why this volume refuses changes (until it is opened again)

    async def load_state(self) -> SeedState | None:
        """The state as saved, made durable first: a kill right after a save leaves it in the page cache only,
        and the applier deletes applied blobs on its word. A power loss after that would bring back the older
        state, roll the group back, and find its blobs gone. (The directory, which a first save or a rewrite
        renames the file into, is synced once for all disks, by LocalVolumes.)"""
        record = await asyncio.to_thread(self._state.load)
        return SeedState(**record) if record is not None else None

    async def save_state(self, state: SeedState) -> None:
        self._check_changeable()
        await asyncio.to_thread(self._save_state, state)

    def _save_state(self, state: SeedState) -> None:
        self._state.save(asdict(state))

    async def ensure_size(self, size: int) -> None:
        self._check_changeable()
        self._ensure_size(size)

    def _ensure_size(self, size: int) -> None:
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # sparse: unwritten ranges cost no space

    async def read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return await asyncio.to_thread(self._read_ranges, ranges)

    def _read_ranges(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        images, out, at = memoryview(self._read_images(ranges)), [], 0
        for _, length in ranges:
            out.append(bytes(images[at:at + length]))
            at += length
        return out

    def _read_images(self, ranges: Sequence[tuple[int, int]]) -> bytearray:
        """The before-images of ``ranges`` back to back, read where the undo entry compresses them from.

        Why not a bytes object per range and their join: that copied every before-image once more, into
        fresh memory the kernel must fault in (an apply group's images are up to ``group_max_bytes``). One
        buffer took reading and encoding an entry from 2.12-2.19 to 1.98-2.04 CPU s/GB at 8 MiB groups and
        from 1.16-1.20 to 1.11-1.14 at 400 KiB (docs/benchmarks.md). Beyond the end of the image (a disk
        grown by this group) the buffer's zeros stand, as a sparse file's holes read.
        """
        images = bytearray(sum(length for _, length in ranges))
        view, at = memoryview(images), 0
        for offset, length in ranges:
            target = view[at:at + length]
            while target:
                got = os.preadv(self._fd, [target], offset)
                if got == 0:  # end of file
                    break
                target, offset = target[got:], offset + got
            at += length
        return images

    async def write_ranges(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        self._check_changeable()
        await asyncio.to_thread(self._write_ranges, writes)

    def _write_ranges(self, writes: Sequence[tuple[int, bytes | memoryview]]) -> None:
        for offset, data in writes:
            write_at(self._fd, data, offset)

    async def flush(self) -> None:
        if self.fsync:
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        if self.fsync:
            os.fsync(self._fd)

    async def put_entry(self, name: str, data: bytes) -> None:
        self._check_changeable()
        await asyncio.to_thread(self._put_entry, name, data)

    def _put_entry(self, name: str, data: bytes) -> None:
        self._journal.append(name, data)

    async def commit_group(self, group: GroupCommit) -> int:
        self._check_changeable()
        commit = asyncio.ensure_future(asyncio.to_thread(self._commit_group, group))
        try:
            return await asyncio.shield(commit)
        except asyncio.CancelledError:  # the thread goes on: what it leaves is rolled back at the next opening
            self._break(group, "the apply was cancelled while its thread was writing")
            commit.add_done_callback(lambda done: done.cancelled() or done.exception())  # logged by _break
            raise

    def _commit_group(self, group: GroupCommit) -> int:
        self._ensure_size(group.state.disk_size)
        entry = group.encode_entry(self._read_images(group.ranges))
        try:  # the entry may be stored even if this fails (its directory's sync)
            self._put_entry(group.entry_name, entry)
            self._write_ranges(group.writes)
            self._flush()
            self._save_state(group.state)
        except Exception as exc:
            self._break(group, str(exc))
            raise VolumeBroken(errno.EIO, self._broken) from exc
        return len(entry)

    def _break(self, group: GroupCommit, reason: str) -> None:
        self._broken = (f"seed disk {self.disk!r}: the apply group up to sequence {group.state.applied_seq} was "
                        f"interrupted once its undo entry may have been stored ({reason}); no more changes "
                        "until the volume is opened again, which rolls the group back from its undo entry")
        log.error("%s", self._broken)

    def _check_changeable(self) -> None:
        if self._broken is not None:
            raise VolumeBroken(errno.EIO, self._broken)

    async def list_entries(self) -> list[str]:
        return await asyncio.to_thread(self._journal.names)

    async def get_entry(self, name: str) -> bytes:
        return await asyncio.to_thread(self._journal.read, name)

    async def delete_entry(self, name: str) -> None:
        self._check_changeable()
        await asyncio.to_thread(self._journal.delete, name)

    async def copy_image_to(self, path: Path, progress: Progress | None = None) -> int:
        return await asyncio.to_thread(sparse_copy, self._fd, path, progress)

    async def close(self) -> None:
        self._state.close()
        self._journal.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sparse_copy(src_fd: int, path: Path, progress: Progress | None = None) -> int:
    """Copy only the data extents of ``src_fd`` (SEEK_DATA/SEEK_HOLE); the copy stays sparse."""
    size = os.fstat(src_fd).st_size
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(dst, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src_fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    break
                raise
            end = os.lseek(src_fd, start, os.SEEK_HOLE)
            while start < end:
                chunk = os.pread(src_fd, min(COPY_CHUNK, end - start), start)
                if not chunk:
                    break
                if chunk.count(0) != len(chunk):  # all-zero data extents stay holes in the copy
                    os.pwrite(dst, chunk, start)
                start += len(chunk)
                if progress:
                    progress(start, size)
            offset = end
        os.fsync(dst)
    finally:
        os.close(dst)
    if progress:
        progress(size, size)
    return size
