"""The applier: folds log blobs into seed disks, in order, exactly once, keeping recovery points.

Per disk, blobs are taken in sequence order and grouped (at most one group per
``crash_point_interval_ms`` unless a backlog needs more; a group ends at an
application-consistent tag and at ``group_max_bytes``). For each group:

1. open and verify every blob (worker thread; AES-GCM and lz4 release the GIL) —
   a blob that fails stops its disk and is reported, never applied;
2. read the *before-images* of every range the group writes and store them as one
   undo entry (durably) — that entry is the recovery point before the group;
3. write the records newer than the disk's applied sequence, flush;
4. record the new applied sequence (durably), then delete the applied blobs.

A crash between 2 and 4 leaves an undo entry newer than the recorded state; on
restart that entry is rolled back first (its before-images restore the exact
pre-group state, however many writes had landed), then the group is applied
again. So the seed disk, the journal and the list of points always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.config import PolicyConfig
from engine.keys import KeyRing
from engine.recovery.points import Point, PointNotFound, points_of, prune_horizon
from engine.recovery.volume import GroupCommit, SeedState, SeedVolume, VolumeBroken
from engine.store import CacheStore
from engine.store.base import StoreError
from engine.threads import named_pool
from protocol import LogBlobError, TagKind
from protocol.journal import EntryName, EntryTag, UndoEntry, merge_ranges
from protocol.logblob import (
    BlobHeader,
    TagRecord,
    WriteRecord,
    check_named,
    iter_records,
    open_blob,
    parse_blob_name,
)

log = logging.getLogger(__name__)

VolumeFactory = Callable[[str], SeedVolume]
PolicyLookup = Callable[[str], PolicyConfig]


class ApplierLocked(RuntimeError):
    """Another applier owns this seed directory (or another server this data directory): two would corrupt it."""


@dataclass(frozen=True)
class ApplyFailure:
    disk: str
    blob: str
    reason: str


@dataclass
class _Opened:
    name: str
    header: BlobHeader
    records: list[WriteRecord | TagRecord]


@dataclass
class DiskState:
    """What the applier holds in memory for one disk."""

    volume: SeedVolume
    state: SeedState
    entries: list[EntryName]
    last_group: float = 0.0  # monotonic time of the last apply group
    pins: Counter[int] = field(default_factory=Counter)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one apply or rollback at a time per disk
    unpinned: asyncio.Event = field(default_factory=asyncio.Event)  # set while no failover reads the volume
    committing: bool = False  # a failover commit is deleting the undo entries: nothing may pin a point

    def __post_init__(self) -> None:
        self.unpinned.set()

    @contextlib.contextmanager
    def pinned(self, seq: int) -> Iterator[None]:
        """A failover reading point ``seq``: pruning keeps the entries it rolls back through, and the volume is
        not closed under its copy (see ``Applier._reopen``). Refused once a commit began releasing the points;
        a commit in turn refuses while a point is pinned (engine/recovery/failover.py)."""
        if self.committing or self.state.committed_failover:
            raise PointNotFound(f"disk {self.state.disk!r} was failed over and committed; its points were released")
        self.pins[seq] += 1
        self.unpinned.clear()
        try:
            yield
        finally:
            self.pins[seq] -= 1
            if not self.pins[seq]:
                del self.pins[seq]
            if not self.pins:
                self.unpinned.set()


class Applier:
    def __init__(self, store: CacheStore, keys: KeyRing, volumes: VolumeFactory, policy_for: PolicyLookup, *,
                 poll_s: float = 0.2, group_max_bytes: int = 8 * 1024 * 1024, prune_interval_s: float = 30.0,
                 threads: int = 2) -> None:
        self.store = store
        self.keys = keys
        self.volumes = volumes
        self.policy_for = policy_for
        self.poll_s = poll_s
        self.group_max_bytes = group_max_bytes
        self.prune_interval_s = prune_interval_s
        self.failures: dict[str, ApplyFailure] = {}
        self.disks: dict[str, DiskState] = {}
        self.applied_listeners: list[Callable[[str, int], None]] = []
        self.failure_listeners: list[Callable[[ApplyFailure], None]] = []
        self.committed_listeners: list[Callable[[str], None]] = []  # a failover of this disk was committed
        self.stats = ApplierStats()
        self.first_seen: dict[str, dict[str, int]] = {}  # disk → pending blob → when this applier first saw it
        self._executor = named_pool(threads, "apply")
        # journal chunks are compressed here, not in _executor, whose thread waits for them
        self._compressor = named_pool(os.cpu_count() or 2, "journal-lz4")
        self._wake = asyncio.Event()
        self._pass_lock = asyncio.Lock()  # one pass at a time: a disk is never applied by two tasks
        self._slots = asyncio.Semaphore(APPLY_SLOTS)
        self._opening: dict[str, asyncio.Lock] = {}
        self._stopping = False
        self._next_due = float("inf")  # monotonic time the earliest disk held back by its point interval is due

    # ------------------------------------------------------------ state

    def notify(self) -> None:
        """New blobs were stored: look now instead of at the next poll."""
        self._wake.set()

    def applied_seq(self, disk: str) -> int:
        d = self.disks.get(disk)
        return d.state.applied_seq if d else 0

    def points(self, disk: str) -> list[Point]:
        d = self.disks.get(disk)
        return points_of(disk, d.entries) if d else []

    async def disk(self, name: str, size: int = 0) -> DiskState:
        """The disk's in-memory state, opening its volume (and recovering it) on first use.

        Opening awaits the volume; the lock makes a second caller (a pass and a failover at
        once) wait for the first instead of building a second, stale state for the same disk.
        """
        d = self.disks.get(name)
        if d is not None:
            return d
        async with self._opening.setdefault(name, asyncio.Lock()):
            return await self._open_disk(name, size)

    @contextlib.asynccontextmanager
    async def locked(self, name: str) -> AsyncIterator[DiskState]:
        """The disk's state under its lock, and the current one: the apply pass that held the lock may have
        opened a broken volume again meanwhile, which replaces the state looked up before waiting."""
        while True:
            d = await self.disk(name)
            async with d.lock:
                if self.disks.get(name) is d:
                    yield d
                    return

    async def _open_disk(self, name: str, size: int) -> DiskState:
        d = self.disks.get(name)
        if d is None:
            volume = self.volumes(name)
            state = await volume.load_state() or SeedState(name, size)
            entries = sorted((e for n in await volume.list_entries() if (e := EntryName.parse(n))),
                             key=lambda e: e.seq_to)
            d = DiskState(volume, state, entries)
            await self._roll_back_uncommitted(d)
            await self._drop_unchained(d)
            self.disks[name] = d
        return d

    async def open_existing(self) -> None:
        """Open every disk the volumes already know (so points and state are listed before new blobs arrive)."""
        for name in await self.known_disks():
            await self.disk(name)

    async def known_disks(self) -> list[str]:
        lister = getattr(self.volumes, "list_disks", None)
        return list(await lister()) if lister else []

    async def _roll_back_uncommitted(self, d: DiskState) -> None:
        uncommitted = [e for e in d.entries if e.seq_to > d.state.applied_seq]
        if not uncommitted:
            return
        await d.volume.ensure_size(d.state.disk_size)
        for name in sorted(uncommitted, key=lambda e: e.seq_to, reverse=True):
            entry = UndoEntry.decode(await d.volume.get_entry(str(name)), name)
            await d.volume.write_ranges(list(zip((o for o, _ in entry.ranges), entry.before)))
            await d.volume.flush()
            await d.volume.delete_entry(str(name))
            log.warning("applier: disk %r: rolled back an apply group that a crash or a failed write interrupted "
                        "(sequences %d-%d)", d.state.disk, name.seq_from + 1, name.seq_to)
        d.entries = [e for e in d.entries if e.seq_to <= d.state.applied_seq]

    async def _drop_unchained(self, d: DiskState) -> None:
        """Entries that do not chain down from the applied sequence, each ``seq_from`` the next one's ``seq_to``,
        cannot take the seed back to their points: an entry between them is damaged or lost (a journal segment
        with bad bytes, prune marks a power loss kept only some of). A failover through the gap would hand out
        a wrong image, so they are deleted, and said."""
        ending_at: dict[int, EntryName] = {}
        for entry in d.entries:
            ending_at.setdefault(entry.seq_to, entry)
        chained: set[EntryName] = set()
        expected = d.state.applied_seq
        while (entry := ending_at.get(expected)) is not None and entry not in chained:
            chained.add(entry)
            expected = entry.seq_from
        unchained = [e for e in d.entries if e not in chained]
        if not unchained:
            return
        log.error("applier: disk %r: %d recovery point(s) from sequence %d to %d no longer chain to the seed (an "
                  "undo entry between them and sequence %d is damaged or lost); dropped, as they could not be "
                  "materialised exactly", d.state.disk, len(unchained), min(e.seq_from for e in unchained),
                  max(e.seq_to for e in unchained), d.state.applied_seq)
        for entry in unchained:
            await d.volume.delete_entry(str(entry))
        d.entries = [e for e in d.entries if e in chained]

    # ------------------------------------------------------------ running

    async def run(self) -> None:
        last_prune = 0.0
        while not self._stopping:
            self._wake.clear()
            self._next_due = float("inf")
            try:
                await self.apply_available()
                if time.monotonic() - last_prune >= self.prune_interval_s:
                    await self.prune()
                    last_prune = time.monotonic()
            except StoreError as exc:
                log.warning("applier: cache store unavailable (%s); retrying", exc)
            # a disk held back by its point interval is due before the next poll: no wake-up will say so
            wait_s = min(self.poll_s, max(0.0, self._next_due - time.monotonic()))
            try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation (gh-86296)
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def pending(self) -> dict[str, list[tuple[int, int, str]]]:
        """Blobs in the cache store, per disk, in sequence order."""
        by_disk: dict[str, list[tuple[int, int, str]]] = {}
        for name in await self.store.list_blobs():
            parsed = parse_blob_name(name)
            if parsed is not None:
                disk, first, last = parsed
                by_disk.setdefault(disk, []).append((first, last, name))
        now_us = time.time_ns() // 1000
        seen = {disk: self.first_seen.get(disk, {}) for disk in by_disk}
        self.first_seen = {disk: {name: seen[disk].get(name, now_us) for _, _, name in blobs}
                           for disk, blobs in by_disk.items()}
        return {disk: sorted(blobs) for disk, blobs in by_disk.items()}

    def oldest_pending_us(self, disk: str) -> int | None:
        """When the oldest blob of ``disk`` still waiting to be applied was first seen (None: none waits)."""
        return min(self.first_seen.get(disk, {}).values(), default=None)

    async def apply_available(self, *, force: bool = False, only: str | None = None) -> int:
        """Apply what is next in line; ``force`` ignores the point interval (used by "latest" failover)."""
        async with self._pass_lock:
            pending = await self.pending()
            if only is not None:
                pending = {only: pending.get(only, [])}
            # every disk's apply finishes before the pass ends, even when one fails: close() waits for the
            # pass, then shuts down the pools and the volumes these applies may still be using
            disks = [disk for disk, blobs in pending.items() if blobs]
            results = await asyncio.gather(*(self._apply_disk_slot(disk, pending[disk], force) for disk in disks),
                                           return_exceptions=True)
            errors = [(disk, r) for disk, r in zip(disks, results) if isinstance(r, BaseException)]
            if errors:  # the one that ends the applier first; a store that is down only waits for the next pass
                errors.sort(key=lambda error: isinstance(error[1], StoreError))
                for disk, error in errors[1:]:
                    log.error("applier: disk %r: %s: %s", disk, type(error).__name__, error)
                raise errors[0][1]
            return sum(results)  # type: ignore[arg-type]

    async def catch_up(self, disk: str) -> int:
        """Apply every blob of ``disk`` already in the cache store; returns the applied sequence.

        The target is fixed when asked: applying "until nothing is new" would never end while the
        agent uploads faster than a pass applies.
        """
        target = max((last for _, last, _ in (await self.pending()).get(disk, [])), default=0)
        while self.applied_seq(disk) < target and await self.apply_available(force=True, only=disk):
            pass
        return self.applied_seq(disk)

    async def _apply_disk_slot(self, disk: str, blobs: list[tuple[int, int, str]], force: bool) -> int:
        """Memory is bounded: at most APPLY_SLOTS disks hold an apply group (and its prefetch) at once."""
        async with self._slots:
            return await self._apply_disk(disk, blobs, force)

    async def _apply_disk(self, disk: str, blobs: list[tuple[int, int, str]], force: bool) -> int:
        if disk in self.failures:
            return 0
        d = await self.disk(disk)
        if d.state.committed_failover:  # replication of a committed disk has stopped
            await self._delete(disk, [name for _, _, name in blobs])
            return 0
        interval = self.policy_for(disk).crash_point_interval_ms / 1000
        if not force and time.monotonic() - d.last_group < interval:
            self._next_due = min(self._next_due, d.last_group + interval)
            return 0
        applied = 0
        prefetch = _Prefetch(self)
        async with d.lock:
            try:
                queue = list(blobs)
                while queue:
                    current = d.state.applied_seq
                    # applied before a crash took away the chance to delete them
                    await self._delete(disk, [name for _, last, name in queue if last <= current])
                    queue = [b for b in queue if b[1] > current]
                    if not queue or queue[0][0] > current + 1:  # nothing, or an earlier blob is still uploading
                        break
                    group, failure = await self._open_group(queue, current, prefetch)
                    if group:  # the verified prefix is applied even if a later blob is bad
                        try:
                            await self._apply_group(d, group)
                        except VolumeBroken:  # said why when it broke
                            await self._reopen(disk, d)
                            break  # the group again at the next pass, from the rolled-back disk
                        await self._delete(disk, [blob.name for blob in group])
                        applied += len(group)
                    if failure is not None:
                        self.failures[disk] = ApplyFailure(disk, failure.name or "?", failure.reason)
                        for listener in self.failure_listeners:
                            listener(self.failures[disk])
                        self.stats.failed_blobs += 1
                        log.error("applier: disk %r blob %s not applied: %s; the disk is stopped until this is "
                                  "resolved", disk, failure.name, failure.reason)
                        break
                    queue = queue[len(group):]
            finally:
                prefetch.cancel()
            d.last_group = time.monotonic()
        return applied

    async def _reopen(self, disk: str, d: DiskState) -> None:
        """Open a volume that refuses changes again: opening rolls back the group it was left in the middle
        of (as at a start), so this process goes on without a restart. If the roll-back fails too, that
        error ends the applier (its process is restarted).

        A failover copying the disk is let finish first. Its copy may hold the broken group's writes, which
        the group's undo entry repairs only while the entry exists; the roll-back deletes it (and closing
        the volume would close the file the copy reads)."""
        while d.pins:  # a failover may pin again between the event and this task's turn
            log.warning("applier: disk %r: waiting for %d failover(s) copying it before opening it again", disk,
                        d.pins.total())
            await d.unpinned.wait()
        self.disks.pop(disk, None)
        await d.volume.close()
        reopened = await self.disk(disk)
        log.warning("applier: disk %r: opened again at sequence %d", disk, reopened.state.applied_seq)

    async def _delete(self, disk: str, names: list[str]) -> None:
        pending = self.first_seen.get(disk, {})
        for name in names:
            pending.pop(name, None)
        await asyncio.gather(*(self.store.delete(name) for name in names))

    async def _open_group(self, queue: list[tuple[int, int, str]], current: int,
                          prefetch: _Prefetch) -> tuple[list[_Opened], LogBlobError | None]:
        """The next group of verified blobs, and the error of the blob that ended it early, if any."""
        group: list[_Opened] = []
        size = 0
        expected = current + 1
        for index, (first, last, name) in enumerate(queue):
            if first > expected:
                break
            prefetch.ahead(queue[index:index + PREFETCH_BLOBS])
            try:
                opened = await prefetch.take(name)
            except StoreError:
                if not group:
                    raise
                return group, None  # apply what is verified; the rest on the next pass
            except LogBlobError as exc:
                return group, exc
            group.append(opened)
            size += opened.header.raw_size
            expected = max(expected, last + 1)  # a blob inside the previous one (see _apply_group)
            ends_with_app = isinstance(opened.records[-1], TagRecord) and opened.records[-1].kind is TagKind.APP
            if ends_with_app or size >= self.group_max_bytes:
                break
        return group, None

    async def _fetch_and_open(self, name: str) -> _Opened:
        data = await self.store.get(name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._open_blob, name, data)

    def _open_blob(self, name: str, data: bytes) -> _Opened:
        """Worker thread: authenticate and check a blob completely before anything is written."""
        header, plain = open_blob(data, self.keys.lookup, name=name)
        check_named(header, name)  # renamed in the store?
        records = list(iter_records(plain, header, name=name))
        for record in records:
            if isinstance(record, WriteRecord) and record.offset + len(record.data) > header.disk_size:
                raise LogBlobError(f"record {record.seq} writes beyond the disk size {header.disk_size}",
                                   disk=header.disk, name=name)
        return _Opened(name, header, records)

    async def _apply_group(self, d: DiskState, group: list[_Opened]) -> None:
        current = d.state.applied_seq
        writes: list[tuple[int, memoryview]] = []
        tags: list[EntryTag] = []
        # Blobs may overlap: after a power loss took a spooled blob's name but not the copy the store
        # already held, the log is replayed into batches cut anew. Each sequence counts once.
        last_seq = current
        for blob in group:
            for record in blob.records:
                if record.seq <= last_seq:
                    continue
                last_seq = record.seq
                if isinstance(record, WriteRecord):
                    writes.append((record.offset, record.data))
                else:
                    tags.append(EntryTag(record.seq, record.kind, record.tag_id))
        ends_with_tag = bool(tags) and tags[-1].seq == last_seq
        name = EntryName(current, last_seq, ends_with_tag and tags[-1].kind is TagKind.APP,
                         max(b.header.last_source_us for b in group), time.time_ns() // 1000,
                         tags[-1].tag_id if ends_with_tag else "")
        disk_size = max(*(b.header.disk_size for b in group), d.state.disk_size)
        ranges = merge_ranges([(offset, len(data)) for offset, data in writes])
        written = sum(len(data) for _, data in writes)
        state = replace(d.state, disk_size=disk_size, applied_seq=last_seq,
                        last_source_us=max(d.state.last_source_us, name.source_us),
                        applied_bytes=d.state.applied_bytes + written)
        entry_size = await d.volume.commit_group(GroupCommit(  # 2.–4.
            str(name), ranges, lambda images: UndoEntry(name, ranges, images, tags).encode(self._compress_map),
            writes, state))
        d.entries.append(name)
        d.state = state
        self.stats.applied_bytes += written
        self.stats.journal_bytes += entry_size
        self.stats.groups += 1
        for listener in self.applied_listeners:
            listener(d.state.disk, d.state.applied_seq)

    def _compress_map(self, compress: Callable[[memoryview], bytes], chunks: Iterable[memoryview]) -> list[bytes]:
        """An undo entry's chunks compressed on every core; a single chunk (a small group: most of them at
        many disks) on the calling thread, without a hand-over to another."""
        chunks = list(chunks)
        return [compress(c) for c in chunks] if len(chunks) <= 1 else list(self._compressor.map(compress, chunks))

    # ------------------------------------------------------------ retention

    async def prune(self, now_us: int | None = None) -> int:
        """Drop undo entries no retained point needs, oldest first (a crash mid-way leaves a valid journal)."""
        now_us = now_us if now_us is not None else time.time_ns() // 1000
        removed = 0
        for disk, d in list(self.disks.items()):
            retention_us = int(self.policy_for(disk).retention_hours * 3600e6)
            horizon = prune_horizon(d.entries, now_us=now_us, retention_us=retention_us,
                                    pinned=list(d.pins), applied_seq=d.state.applied_seq)
            for name in [e for e in d.entries if e.seq_to < horizon]:
                await d.volume.delete_entry(str(name))
                d.entries.remove(name)
                removed += 1
        self.stats.pruned_entries += removed
        return removed

    def stop(self) -> None:
        """Ask ``run`` to return after the current pass."""
        self._stopping = True
        self._wake.set()

    async def close(self) -> None:
        self.stop()
        async with self._pass_lock:
            pass
        self._executor.shutdown(wait=True)
        self._compressor.shutdown(wait=True)
        for d in self.disks.values():
            await d.volume.close()
        close_volumes = getattr(self.volumes, "close", None)  # e.g. releases an Azure lease
        if close_volumes is not None:
            await close_volumes()


PREFETCH_BLOBS = 4  # blobs fetched and opened ahead of the one being applied
APPLY_SLOTS = 2  # disks applied concurrently (enough to keep two cores busy, bounded memory)


class _Prefetch:
    """Fetches and opens the next few blobs of a disk while the current group is written."""

    def __init__(self, applier: Applier) -> None:
        self.applier = applier
        self.tasks: dict[str, asyncio.Task[_Opened]] = {}

    def ahead(self, blobs: list[tuple[int, int, str]]) -> None:
        for _, _, name in blobs:
            if name not in self.tasks:
                self.tasks[name] = asyncio.ensure_future(self.applier._fetch_and_open(name))

    async def take(self, name: str) -> _Opened:
        return await self.tasks.pop(name)

    def cancel(self) -> None:
        for task in self.tasks.values():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception never retrieved"
        self.tasks.clear()


@dataclass
class ApplierStats:
    applied_bytes: int = 0
    journal_bytes: int = 0
    groups: int = 0
    pruned_entries: int = 0
    failed_blobs: int = 0


class ApplierLock:
    """An exclusive lock on a seed directory (flock), held for the life of an applier."""

    FILE = ".applier.lock"
    HOLDER = "applier"

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.FILE
        self._fd: int | None = None

    def acquire(self, info: str = "") -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ApplierLocked(f"another {self.HOLDER} is running on {self.path.parent} ({holder or 'unknown'})") \
                from None
        self._fd = fd
        self.advertise(info or f"pid {os.getpid()}")

    def advertise(self, info: str) -> None:
        """Tell other processes how to reach this applier (e.g. its admin URL)."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode(), 0)

    def holder(self) -> str | None:
        """What the running applier wrote into the lock (e.g. its admin URL), or None if none runs."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ServerLock(ApplierLock):
    """An exclusive lock on a server's data directory: two servers on one spool and log would corrupt both,
    and a disk reset (engine/recovery/reset.py) must not run beside one."""

    FILE = ".serve.lock"
    HOLDER = "process server"
