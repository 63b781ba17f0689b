"""The process server's data path, without sockets: log → batch → seal → spool → upload.

Every accepted write goes two ways. It is appended to the spool's write-ahead log (engine/wal.py),
all disks' writes since the previous commit in one chunk and one fdatasync (group commit), and is
acknowledged once that commit is durable: an ack waits for neither lz4 nor a file of its own. And it
joins its disk's batch, modelled on aiokafka's message accumulator: a batch is cut at
``batch.max_bytes``, after ``batch.linger_ms`` (deferred while the disk's previous seal is in flight)
or at a tag; sealing (lz4 then AES-256-GCM) runs on a pool sized to the cores, spool writes on their own
pool; uploads leave in groups. What is in the cache store lets the log go. Under memory pressure (many
disks lingering), open batches drop from memory what a durable commit put in the log, and the seal reads
it back.

Memory is bounded by ``pipeline.max_inflight_bytes`` (bytes not yet logged, or being sealed) and the
spool (log and sealed blobs) by ``spool.max_bytes``: when either is reached the pipeline asks its flow
listeners (agent connections) to stop reading until it has drained below three quarters of the limit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from prometheus_client import Histogram

from engine.buffers import ThreadBuffer
from engine.config import Config
from engine.disks import DiskInfo
from engine.nonces import RandomNonces
from engine.spool import Spool, SpooledBlob, UploadWatermarks
from engine.store import CacheStore
from engine.store.base import StoreError, UntrustedBlobFiles
from engine.threads import named_pool
from engine.wal import SEGMENT_BYTES, ChunkPlace, GroupCommitter, Logged, LogRange, WriteAheadLog
from protocol import SECTOR_SIZE, ErrorCode, LogBlobError, RemoteProtocolError, Tag, Write
from protocol.logblob import (
    BlobHeader,
    KeyLookup,
    Sealer,
    WriteRecord,
    blob_name,
    iter_records,
    parse_blob_name,
    tag_record,
    write_record_header,
)
from protocol.wal import WalSealer, WalSection, check_read_back, headers_crc

log = logging.getLogger(__name__)


UPLOAD_GROUP = 64  # blobs one upload worker takes from the queue at once, uploaded concurrently
# ... into a store that stores a group in one call (the local store: its syncs run side by side, and at
# 1000 disks 64 blobs a round kept it at 76-79 MB/s of the 175-185 acknowledged, 512 kept up)
GROUPED_UPLOAD_GROUP = 512
SPOOL_IO_THREADS = 16  # spool writes in flight at once
WATERMARK_SAVE_INTERVAL_S = 0.1  # upload watermarks are saved at most this often
# A batch opened while the pipeline holds at least this share of pipeline.max_inflight_bytes leaves what
# the log holds to the log. Below it, reading back is not worth its cost: at 10 agents and 150 MB/s it
# took serve from 6.4-6.9 to 7.5-7.6 CPU s/GB and the ack p99 from 23-31 to 36 ms (docs/benchmarks.md).
LOG_BACKED_SHARE = 0.25
READ_BACK_ATTEMPTS = 3  # reads of logged records that do not match what was logged before their disk stops


async def put_files(store: CacheStore, items: list[tuple[str, Path]]) -> list[tuple[tuple[str, Path], Exception]]:
    """Store several blobs — in one call where the store can group them, else concurrently — and
    return the ones that failed, so a retry repeats only those (a group must not livelock on a
    store that fails a fraction of all requests)."""
    grouped = getattr(store, "put_files", None)
    if grouped is not None:
        try:
            await grouped(items)
        except (StoreError, OSError) as exc:
            return [(item, exc) for item in items]
        return []
    results = await asyncio.gather(*(store.put_file(name, path) for name, path in items), return_exceptions=True)
    failed = []
    for item, result in zip(items, results):
        if isinstance(result, (StoreError, OSError)):
            failed.append((item, result))
        elif isinstance(result, BaseException):
            raise result
    return failed


class FlowListener(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


AckListener = Callable[[str, int], None]  # (disk, durable_seq)
Pieces = tuple[bytes | memoryview, ...]  # one record: its header, and its body if it has one


class Record(NamedTuple):
    """A record of an open batch, held in memory until its commit puts it in the log."""

    seq: int
    pieces: Pieces
    size: int  # header and body
    payload: int  # a write's body (0 for a tag)
    checksum: int | None  # the agent's CRC-32 of a write's body: what checks it when it is read back


class LoggedRecords(NamedTuple):
    """Records of a batch that are in the log, read back when the batch is sealed."""

    place: LogRange
    first_seq: int
    checksums: tuple[int | None, ...]  # one per record
    headers_crc: int  # protocol.wal.headers_crc of the records

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.checksums) - 1


@dataclass
class Batch:
    disk: str
    first_seq: int
    logged: list[LoggedRecords] = field(default_factory=list)  # its first records, in the log
    records: deque[Record] = field(default_factory=deque)  # the rest, in memory
    last_seq: int = 0
    payload_bytes: int = 0
    memory_bytes: int = 0  # payload of ``records``: what counts against pipeline.max_inflight_bytes
    overdue: bool = False  # its linger ended below batch.min_bytes: cut once it reaches them
    log_backed: bool = False  # opened under memory pressure: what is logged is read back when sealed
    last_source_us: int = 0
    sealed: bool = False
    uploaded: bool = False
    path: Path | None = None
    size: int = 0
    created_us: int = field(default_factory=lambda: time.time_ns() // 1000)  # server clock: lag, not ordering

    @property
    def name(self) -> str:
        return blob_name(self.disk, self.first_seq, self.last_seq)


class DiskStream:
    """Per-disk state: what was accepted, what is durable (logged), what is still to seal and upload."""

    def __init__(self, info: DiskInfo, durable_seq: int) -> None:
        self.info = info
        self.accepted_seq = durable_seq
        self.durable_seq = durable_seq
        self.uploaded_seq = durable_seq
        self.open_batch: Batch | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.cut_when_sealed = False  # linger expired while a seal was in flight: cut when it completes
        self.sealing: deque[Batch] = deque()
        self.uploading: deque[Batch] = deque()
        self.listeners: dict[object, AckListener] = {}
        self.received_bytes = 0
        self.sealed_bytes = 0
        # With serve's applier process (Pipeline.track_applied): stored batches it has not applied yet,
        # (last_seq, created_us), so this server can tell the whole recoverable lag, and what it reported.
        self.unapplied: deque[tuple[int, int]] = deque()
        self.applied_seq: int | None = None
        self._stored_at_start = durable_seq
        self.apply_failure: str | None = None
        self.log_failure: str | None = None  # a blob of it cannot be made: stopped (Pipeline._stop_disk)
        self.resumed_past = 0  # a start resumed it after store blobs past a lost gap (Pipeline._resume_past_gaps)

    def note_applied(self, seq: int) -> None:
        if seq > (self.applied_seq or 0):
            self.apply_failure = None  # it moves again: whatever stopped it was resolved
        if self.applied_seq is None and seq < self._stored_at_start:
            # stored by an earlier run and not applied yet: when they arrived is not known here, so they
            # count from now (an underestimate, until they are applied)
            self.unapplied.appendleft((self._stored_at_start, time.time_ns() // 1000))
        self.applied_seq = seq
        while self.unapplied and self.unapplied[0][0] <= seq:
            self.unapplied.popleft()

    def oldest_unapplied_us(self) -> int | None:
        """Server-clock arrival of the oldest stored write the applier process has not applied."""
        return self.unapplied[0][1] if self.unapplied else None

    @property
    def seal_in_flight(self) -> bool:
        """A batch of this disk is being sealed or written (not: sealed and waiting for the log)."""
        return any(not batch.sealed for batch in self.sealing)

    def batches(self) -> list[Batch]:
        """Everything accepted but not yet in the cache store, oldest first."""
        open_batch = [self.open_batch] if self.open_batch is not None else []
        return [*self.uploading, *self.sealing, *open_batch]

    def oldest_unstored_us(self) -> int | None:
        """Server-clock time the oldest write not yet in the cache store arrived (None: all stored)."""
        return min((b.created_us for b in self.batches()), default=None)

    def stage_behind(self) -> str | None:
        """Where the oldest unstored write waits: ingest (batching/sealing) or upload."""
        if self.uploading:
            return "upload"
        return "ingest" if self.sealing or self.open_batch is not None else None

    @property
    def backlog_bytes(self) -> int:
        """Bytes on the server not yet in the cache store (payload to seal, sealed in the spool)."""
        return sum(b.size if b.sealed else b.payload_bytes for b in self.batches())

    def check_write(self, write: Write) -> None:
        """Bounds and alignment; raises naming the disk and sequence."""
        size = len(write.data)
        if write.offset % SECTOR_SIZE or size % SECTOR_SIZE:
            raise RemoteProtocolError(
                ErrorCode.BAD_ALIGNMENT,
                f"offset {write.offset} and length {size} must be multiples of {SECTOR_SIZE}",
                disk=self.info.disk, seq=write.seq,
            )
        if write.offset + size > self.info.size:
            raise RemoteProtocolError(
                ErrorCode.OUT_OF_BOUNDS,
                f"write of {size} bytes at offset {write.offset} ends beyond the disk size {self.info.size}",
                disk=self.info.disk, seq=write.seq,
            )

    def check_not_stopped(self, seq: int | None = None) -> None:
        """Refuse the disk's writes (and its opening) once it was stopped (Pipeline._stop_disk)."""
        if self.log_failure is not None:
            raise RemoteProtocolError(ErrorCode.DISK_NOT_ALLOWED, f"replication of this disk stopped: "
                                      f"{self.log_failure}", disk=self.info.disk, seq=seq)

    def check_sequence(self, seq: int) -> bool:
        """True if ``seq`` is the next one; False for a duplicate; raises on a gap, or if the disk was
        stopped."""
        self.check_not_stopped(seq)
        if seq <= self.accepted_seq:
            return False
        if seq != self.accepted_seq + 1:
            raise RemoteProtocolError(
                ErrorCode.SEQUENCE_GAP, f"expected sequence {self.accepted_seq + 1}", disk=self.info.disk, seq=seq
            )
        return True


class Pipeline:
    def __init__(self, config: Config, sealer: Sealer, spool: Spool, store: CacheStore,
                 watermarks: UploadWatermarks, *, keys: KeyLookup) -> None:
        """``keys`` opens what an earlier run logged (possibly under a key since rotated)."""
        self.config = config
        self.sealer = sealer
        self.spool = spool
        self.store = store
        self.watermarks = watermarks
        self.streams: dict[str, DiskStream] = {}
        current_key = keys(sealer.key_id)
        if current_key is None:
            raise ValueError(f"the sealing key (id {sealer.key_id.hex()}) is not in the key ring")
        # segments at most an eighth of the spool: only closed segments can be released
        self.wal = WriteAheadLog(spool.directory / ".wal", WalSealer(current_key), fsync=spool.fsync,
                                 segment_bytes=min(SEGMENT_BYTES, spool.max_bytes // 8))
        self._closed_segments_seen = 0
        self._keys = keys
        self.inflight_bytes = 0
        self.unlogged_bytes = 0
        self.unlogged_records = 0
        self._committer: GroupCommitter | None = None  # from start(), after the log's replay
        self._closing = False
        self.paused = False
        self.flow_listeners: set[FlowListener] = set()
        self.stored_listeners: list[Callable[[], None]] = []
        self.track_applied = False  # keep DiskStream.unapplied (serve sets it when its applier is a child process)
        self.applied_seqs: dict[str, int] = {}  # disk → applied sequence its applier process last reported
        self.stats = PipelineStats()
        self._executor = named_pool(config.seal_threads, "seal")
        self._spare_buffers = 2 * config.seal_threads  # sealed-blob buffers kept for reuse (per blob: no os calls)
        self._spool_executor = named_pool(SPOOL_IO_THREADS, "spool")
        self._buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # sealed-blob buffers to reuse
        self._gathered = ThreadBuffer()  # each seal thread's records of the batch it seals
        self._nonces = RandomNonces()
        self._upload_queue: asyncio.Queue[Batch] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._uploaders: list[asyncio.Task[None]] = []
        # spool blobs a store would not take as they are, to write again first: failed attempts at that
        self._untrusted: dict[Path, int] = {}
        self._watermark_lock = asyncio.Lock()
        self._watermarks_dirty = False
        self._last_watermark_save = 0.0  # monotonic
        self._saved_watermarks = dict(watermarks.seqs)  # what a restart would recover from
        self._max_inflight = int(config.pipeline.max_inflight_bytes)
        self._max_batch = int(config.batch.max_bytes)
        self._linger = config.batch.linger_ms / 1000
        self._min_batch = min(int(config.batch.min_bytes), self._max_batch)
        # how much longer than its linger a batch below min_bytes waits (a linger of 0 means: never wait)
        self._small_batch_wait = max(0.0, config.batch.min_bytes_wait_ms / 1000 - self._linger) if self._linger else 0.0
        self._upload_group = GROUPED_UPLOAD_GROUP if hasattr(store, "put_files") else UPLOAD_GROUP

    # ------------------------------------------------------------ lifecycle

    async def start(self, disks: list[DiskInfo],
                    seed_seqs: Callable[[], Mapping[str, int] | None] = dict) -> None:
        """Recover the spool and resume uploads of what the previous run left: its sealed blobs, then
        what its write-ahead log holds beyond them (acknowledged, never sealed). ``seed_seqs()``: per disk,
        what its seed holds (applied; None: not known); no disk resumes below it, nor below its blobs in the
        cache store (:meth:`_raise_watermarks`), and nothing may apply or delete blobs until this returns."""
        started = time.monotonic()
        removed = await self.store.remove_temporaries()
        if removed:
            log.warning("cache store: removed %d temporary name(s) an earlier run left (a crash mid-copy)", removed)
        past_gaps = await self._raise_watermarks(seed_seqs)
        leftovers = await asyncio.to_thread(self.spool.recover, self._keys)
        if leftovers:  # each one is authenticated whole: with a full spool this is what a start waits for
            log.info("spool: %d blob(s), %.0f MB, checked in %.1f s", len(leftovers),
                     sum(blob.size for blob in leftovers) / 1e6, time.monotonic() - started)
        by_disk: dict[str, list[SpooledBlob]] = {}
        for blob in leftovers:
            by_disk.setdefault(blob.header.disk, []).append(blob)
        known = {info.disk: info for info in disks}
        for disk in set(known) | set(by_disk):
            info = known.get(disk)
            if info is None:  # a spooled disk whose registration was lost: its blob header knows the size
                header = by_disk[disk][0].header
                info = DiskInfo(disk, "", header.disk_size, SECTOR_SIZE)
            watermark = self.watermarks.seqs.get(disk, 0)
            blobs = sorted(by_disk.get(disk, []), key=lambda b: b.header.first_seq)
            stream = self._new_stream(info)
            durable = watermark
            for blob in blobs:
                if blob.header.last_seq <= watermark:  # uploaded, but the crash came before its removal
                    stale = True
                elif blob.header.first_seq <= durable + 1:  # (its start may be in the store: the applier skips it)
                    stale = False
                else:
                    # Spool writes complete in any order, and a torn or lost blob leaves a hole: what follows it
                    # goes too, and the write-ahead log replays it (what it lacks was never acknowledged).
                    log.warning("spool: %s follows a hole at sequence %d; dropped, the write-ahead log replays it",
                                blob.name, durable + 1)
                    stale = True
                if stale:
                    await asyncio.to_thread(blob.path.unlink, True)
                    self.spool.used_bytes -= blob.size
                    continue
                durable = max(durable, blob.header.last_seq)
                batch = Batch(disk, blob.header.first_seq, last_seq=blob.header.last_seq, sealed=True,
                              path=blob.path, size=blob.size, last_source_us=blob.header.last_source_us,
                              created_us=blob.header.created_us)
                stream.uploading.append(batch)
                self._upload_queue.put_nowait(batch)
            stream.accepted_seq = stream.durable_seq = durable
            if blobs:
                log.info("spool: resuming upload of %d blob(s) of disk %r up to sequence %d",
                         len(stream.uploading), disk, durable)
        spooled = {**self.watermarks.seqs, **{disk: stream.accepted_seq for disk, stream in self.streams.items()}}
        sections = await asyncio.to_thread(self.wal.replay, self._keys, spooled)
        self.spool.used_bytes += self.wal.size_bytes
        self._replay(sections, {disk: blobs[-1][1] for disk, blobs in past_gaps.items()})
        await self._resume_past_gaps(past_gaps)
        self._committer = GroupCommitter(self.wal, asyncio.get_running_loop(), self._committed, self._log_failed,
                                         retry_delays=self.config.upload.retry_delays)
        self._uploaders = [asyncio.create_task(self._upload_worker(), name=f"upload-{i}")
                           for i in range(self.config.upload.concurrency)]
        for task in self._uploaders:
            task.add_done_callback(_report_end_of_uploads)

    def stream(self, info: DiskInfo) -> DiskStream:
        stream = self.streams.get(info.disk)
        if stream is None:
            stream = self._new_stream(info)
            self._spawn(self._make_directories(info.disk))
        return stream

    def _new_stream(self, info: DiskInfo) -> DiskStream:
        stream = self.streams[info.disk] = DiskStream(info, self.watermarks.seqs.get(info.disk, 0))
        if info.disk in self.applied_seqs:  # reported before the stream was made (serve starts its applier first)
            stream.note_applied(self.applied_seqs[info.disk])
        return stream

    async def _raise_watermarks(self, seed_seqs: Callable[[], Mapping[str, int] | None]
                                ) -> dict[str, list[tuple[int, int]]]:
        """No disk resumes below what its seed holds, nor below its blobs in the cache store that follow on
        from there: its upload watermark is raised to that, and saved, before the spool and the log resume
        from it. After a crash this is what the watermark's last save missed. After a lost spool or
        watermark file (or one restored from an older copy) it is what this server no longer holds: resumed
        lower, an agent that lost nothing would be told to resync, a resync numbered from there taken by the
        applier for what it holds already, and skipped, and what the log still holds past it dropped as
        following a hole. Returns, per disk, its blobs in the store past a gap, (first, last) in order:
        uploads finish in any order, so the spool or the log may fill the gap (:meth:`_resume_past_gaps`)."""
        try:
            names = await self.store.list_blobs()
        except StoreError as exc:  # not a reason to refuse agents: the spool is there to ride out a store outage
            log.warning("cannot list the cache store as the server starts (%s): a disk whose spool or upload "
                        "watermark was lost resumes after what its seed holds, not its blobs in the store", exc)
            names = []
        seeds = seed_seqs()  # after the listing: an applier run apart deletes a blob only once its seed holds it
        stored: dict[str, list[tuple[int, int]]] = {}
        for name in names:
            if (parsed := parse_blob_name(name)) is not None:
                stored.setdefault(parsed[0], []).append((parsed[1], parsed[2]))
        raised: dict[str, int] = {}
        past_gaps: dict[str, list[tuple[int, int]]] = {}
        for disk in (seeds or {}).keys() | stored.keys():
            blobs = sorted(stored.get(disk, []))
            held = watermark = self.watermarks.seqs.get(disk, 0)
            # a seed not known here (an Azure seed's applier run apart) holds, at the least, what precedes the
            # store's blobs: it deletes none before applying it
            held = max(held, seeds.get(disk, 0) if seeds is not None else (blobs[0][0] - 1 if blobs else 0))
            for at, (first, last) in enumerate(blobs):
                if first > held + 1:
                    past_gaps[disk] = blobs[at:]
                    break
                held = max(held, last)
            if held > watermark:
                raised[disk] = held
                log.info("disk %r: its seed and the cache store hold sequences up to %d, beyond its upload "
                         "watermark (%d): it resumes there or later", disk, held, watermark)
        if raised:
            await self._save_raised(raised)
        return past_gaps

    async def _resume_past_gaps(self, past_gaps: dict[str, list[tuple[int, int]]]) -> None:
        """Blobs in the cache store past a gap that neither the spool nor the log filled: what the gap held is
        lost (a lost spool, after later uploads had finished first). The disk resumes after them all the same,
        so that no new write is numbered over them (the applier would take theirs and skip the new ones); the
        applier waits at the gap, and the disk needs a fresh seed (docs/operations.md). The log's replay at a
        later start takes the same jump (:meth:`_replay`)."""
        raised: dict[str, int] = {}
        for disk, blobs in sorted(past_gaps.items()):
            stream = self.streams.get(disk)
            durable = held = stream.durable_seq if stream is not None else self.watermarks.seqs.get(disk, 0)
            lost = []
            for first, last in blobs:
                if first > held + 1:
                    lost.append(f"{held + 1}-{first - 1}")
                held = max(held, last)
            if held <= durable:
                continue
            if lost:
                log.error("disk %r: sequences %s are in neither the cache store, the spool nor the write-ahead log "
                          "(lost), but the store holds blobs after them up to %d. It resumes after %d, so that no "
                          "new write is numbered over those blobs; its applier waits at the gap: the disk needs a "
                          "fresh seed (docs/operations.md)", disk, ", ".join(lost), held, held)
            if stream is not None:
                stream.accepted_seq = stream.durable_seq = held
                stream.resumed_past = held
                if stream.batches():  # uploaded_seq follows their uploads, then jumps (_advance_uploaded)
                    continue
                stream.uploaded_seq = held
            raised[disk] = held
        if raised:
            await self._save_raised(raised)

    async def _save_raised(self, raised: dict[str, int]) -> None:
        self.watermarks.seqs.update(raised)
        await asyncio.to_thread(self.watermarks.save, dict(self.watermarks.seqs))
        self._saved_watermarks = dict(self.watermarks.seqs)

    async def _make_directories(self, disk: str) -> None:
        """A newly opened disk's spool and cache-store directories, made now rather than by its first blob.

        On a file system slow to allocate inodes (ext4 without a journal: docs/benchmarks.md) a directory
        costs a millisecond or more, and with 1000 disks opening at once their first blobs came late, under
        load, and took that time from the spool threads and the uploads. A failure here is only logged: the
        first blob's write makes the directory again and reports what stops it."""
        try:
            await asyncio.to_thread(self.spool.make_directory, disk)
            await self.store.make_directory(disk)
        except Exception as exc:  # noqa: BLE001 - a spawned task: whatever it is, say so now, not at GC
            log.warning("disk %r: cannot prepare its directories yet: %s", disk, exc)

    def _replay(self, sections: list[WalSection], jumps: dict[str, int]) -> None:
        """Batch again what the log holds beyond the spooled blobs: acknowledged before the restart, so
        durable now, and sealed and uploaded like anything else (its log segments stay until then).
        ``jumps``: per disk, the last sequence of its store blobs past a lost gap, after which an earlier
        start may have resumed it (:meth:`_resume_past_gaps`): the log may continue there."""
        replayed: Counter[str] = Counter()
        broken: set[str] = set()  # disks whose log has a hole: nothing after it counts
        for section in sections:
            if section.disk in broken:
                continue
            stream = self.streams.get(section.disk)
            if stream is None:  # a logged disk whose registration was lost: the log knows its size
                stream = self._new_stream(DiskInfo(section.disk, "", section.disk_size, SECTOR_SIZE))
            for record in iter_records(section.records, section.blob_header(), name="(write-ahead log)"):
                if record.seq <= stream.accepted_seq:
                    continue
                if record.seq == jumps.get(section.disk, -1) + 1 > stream.accepted_seq + 1:
                    # an earlier start resumed the disk after store blobs past a lost gap (_resume_past_gaps)
                    stream.accepted_seq = record.seq - 1
                if record.seq != stream.accepted_seq + 1:  # chunks are appended in order: only damage does this
                    log.error("write-ahead log: disk %r continues at sequence %d after %d; the rest of its log "
                              "is dropped, and its agent, told to resume after %d, stops if it was acknowledged "
                              "past that", section.disk, record.seq, stream.accepted_seq, stream.accepted_seq)
                    broken.add(section.disk)
                    break
                if isinstance(record, WriteRecord):
                    size = len(record.data)
                    self._append(stream, record.seq, record.timestamp_us,
                                 (write_record_header(record.seq, record.timestamp_us, record.offset, size),
                                  record.data), size, None)
                else:
                    self._append(stream, record.seq, record.timestamp_us,
                                 (tag_record(record.seq, record.timestamp_us, record.kind, record.tag_id),), 0,
                                 None, ends_batch=True)
                replayed[section.disk] += 1
            stream.durable_seq = stream.accepted_seq
        for disk, count in sorted(replayed.items()):
            log.info("write-ahead log: %d acknowledged record(s) of disk %r replayed up to sequence %d",
                     count, disk, self.streams[disk].durable_seq)

    async def drain(self) -> None:
        """Cut every open batch and wait until everything accepted is logged, sealed and uploaded (but
        for disks stopped on a log that cannot be read back: what they hold never will be)."""
        for stream in self.streams.values():
            self._cut(stream)
        while self.unlogged_records or any((s.sealing or s.uploading) and s.log_failure is None
                                           for s in self.streams.values()):
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop without draining: whatever is not sealed or stored yet is in the log, for the next start."""
        self._closing = True
        for stream in self.streams.values():
            if stream.linger is not None:
                stream.linger.cancel()
                stream.linger = None
        for task in [*self._uploaders, *self._tasks]:  # a seal may be retrying a full spool for good
            task.cancel()
        await asyncio.gather(*self._uploaders, *self._tasks, return_exceptions=True)
        # the seal threads first: they may be reading the log back, and closing it closes their descriptors
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._spool_executor.shutdown, wait=True, cancel_futures=True)
        if self._committer is not None:
            await asyncio.to_thread(self._committer.close)

    # ------------------------------------------------------------ ingest

    def accept_write(self, stream: DiskStream, write: Write) -> bool:
        """Log a checked write and add it to its disk's batch; False if it was a duplicate."""
        stream.check_write(write)
        if not stream.check_sequence(write.seq):
            return False
        size = len(write.data)
        pieces = (write_record_header(write.seq, write.timestamp_us, write.offset, size), write.data)
        self._log(stream, write.seq, pieces, size)
        self._append(stream, write.seq, write.timestamp_us, pieces, size, write.checksum)
        return True

    def accept_tag(self, stream: DiskStream, tag: Tag) -> bool:
        if not stream.check_sequence(tag.seq):
            return False
        pieces = (tag_record(tag.seq, tag.timestamp_us, tag.kind, tag.tag_id),)
        self._log(stream, tag.seq, pieces, 0)
        # a tag ends its batch, so recovery points fall on blob boundaries
        self._append(stream, tag.seq, tag.timestamp_us, pieces, 0, None, ends_batch=True)
        return True

    def _append(self, stream: DiskStream, seq: int, timestamp_us: int, pieces: Pieces, size: int,
                checksum: int | None, *, ends_batch: bool = False) -> None:
        batch = self._batch_for(stream, seq)
        batch.records.append(Record(seq, pieces, sum(map(len, pieces)), size, checksum))
        self._added(stream, batch, seq, timestamp_us, size)
        if (ends_batch or batch.payload_bytes >= self._max_batch
                or (batch.overdue and batch.payload_bytes >= self._min_batch)):
            self._cut(stream)

    def _batch_for(self, stream: DiskStream, seq: int) -> Batch:
        batch = stream.open_batch
        if batch is not None and seq != batch.last_seq + 1:  # its records follow on: not across a lost gap
            self._cut(stream)
            batch = None
        if batch is None:
            batch = stream.open_batch = Batch(stream.info.disk, seq)
            # decided once: a batch refers to the log from its first record on, or not at all
            batch.log_backed = self.held_bytes >= self._max_inflight * LOG_BACKED_SHARE
            loop = asyncio.get_running_loop()
            stream.linger = (loop.call_later(self._linger, self._linger_expired, stream) if self._linger
                             else loop.call_soon(self._linger_expired, stream))
        return batch

    def _added(self, stream: DiskStream, batch: Batch, seq: int, timestamp_us: int, size: int) -> None:
        stream.accepted_seq = batch.last_seq = seq
        batch.payload_bytes += size
        batch.memory_bytes += size
        batch.last_source_us = max(batch.last_source_us, timestamp_us)
        self.inflight_bytes += size
        self.stats.received_bytes += size
        stream.received_bytes += size
        if not self.paused and self.held_bytes >= self._max_inflight:
            self._set_paused(True)

    # ------------------------------------------------------------ write-ahead log (acknowledgements)

    def _log(self, stream: DiskStream, seq: int, pieces: Pieces, size: int) -> None:
        assert self._committer is not None, "Pipeline.start() first"
        self._committer.log(stream.info.disk, stream.info.size, seq, pieces, size)
        self.unlogged_bytes += size
        self.unlogged_records += 1

    def _committed(self, logged: list[Logged], chunk_bytes: int, seconds: float, place: ChunkPlace) -> None:
        """On the loop, once a commit is durable: acknowledge, and let the open batches refer to the log
        for what it now holds instead of holding it in memory."""
        self.spool.used_bytes += chunk_bytes
        self.stats.log_bytes += chunk_bytes
        self.stats.log_commits.observe(seconds)
        for entry in logged:
            self.unlogged_bytes -= entry.payload_bytes
            self.unlogged_records -= entry.records
            stream = self.streams[entry.disk]
            stream.durable_seq = entry.last_seq
            for listener in list(stream.listeners.values()):
                listener(entry.disk, entry.last_seq)
            if stream.open_batch is not None and stream.open_batch.log_backed:
                self._refer_to_log(stream.open_batch, entry, place)
            self._queue_uploads(stream)
        if self.wal.closed_segments != self._closed_segments_seen:
            # a segment closed after its writes were stored would otherwise wait for the next upload,
            # and with ingest paused on a full spool there may be none
            self._closed_segments_seen = self.wal.closed_segments
            self._spawn(self._release_log())
        self._update_flow()

    def _refer_to_log(self, batch: Batch, entry: Logged, place: ChunkPlace) -> None:
        """Drop from memory the records of ``batch`` that ``entry`` put in the log; the seal reads them back.

        With many disks this is what lets batches grow: each disk's open batch waits out its linger,
        and while it held its payload, 1000 disks' batches filled the in-flight budget in a fraction of
        it — ingest paused, and batches were cut small (blobs of ~80 KB, each a file, a sync and an apply
        group). Batches being sealed keep their records; so do records replayed at start (not in this
        commit: the run of records must start inside the entry and end at its last)."""
        records = batch.records
        count = 0
        while count < len(records) and records[count].seq <= entry.last_seq:
            count += 1
        if not count or records[0].seq < entry.first_seq or records[count - 1].seq != entry.last_seq:
            return
        moved = [records.popleft() for _ in range(count)]
        size = sum(record.size for record in moved)
        # the run ends the entry's records, so it starts where they end less its size
        batch.logged.append(LoggedRecords(place.range(entry.offset + entry.size - size, size), moved[0].seq,
                                          tuple(record.checksum for record in moved),
                                          headers_crc(record.pieces[0] for record in moved)))
        payload = sum(record.payload for record in moved)
        batch.memory_bytes -= payload
        self.inflight_bytes -= payload

    def _log_failed(self, exc: Exception, retry_s: float) -> None:
        # spool disk full or failing: nothing in the commit was acknowledged; the committer keeps trying
        log.error("spool: cannot append to the write-ahead log: %s; retrying in %.1fs", exc, retry_s)
        self.stats.spool_errors += 1

    async def _release_log(self) -> None:
        freed = await asyncio.to_thread(self.wal.release, self._saved_watermarks)
        self.spool.used_bytes -= freed  # not `-= await`: that would read used_bytes before the await
        self._update_flow()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._closing:  # nothing new once close() began (a linger or a commit landing late)
            coroutine.close()
            return
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ seal + spool

    def _linger_expired(self, stream: DiskStream) -> None:
        """Group commit: while a seal of this disk is in flight the batch keeps filling, and is cut
        when that seal completes. Under load this makes batches (and files) fewer and larger instead
        of one tiny blob per linger interval; at low load it changes nothing.

        A batch still below ``batch.min_bytes`` waits longer (``batch.min_bytes_wait_ms`` in all), and
        is cut as soon as it reaches them (``_append``): slow disks make fewer, larger blobs."""
        stream.linger = None
        batch = stream.open_batch
        if batch is not None and not batch.overdue and batch.payload_bytes < self._min_batch and self._small_batch_wait:
            batch.overdue = True
            stream.linger = asyncio.get_running_loop().call_later(self._small_batch_wait, self._linger_expired, stream)
            return
        if stream.seal_in_flight:
            stream.cut_when_sealed = True
        else:
            self._cut(stream)

    def _cut(self, stream: DiskStream) -> None:
        stream.cut_when_sealed = False
        batch = stream.open_batch
        if batch is None:
            return
        stream.open_batch = None
        if stream.linger is not None:
            stream.linger.cancel()
            stream.linger = None
        stream.sealing.append(batch)
        self._spawn(self._seal(stream, batch))

    async def _seal(self, stream: DiskStream, batch: Batch) -> None:
        """Seal on the CPU pool, then write on the spool pool, so the seal threads stay busy with lz4 and
        AES while files are written. The seal hands the blob straight to the spool pool, so a blob costs
        one event-loop round trip, not two: under load each round trip waited ~6 ms for the busy loop,
        and a disk whose linger expired meanwhile cuts its next batch only after this one."""
        loop = asyncio.get_running_loop()
        delays = self.config.upload.retry_delays()

        def try_write(sealed: memoryview) -> Path | OSError:
            try:
                return self.spool.write(batch.name, sealed)
            except OSError as exc:
                return exc

        def seal_and_write(spooled: asyncio.Future[tuple[memoryview, Path | OSError]]) -> None:
            try:
                sealed = self._seal_blocking(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(_settle, spooled, exc)
                return
            self._spool_executor.submit(
                lambda: loop.call_soon_threadsafe(_settle, spooled, (sealed, try_write(sealed))))

        attempt = 0
        while True:
            attempt += 1
            spooled: asyncio.Future[tuple[memoryview, Path | OSError]] = loop.create_future()
            self._executor.submit(seal_and_write, spooled)
            try:
                sealed, written = await spooled
                break
            except ReadBackError as exc:
                self.stats.spool_errors += 1
                if isinstance(exc.__cause__, OSError):  # may pass (EMFILE, ENOMEM, EIO): like a spool write
                    attempt = 0
                elif attempt == READ_BACK_ATTEMPTS:  # read, but not as logged, each time
                    self._stop_disk(stream, f"its write-ahead log cannot be read back from sequence "
                                            f"{batch.first_seq}: {exc}", "it needs a full resync")
                    return
                delay = next(delays)
                log.error("spool: cannot seal blob %s: %s; retrying in %.1fs", batch.name, exc, delay)
                await asyncio.sleep(delay)
        while isinstance(written, OSError):  # spool disk full or failing: the log holds the writes; keep trying
            delay = next(delays)
            log.error("spool: cannot write blob %s: %s; retrying in %.1fs", batch.name, written, delay)
            self.stats.spool_errors += 1
            await asyncio.sleep(delay)
            written = await loop.run_in_executor(self._spool_executor, try_write, sealed)
        batch.path = written
        batch.size = len(sealed)
        # Reuse (a fresh multi-MiB buffer per blob costs page faults), but keep only as many as the seal
        # threads can fill at once: a burst must not pin its peak in memory for good. Only here, with the
        # write finished: a task cancelled at close may still have a spool thread writing from it.
        if self._buffers.qsize() < self._spare_buffers:
            self._buffers.put(sealed.obj)
        batch.sealed = True
        batch.logged, batch.records = [], deque()
        self.inflight_bytes -= batch.memory_bytes
        self.spool.used_bytes += batch.size
        self.stats.sealed_bytes += batch.size
        self.stats.sealed_payload_bytes += batch.payload_bytes
        stream.sealed_bytes += batch.size
        self._queue_uploads(stream)
        if stream.cut_when_sealed and not stream.seal_in_flight:
            self._cut(stream)
        self._update_flow()

    def _queue_uploads(self, stream: DiskStream) -> None:
        """Sealed blobs leave for the store in sequence order, and only once the log holds their records:
        a spool blob is not fsynced, so a blob in the store with records the log lacks could, after a power
        loss, hold writes the agent was never told were durable — and numbers it then reuses."""
        if stream.log_failure is not None:  # stopped on a blob it cannot store: the store gets no later one
            return
        while stream.sealing and stream.sealing[0].sealed and stream.sealing[0].last_seq <= stream.durable_seq:
            done = stream.sealing.popleft()
            stream.uploading.append(done)
            self._upload_queue.put_nowait(done)

    def _seal_blocking(self, batch: Batch) -> memoryview:
        """Worker thread: gather the batch's records, lz4 + AES-GCM into a reused buffer."""
        records = self._gather(batch)
        header = BlobHeader(batch.disk, self.streams[batch.disk].info.size, batch.first_seq, batch.last_seq,
                            batch.last_seq - batch.first_seq + 1, batch.created_us, batch.last_source_us)
        try:
            buffer: bytearray | None = self._buffers.get_nowait()
        except queue.Empty:
            buffer = None
        return self.sealer.seal(records, header, self._nonces(), out=buffer)

    def _gather(self, batch: Batch) -> memoryview:
        """Worker thread: the batch's records, in order, in this thread's reused buffer — what is in the
        log read back straight into it, what is still held copied after it. A fresh buffer for each read,
        its plaintext and their join took a seal thread more CPU than AES-GCM at 1000 disks."""
        size = sum(logged.place.length for logged in batch.logged) + sum(record.size for record in batch.records)
        records = self._gathered.take(size)
        pos = 0
        for logged in batch.logged:
            self._read_back(batch.disk, logged, records[pos:pos + logged.place.length])
            pos += logged.place.length
        for record in batch.records:
            for piece in record.pieces:
                records[pos:pos + len(piece)] = piece
                pos += len(piece)
        return records

    def _read_back(self, disk: str, logged: LoggedRecords, out: memoryview) -> None:
        """Worker thread: records from the log into ``out``, checked against the CRC-32s kept for them (the
        read is not authenticated: the chunk's tag covers the whole chunk, which holds other disks' records)."""
        place = logged.place
        try:
            self.wal.read_into(place, out)
            check_read_back(out, disk, logged.first_seq, logged.checksums, logged.headers_crc)
        except (OSError, LogBlobError) as exc:
            raise ReadBackError(f"{exc} (sequences {logged.first_seq}-{logged.last_seq}, {place.length} bytes at "
                                f"offset {place.file_offset} of {place.path})") from exc

    def _stop_disk(self, stream: DiskStream, failure: str, remedy: str) -> None:
        """A blob of this disk cannot be made from what this process holds (damage the read-back keeps
        finding in the log, or a spool file a store could not trust that cannot be written again):
        stop taking its writes (the refusal stops its agent, as for a committed failover) and say so;
        other agents go on. What it still holds (that batch, the ones after it) stays unstored and keeps
        its log segments and its memory — bounded, since nothing is added. Not persisted: a restart
        replays the log (where damage shows as a hole in the disk's sequence)."""
        if stream.log_failure is not None:  # a later batch of the same disk: the first one is the news
            return
        stream.log_failure = failure
        log.critical("disk %r: %s; its writes are no longer accepted and %s", stream.info.disk, failure, remedy)

    # ------------------------------------------------------------ upload

    async def _upload_worker(self) -> None:
        """Uploads what has queued up as one group: one store round (for the local store a single
        directory fsync), one watermark save and one spool clean-up for the whole group."""
        while True:
            group = [await self._upload_queue.get()]
            while len(group) < self._upload_group and not self._upload_queue.empty():
                group.append(self._upload_queue.get_nowait())
            lost = await self._upload_with_retry(group)
            for batch in group:
                if batch.path not in lost:
                    batch.uploaded = True
                    self.stats.stored_bytes += batch.size
            await self._advance_uploaded({self.streams[batch.disk] for batch in group})

    async def _upload_with_retry(self, group: list[Batch]) -> set[Path]:
        """Until every blob of the group is stored; returns the paths of those that never will be (their
        disks stopped by :meth:`_rewrite_untrusted`)."""
        delays = self.config.upload.retry_delays()
        pending = {batch.path: batch for batch in group if batch.path is not None}
        lost: set[Path] = set()
        while True:
            failed = await self._rewrite_untrusted(pending, lost)
            sendable = [(batch.name, path) for path, batch in pending.items()
                        if path not in failed and path not in lost]
            if sendable:
                failed |= {path: exc for (_, path), exc in await put_files(self.store, sendable)}
            if not failed:
                return lost
            for exc in failed.values():
                if isinstance(exc, UntrustedBlobFiles):
                    self._untrusted.update((path, self._untrusted.get(path, 0)) for path in exc.paths)
            self.stats.upload_errors += len(failed)
            first, exc = next(iter(failed.items()))
            delay = next(delays)
            log.warning("upload of %d blob(s) failed, e.g. %s (%s); retrying in %.2fs", len(failed),
                        pending[first].name, exc, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # jitter spreads a thundering herd
            pending = {path: pending[path] for path in failed}

    async def _rewrite_untrusted(self, pending: dict[Path, Batch], lost: set[Path]) -> dict[Path, Exception]:
        """Write every pending blob the store would not trust again, into a new file (Spool.rewrite): synced
        again as it was, after a failed sync, it would pass without its data on disk. Returns those that could
        not be written. One that no longer authenticates, is gone, or cannot be written in READ_BACK_ATTEMPTS
        goes to ``lost`` (its group's other blobs must not wait on it for good): its disk stops until a
        restart replays its records from the log."""
        failed: dict[Path, Exception] = {}
        for path in self._untrusted.keys() & pending.keys():
            batch = pending[path]
            try:
                await asyncio.to_thread(self.spool.rewrite, path, self._keys)
            except OSError as exc:
                self._untrusted[path] += 1
                if not isinstance(exc, FileNotFoundError) and self._untrusted[path] < READ_BACK_ATTEMPTS:
                    failed[path] = exc
                    continue
                await self._lose(batch, exc, lost)
                continue
            except LogBlobError as exc:
                await self._lose(batch, exc, lost)
                continue
            del self._untrusted[path]
            log.warning("spool: blob %s written again into a new file (the store could not trust it as it was)",
                        batch.name)
        return failed

    async def _lose(self, batch: Batch, exc: Exception, lost: set[Path]) -> None:
        """Give up a spool blob that cannot be stored: its disk stops, and its writes wait in the log."""
        assert batch.path is not None
        self._untrusted.pop(batch.path, None)
        lost.add(batch.path)
        await asyncio.to_thread(batch.path.unlink, True)
        self.spool.used_bytes -= batch.size
        self._stop_disk(self.streams[batch.disk], f"the spool's file of blob {batch.name} could not be trusted as it "
                        f"was (a failed sync or read), nor written again from it ({exc})",
                        "what it acknowledged is in the write-ahead log: restart the server, which replays it, "
                        "then the agent")

    async def _advance_uploaded(self, streams: set[DiskStream]) -> None:
        released: list[Batch] = []
        for stream in streams:
            done: list[Batch] = []
            while stream.uploading and stream.uploading[0].uploaded:
                done.append(stream.uploading.popleft())
            if done:
                stream.uploaded_seq = max(stream.uploaded_seq, done[-1].last_seq)
                if stream.resumed_past > stream.uploaded_seq and all(b.first_seq > stream.resumed_past
                                                                     for b in stream.batches()):
                    stream.uploaded_seq = stream.resumed_past  # what preceded the lost gap is stored now
                if self.track_applied:  # unless the applier was quicker than this bookkeeping
                    stream.unapplied.extend((b.last_seq, b.created_us) for b in done
                                            if stream.applied_seq is None or b.last_seq > stream.applied_seq)
                self.watermarks.seqs[stream.info.disk] = stream.uploaded_seq
                released += done
        if not released:
            return
        for notify in self.stored_listeners:  # in the store: the applier may take them now
            notify()
        # Awaited, though saves are at most every WATERMARK_SAVE_INTERVAL_S: the wait lets the next group
        # grow. Handing this to a task stored more at 1000 disks but cost ~10 % of the maximum ingest
        # (266-270 against 290-297 MB/s, back to back; docs/benchmarks.md).
        await self._save_watermarks()
        # only now may the spool and the log let them go
        await asyncio.to_thread(self.spool.discard, [batch.path for batch in released if batch.path is not None])
        self.spool.used_bytes -= sum(batch.size for batch in released)
        self._spawn(self._release_log())  # not awaited: the upload worker has the next group to send

    async def _save_watermarks(self) -> None:
        """Persist the upload watermarks; callers that arrive during a save share the next one.

        Saves are at least WATERMARK_SAVE_INTERVAL_S apart: each one is a new file (write, fsync, rename),
        and creating files past thousands of recently deleted ones is what ext4 charges most for here
        (inode allocation was the top kernel symbol of serve at low load). Only the spool's clean-up
        waits for a save — never an acknowledgement, and not the applier (woken before).
        """
        self._watermarks_dirty = True
        async with self._watermark_lock:
            if not self._watermarks_dirty:  # a save that began after our update already covered it
                return
            wait = self._last_watermark_save + WATERMARK_SAVE_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the updates of this interval join this save
            self._watermarks_dirty = False
            snapshot = dict(self.watermarks.seqs)
            delays = self.config.upload.retry_delays()
            while True:  # until saved: the spool and the log keep everything after the last saved watermark
                try:
                    await asyncio.to_thread(self.watermarks.save, snapshot)
                    break
                except OSError as exc:
                    delay = next(delays)
                    log.error("cannot save the upload watermarks to %s: %s; retrying in %.1fs",
                              self.watermarks.path, exc, delay)
                    self.stats.spool_errors += 1
                    await asyncio.sleep(delay)
            self._saved_watermarks = snapshot
            self._last_watermark_save = time.monotonic()

    # ------------------------------------------------------------ what the applier process reports

    def failed_upload_workers(self) -> list[str]:
        """Upload workers that ended with an error (a bug, or a store raising what it should not): until a
        restart their share of the uploads stands still, so /healthz says so (engine/monitor.py)."""
        return [f"{task.get_name()} ended: {task.exception()!r}" for task in self._uploaders
                if task.done() and not task.cancelled() and task.exception() is not None]

    def note_applied(self, disk: str, seq: int) -> None:
        self.applied_seqs[disk] = seq
        stream = self.streams.get(disk)
        if stream is not None:
            stream.note_applied(seq)

    def note_apply_failure(self, disk: str, reason: str) -> None:
        stream = self.streams.get(disk)
        if stream is not None:
            stream.apply_failure = reason

    # ------------------------------------------------------------ flow control

    @property
    def held_bytes(self) -> int:
        """Payload held in memory for the pipeline's sake, checked against ``pipeline.max_inflight_bytes``:
        not yet sealed, or not yet logged (a write is referenced by its batch and by the next commit)."""
        return max(self.inflight_bytes, self.unlogged_bytes)

    def _update_flow(self) -> None:
        if self.paused:
            if self.held_bytes < self._max_inflight * 3 // 4 and not self.spool.full:
                self._set_paused(False)
        elif self.held_bytes >= self._max_inflight or self.spool.full:
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        """Pause or resume every listener. Resumed in a new random order each time: a resumed socket
        that has data waiting is ready at once, the event loop serves ready sockets in that order, and
        the budget runs out after a fraction of 1000 agents — resumed always in the same order, the last
        ones waited a whole 60-s run for their first acknowledgement."""
        self.paused = paused
        if paused:
            self.stats.pauses += 1
        listeners = list(self.flow_listeners)
        if not paused:
            random.shuffle(listeners)
        for listener in listeners:
            if paused:
                listener.pause_reading()
            else:
                listener.resume_reading()


class ReadBackError(Exception):
    """Records of a batch could not be read back from the write-ahead log, or not as they were logged."""


def _report_end_of_uploads(task: asyncio.Task[None]) -> None:
    """An upload worker ends only when the pipeline closes; one that fails (a bug, a store raising what it
    should not) would otherwise stop its share of the uploads in silence, its task held and never awaited."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.critical("%s ended: %r; the blobs it would have stored wait in the spool until a restart",
                     task.get_name(), exc, exc_info=exc)


def _settle(future: asyncio.Future[Any], outcome: object) -> None:
    """Resolve ``future`` from a worker thread's outcome (on the loop, via call_soon_threadsafe)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _commit_times() -> Histogram:
    """Durations of the write-ahead log's commits (encrypt, append, fdatasync), which every ack waits
    for, so an operator sees a slow spool disk before the agents feel it. Unregistered: the monitor's
    collector exports it with the rest of the pipeline's figures."""
    return Histogram("blockferry_log_commit_seconds", "Write-ahead log commits (encrypt, append, fdatasync): "
                     "what every acknowledgement waits for.",
                     buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0), registry=None)


@dataclass
class PipelineStats:
    log_commits: Histogram = field(default_factory=_commit_times)
    log_bytes: int = 0
    received_bytes: int = 0
    sealed_bytes: int = 0
    sealed_payload_bytes: int = 0
    stored_bytes: int = 0
    upload_errors: int = 0
    spool_errors: int = 0
    pauses: int = 0
    protocol_errors: Counter[str] = field(default_factory=Counter)  # by error code
