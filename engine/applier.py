"""The applier: folds log blobs from the cache store into seed disks, in order, once.

Per disk it takes blobs in sequence order, authenticates and opens them (a
worker thread: AES-GCM and lz4 release the GIL), checks every record against the
disk before writing any, writes the records newer than the disk's applied
sequence, fsyncs, records the new applied sequence, and only then deletes the
blob. A crash between the writes and the record re-applies the same blob from
the same starting state on restart, which yields the same bytes, so the seed
disk is always exactly the state after its applied sequence.

A blob that fails verification stops its disk (nothing after it can be applied
without it) and is reported with disk, blob and reason; it is never applied and
never deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from engine.keys import KeyRing
from engine.seed import SeedDisk
from engine.store import CacheStore
from engine.store.base import StoreError
from protocol import LogBlobError
from protocol.logblob import WriteRecord, iter_records, open_blob, parse_blob_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyFailure:
    disk: str
    blob: str
    reason: str


class Applier:
    def __init__(self, store: CacheStore, keys: KeyRing, seed_dir: Path, *, poll_s: float = 0.2,
                 fsync: bool = True, threads: int = 2) -> None:
        self.store = store
        self.keys = keys
        self.seed_dir = seed_dir
        self.poll_s = poll_s
        self.fsync = fsync
        self.failures: dict[str, ApplyFailure] = {}
        self.seeds: dict[str, SeedDisk] = {}
        self.applied_listeners: list[Callable[[str, int], None]] = []
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="apply")
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()  # one pass at a time: a disk is never applied by two tasks
        self._stopping = False
        seed_dir.mkdir(parents=True, exist_ok=True)

    def notify(self) -> None:
        """New blobs were stored: look now instead of at the next poll."""
        self._wake.set()

    def applied_seq(self, disk: str) -> int:
        seed = self.seeds.get(disk)
        if seed is not None:
            return seed.state.applied_seq
        state = SeedDisk.load_state(self.seed_dir, disk)
        return state.applied_seq if state else 0

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.apply_available()
            except StoreError as exc:
                log.warning("applier: cache store unavailable (%s); retrying", exc)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    async def apply_available(self) -> int:
        """Apply every blob that is next in line for its disk; returns how many were applied."""
        async with self._pass_lock:
            return await self._apply_pass()

    async def _apply_pass(self) -> int:
        by_disk: dict[str, list[tuple[int, int, str]]] = {}
        for name in await self.store.list_blobs():
            parsed = parse_blob_name(name)
            if parsed is not None:
                disk, first, last = parsed
                by_disk.setdefault(disk, []).append((first, last, name))
        counts = await asyncio.gather(*(self._apply_disk(disk, sorted(blobs)) for disk, blobs in by_disk.items()))
        return sum(counts)

    async def _apply_disk(self, disk: str, blobs: list[tuple[int, int, str]]) -> int:
        applied = 0
        if disk in self.failures:
            return 0
        loop = asyncio.get_running_loop()
        for first, last, name in blobs:
            current = self.applied_seq(disk)
            if last <= current:  # applied before a crash took away the chance to delete it
                await self.store.delete(name)
                continue
            if first > current + 1:  # an earlier blob is still being uploaded
                break
            data = await self.store.get(name)
            try:
                seq = await loop.run_in_executor(self._executor, self._apply_blob, disk, name, data)
            except LogBlobError as exc:
                self.failures[disk] = ApplyFailure(disk, name, exc.reason)
                log.error("applier: disk %r blob %s not applied: %s; the disk is stopped until this is resolved",
                          disk, name, exc.reason)
                break
            await self.store.delete(name)
            applied += 1
            for listener in self.applied_listeners:
                listener(disk, seq)
        return applied

    def _seed(self, disk: str, size: int) -> SeedDisk:
        seed = self.seeds.get(disk)
        if seed is None:
            seed = self.seeds[disk] = SeedDisk(self.seed_dir, disk, size, fsync=self.fsync)
        return seed

    def _apply_blob(self, disk: str, name: str, data: bytes) -> int:
        """Worker thread: verify, then apply. Raises LogBlobError before writing anything."""
        header, plain = open_blob(data, self.keys.lookup, name=name)
        if header.disk != disk:
            raise LogBlobError(f"blob names disk {header.disk!r} in its header", disk=disk, name=name)
        records = list(iter_records(plain, header, name=name))
        for record in records:
            if isinstance(record, WriteRecord) and record.offset + len(record.data) > header.disk_size:
                raise LogBlobError(f"record {record.seq} writes beyond the disk size {header.disk_size}",
                                   disk=disk, name=name)
        seed = self._seed(disk, header.disk_size)
        seed.ensure_size(header.disk_size)
        start = seed.state.applied_seq
        written = 0
        for record in records:
            if record.seq > start and isinstance(record, WriteRecord):
                seed.pwrite(record.offset, record.data)
                written += len(record.data)
        seed.commit(header.last_seq, header.last_source_us, written)
        return header.last_seq

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._executor.shutdown(wait=True)
        for seed in self.seeds.values():
            seed.close()
