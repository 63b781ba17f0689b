"""The spool's write-ahead log: segment files of group-committed chunks (format: protocol/wal.py).

A write is acknowledged once the chunk holding it is appended and fdatasynced here; it is sealed into a
log blob later, off the acknowledgement's path. The log therefore only has to hold what is acknowledged
but not yet in the cache store: a segment is deleted once every disk it holds records of has its upload
watermark (the saved one) at or past that segment's last sequence.

Appending to one open file costs a write and an fdatasync; a file per blob cost an inode allocation,
a rename and two fsyncs, and waited for lz4 before it could start. :class:`GroupCommitter` is the thread
that appends: it starts the next commit as soon as the previous one is durable, without waiting for the
busy event loop in between.

Released segments are recycled, as PostgreSQL recycles its WAL files: up to ``RECYCLED_SEGMENTS`` of
them are renamed aside and later written over from the start. Blocks already allocated need no block
allocation at the commit's sync, and a write inside the file's size no metadata: on this project's
development host the allocator's scans for a new 64 MiB segment took 0.65 cores of the commit thread at
1000 agents (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from engine.buffers import ThreadBuffer
from engine.fsutil import fsync_dir, private_dir, sync_or_rewrite
from engine.nonces import RandomNonces
from engine.threads import name_os_thread
from protocol import LogBlobError
from protocol.logblob import KeyLookup
from protocol.wal import CHUNK_HEADER, WAL_MAGIC, WalChunk, WalSealer, WalSection, read_chunk, section_header

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024  # a segment is closed (and may be deleted) once it grows past this (at most)
SEGMENT_SUFFIX = ".wal"
RECYCLED_SUFFIX = ".free"
RECYCLED_SEGMENTS = 2  # released segments kept to be written over instead of allocating new blocks


def segment_name(number: int, floor: int = 0) -> str:
    """A segment's file name. A recycled file's name carries its *floor*, the first chunk number written
    into it: every chunk below it is what the file held before (see :meth:`WriteAheadLog.replay`)."""
    return f"{number:020d}{f'.{floor:020d}' if floor else ''}{SEGMENT_SUFFIX}"


def parse_segment_name(path: Path) -> tuple[int, int]:
    """(segment number, floor) of a segment file; the floor is 0 for a file that was new."""
    number, _, floor = path.name.removesuffix(SEGMENT_SUFFIX).partition(".")
    return int(number), int(floor or 0)


def _next_chunk_from(data: bytes, start: int, keys: KeyLookup, path: Path,
                     floor: int) -> tuple[int, WalChunk | None]:
    """The first chunk at or after ``start`` that reads and is numbered at or above ``floor``."""
    resume = data.find(WAL_MAGIC, start)
    while resume >= 0:
        if chunk := read_chunk(data, resume, keys, name=str(path), floor=floor):
            return resume, chunk
        resume = data.find(WAL_MAGIC, resume + 1)
    return -1, None


def logged_seqs(directory: Path, keys: KeyLookup) -> dict[str, int]:
    """Per disk, the highest sequence the log in ``directory`` holds: read only, for a tool beside a stopped
    server (no sync, no clean-up, unlike :meth:`WriteAheadLog.replay`)."""
    seqs: dict[str, int] = {}
    for path in sorted(directory.glob("*" + SEGMENT_SUFFIX)):
        _, floor = parse_segment_name(path)
        for _, chunk in WriteAheadLog._chunks(path.read_bytes(), keys, path, floor):
            for section in chunk.sections:
                seqs[section.disk] = max(seqs.get(section.disk, 0), section.last_seq)
    return seqs


@dataclass
class Segment:
    path: Path
    size: int = 0
    last_seqs: dict[str, int] = field(default_factory=dict)  # disk -> last sequence logged in this segment

    def covered_by(self, watermarks: dict[str, int]) -> bool:
        return all(watermarks.get(disk, 0) >= seq for disk, seq in self.last_seqs.items())


@dataclass(frozen=True, slots=True)
class LogRange:
    """Records of one disk that a commit put in the log, to read back (:meth:`WriteAheadLog.read_into`)
    instead of holding them in memory until they are sealed."""

    path: Path  # the segment
    file_offset: int  # where their ciphertext starts in it
    chunk_offset: int  # ... and where in the records of its chunk (the cipher's counter position)
    length: int
    nonce: bytes  # the chunk's


@dataclass(frozen=True, slots=True)
class ChunkPlace:
    """Where a commit's chunk went: its records start at ``records_at`` in ``path``."""

    path: Path
    records_at: int
    nonce: bytes

    def range(self, chunk_offset: int, length: int) -> LogRange:
        return LogRange(self.path, self.records_at + chunk_offset, chunk_offset, length, self.nonce)


class WriteAheadLog:
    """Segment files and their bookkeeping. Blocking; thread-safe (the committer appends while a
    worker thread releases)."""

    def __init__(self, directory: Path, sealer: WalSealer, *, fsync: bool = True,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = private_dir(directory)
        if fsync:
            fsync_dir(directory.parent)  # the log's own directory entry
        self.sealer = sealer
        self.fsync = fsync
        self._synced_writes = fsync  # RWF_DSYNC, until a kernel or file system refuses it (Linux < 4.7)
        self.segment_bytes = segment_bytes
        self.closed_segments = 0  # segments closed so far: each one is a chance to release
        self._closed: list[Segment] = []
        self._open: Segment | None = None
        self._fd: int | None = None
        self._next_segment = 1
        self._next_chunk = 1
        self._recycled: list[Path] = []  # released segments to write over, named *RECYCLED_SUFFIX
        self._lock = threading.Lock()
        self._nonces = RandomNonces()
        self._readers: dict[Path, int] | None = {}  # segment -> descriptor that reads records back (None: closed)
        self._ciphertext = ThreadBuffer()  # read back here, decrypted into the caller's buffer

    def replay(self, keys: KeyLookup, after: dict[str, int]) -> list[WalSection]:
        """At start-up: the sections the previous runs logged, in log order, except those whose disk is
        already durable past them elsewhere (``after``: disk -> sequence held by the cache store or the
        spool's blobs), so that only what was never sealed is held in memory.

        What cannot be read as a chunk is skipped up to the next chunk that can: at the end of a
        segment that is a write cut short by a crash or a failed append (never acknowledged); anything
        else is damage, reported, and the disks' sequence checks in the pipeline say what it cost.
        Segments are synced before anything in them counts as durable: a kill -9 between a chunk's
        write and its fdatasync leaves it complete in the page cache only.
        """
        for leftover in self.directory.glob("*" + RECYCLED_SUFFIX):
            leftover.unlink()  # the previous run's: chunk numbers restart from what the segments hold
        sections: list[WalSection] = []
        for path in sorted(self.directory.glob("*" + SEGMENT_SUFFIX)):
            number, floor = parse_segment_name(path)
            data = path.read_bytes()
            segment = Segment(path, 0 if floor else len(data))  # a recycled file: only what was written into it
            self._next_chunk = max(self._next_chunk, floor)  # chunk numbers stay above every floor on disk
            for offset, chunk in self._chunks(data, keys, path, floor):
                if floor:
                    segment.size = offset + chunk.size
                if chunk.number < self._next_chunk:
                    raise LogBlobError(f"write-ahead log chunk {chunk.number} at offset {offset} follows chunk "
                                       f"{self._next_chunk - 1}: segments out of order", name=str(path))
                self._next_chunk = chunk.number + 1
                for section in chunk.sections:
                    segment.last_seqs[section.disk] = max(segment.last_seqs.get(section.disk, 0), section.last_seq)
                sections += [s for s in chunk.sections if s.last_seq > after.get(s.disk, 0)]
            if self.fsync and sync_or_rewrite(path, data):  # its chunks authenticated as read: they are the log
                log.error("write-ahead log: %s could not be synced; written again into a new file", path)
            self._closed.append(segment)
            self._next_segment = number + 1
        if self.fsync:
            fsync_dir(self.directory)
        return sections

    @staticmethod
    def _chunks(data: bytes, keys: KeyLookup, path: Path, floor: int) -> Iterator[tuple[int, WalChunk]]:
        """The chunks of one segment, in order. In a recycled segment the chunks below its ``floor`` are
        the file's old content (:func:`read_chunk`): where the new chunks stop and only old ones follow,
        the segment ends, and that is no damage."""
        offset = 0
        while offset < len(data):
            chunk = read_chunk(data, offset, keys, name=str(path), floor=floor)
            if chunk is None:
                resume, chunk = _next_chunk_from(data, offset + 1, keys, path, floor)
                if chunk is None and floor:
                    log.debug("write-ahead log: %s: what was written into this recycled segment ends at offset %d",
                              path, offset)
                    return
                if chunk is None:
                    log.warning("write-ahead log: %s ends with %d bytes at offset %d that are not a complete chunk "
                                "(a write cut short by a crash or a failed append, never acknowledged); skipped",
                                path, len(data) - offset, offset)
                    return
                log.error("write-ahead log: %s has %d damaged bytes at offset %d; skipped to the next chunk",
                          path, resume - offset, offset)
                offset = resume
            yield offset, chunk
            offset += chunk.size

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._closed) + (self._open.size if self._open else 0)

    def append(self, pieces: Sequence[bytes | memoryview], last_seqs: dict[str, int]) -> tuple[int, ChunkPlace]:
        """Append one chunk (section headers and records, concatenated) durably; returns its size and
        where it went. One
        writer only (the committer). The lock covers the segment lists, not the write and its fdatasync:
        a release waiting for a commit held up the upload worker that asked for it.

        On an error (a full or failing disk) the segment is closed where it stood before and the next
        attempt starts a new one with the next chunk number: a torn chunk must end its segment, and
        after a failed fsync the page cache cannot be trusted to hold what was written.
        """
        with self._lock:
            segment, fd = self._writable()
        number = self._next_chunk
        self._next_chunk += 1  # used up even if this append fails: its bytes may survive in the old segment
        place = ChunkPlace(segment.path, segment.size + CHUNK_HEADER.size, self._nonces())
        try:
            written = self._write_chunk(fd, segment.size, number, pieces, place.nonce)
        except OSError as exc:
            with self._lock:
                self._close_open(truncate_to=segment.size)
            exc.filename = str(segment.path)
            raise
        with self._lock:
            segment.size += written
            for disk, seq in last_seqs.items():
                segment.last_seqs[disk] = max(segment.last_seqs.get(disk, 0), seq)
            if segment.size >= self.segment_bytes:
                self._close_open()
        return written, place

    def read_into(self, logged: LogRange, out: memoryview) -> None:
        """Records an earlier commit appended, read back into ``out`` (``logged.length`` bytes; blocking,
        any thread). Unauthenticated — the tag covers the whole chunk —, so the caller checks them; a short
        read is an OSError. The ciphertext passes through a buffer of the calling thread's, reused."""
        ciphertext = self._ciphertext.take(logged.length)
        got = os.preadv(self._reader(logged.path), [ciphertext], logged.file_offset)
        if got != logged.length:
            raise OSError(errno.EIO, f"write-ahead log: {got} of {logged.length} bytes at offset "
                                     f"{logged.file_offset}", str(logged.path))
        self.sealer.open_range_into(logged.nonce, logged.chunk_offset, ciphertext, out)

    def _reader(self, path: Path) -> int:
        with self._lock:
            if self._readers is None:
                raise OSError(errno.EBADF, "write-ahead log: closed", str(path))
            fd = self._readers.get(path)
            if fd is None:
                fd = self._readers[path] = os.open(path, os.O_RDONLY)
            return fd

    def _write_chunk(self, fd: int, offset: int, number: int, pieces: Sequence[bytes | memoryview],
                     nonce: bytes) -> int:
        """Write and (``fsync``) sync one chunk at ``offset``. A chunk that fits one view is written and
        synced in one call (``RWF_DSYNC``: fdatasync's guarantee for the range written), because the
        committer must win the GIL back after every call, at up to a switch interval each beside the busy
        event loop; a larger one is written view by view and then fdatasynced as a whole."""
        total = self.sealer.chunk_size(pieces)
        flags = 0
        written = 0
        for view in self.sealer.seal(number, pieces, nonce):
            flags = os.RWF_DSYNC if self._synced_writes and len(view) == total else 0
            while view:
                try:
                    done = os.pwritev(fd, [view], offset + written, flags)
                except OSError as exc:  # flags are checked before anything is written
                    if not flags or exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    log.warning("write-ahead log: synced writes (RWF_DSYNC) refused here (%s); a write and an "
                                "fdatasync per commit from now on", exc)
                    self._synced_writes, flags = False, 0
                    continue
                view = view[done:]
                written += done
        if self.fsync and not flags:
            os.fdatasync(fd)
        return written

    def release(self, watermarks: dict[str, int]) -> int:
        """Delete the closed segments everything of which is in the cache store; returns the bytes freed.
        ``watermarks`` must be the *saved* upload watermarks: a restart recovers from those. Nothing
        reads such a segment back any more: its records were sealed before they were stored."""
        with self._lock:
            done = [segment for segment in self._closed if segment.covered_by(watermarks)]
            self._closed = [segment for segment in self._closed if segment not in done]
            readers = [self._readers.pop(segment.path) for segment in done
                       if self._readers is not None and segment.path in self._readers]
        for fd in readers:
            os.close(fd)
        for segment in done:
            self._recycle_or_delete(segment)
        return sum(segment.size for segment in done)

    def _recycle_or_delete(self, segment: Segment) -> None:
        """Keep a released segment of a full segment's size to write over, or delete it. Its name needs
        no sync either way: a segment back under its old name after a crash holds only released
        records, which a replay skips as the store's."""
        with self._lock:
            if len(self._recycled) < RECYCLED_SEGMENTS and segment.size >= self.segment_bytes:
                recycled = segment.path.with_name(segment.path.name.removesuffix(SEGMENT_SUFFIX) + RECYCLED_SUFFIX)
                try:
                    segment.path.rename(recycled)
                    self._recycled.append(recycled)
                    return
                except OSError as exc:
                    log.warning("write-ahead log: cannot keep %s to write over (%s); deleted instead", segment.path,
                                exc)
        segment.path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            self._close_open()
            readers, self._readers = list((self._readers or {}).values()), None
        for fd in readers:
            os.close(fd)

    def _writable(self) -> tuple[Segment, int]:
        if self._open is None or self._fd is None:
            number = self._next_segment
            self._next_segment += 1
            reused = self._reuse_recycled(number) if self._recycled else None
            if reused is None:
                path = self.directory / segment_name(number)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                path, fd = reused
            try:
                if self.fsync:
                    fsync_dir(self.directory)  # the segment's name must survive a crash as its chunks do
            except OSError:
                os.close(fd)  # nothing new in it: replay reads nothing from it, and the next release deletes it
                self._closed.append(Segment(path))
                raise
            self._open, self._fd = Segment(path), fd
        return self._open, self._fd

    def _reuse_recycled(self, number: int) -> tuple[Path, int] | None:
        """A kept segment renamed into the log as segment ``number`` and opened to be written over from
        the start; its floor is the next chunk's number, above every chunk it holds. None: a new file
        then (the kept one could not be renamed)."""
        recycled = self._recycled.pop()
        path = self.directory / segment_name(number, floor=self._next_chunk)
        try:
            os.rename(recycled, path)
        except OSError as exc:
            log.warning("write-ahead log: cannot write over %s (%s); a new segment instead", recycled, exc)
            return None
        try:
            return path, os.open(path, os.O_WRONLY)
        except OSError:
            self._closed.append(Segment(path))  # holds nothing at or above its floor: the next release deletes it
            raise

    def _close_open(self, truncate_to: int | None = None) -> None:
        if self._fd is None or self._open is None:
            return
        try:
            if truncate_to is not None:
                os.ftruncate(self._fd, truncate_to)
        except OSError as exc:  # replay skips the torn chunk
            log.warning("write-ahead log: cannot cut %s back to %d bytes: %s", self._open.path, truncate_to, exc)
        finally:
            os.close(self._fd)
            self._fd = None
        self._closed.append(self._open)
        self._open = None
        self.closed_segments += 1


@dataclass
class Logged:
    """A disk's records waiting for the next commit."""

    disk: str
    disk_size: int
    first_seq: int
    last_seq: int = 0
    records: int = 0
    size: int = 0  # record bytes, headers included
    payload_bytes: int = 0
    pieces: list[bytes | memoryview] = field(default_factory=list)
    offset: int = 0  # where the records start in the chunk's, once committed

    def section(self) -> bytes:
        return section_header(self.disk, self.disk_size, self.first_seq, self.last_seq, self.records, self.size)


class GroupCommitter:
    """The log's writer thread: everything logged since its previous commit, for every disk, goes into
    one chunk and one fdatasync, and the next commit starts as soon as that one is durable (under load
    commits grow, they do not queue). Only the acknowledgements go back through the event loop; a loop
    round trip between commits cost milliseconds on a busy machine.

    ``log`` runs on the event loop, and so do the callbacks: ``on_committed(logged, chunk_bytes, seconds,
    place)`` (seconds: the successful append's duration; place: where the chunk went) and
    ``on_error(exc, retry_s)``. A failed append (full or failing disk) is retried with back-off, nothing
    acknowledged meanwhile, and reported each time.
    """

    def __init__(self, wal: WriteAheadLog, loop: asyncio.AbstractEventLoop,
                 on_committed: Callable[[list[Logged], int, float, ChunkPlace], None],
                 on_error: Callable[[Exception, float], None], *,
                 retry_delays: Callable[[], Iterator[float]]) -> None:
        self.wal = wal
        self._loop = loop
        self._on_committed = on_committed
        self._on_error = on_error
        self._retry_delays = retry_delays
        self._cond = threading.Condition()
        self._pending: dict[str, Logged] = {}
        self._waking = False  # a wake-up is scheduled on the loop
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="wal-commit", daemon=True)
        self._thread.start()

    def log(self, disk: str, disk_size: int, seq: int, pieces: Sequence[bytes | memoryview], payload_bytes: int) -> None:
        with self._cond:
            logged = self._pending.get(disk)
            if logged is None:
                logged = self._pending[disk] = Logged(disk, disk_size, seq)
            logged.last_seq = seq
            logged.records += 1
            logged.pieces += pieces
            logged.size += sum(map(len, pieces))
            logged.payload_bytes += payload_bytes
        if not self._waking:  # soon, not now: the rest of this socket read joins the same commit
            self._waking = True
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._waking = False
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Blocking: stop after the commit in flight (what is still pending was never acknowledged)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self.wal.close()

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                logged, self._pending = list(self._pending.values()), {}
            pieces: list[bytes | memoryview] = []
            offset = 0
            for entry in logged:
                section = entry.section()
                pieces.append(section)
                entry.offset = offset + len(section)
                offset = entry.offset + entry.size
                pieces += entry.pieces
            appended = self._append(pieces, {entry.disk: entry.last_seq for entry in logged})
            if appended is None:
                return
            del pieces
            for entry in logged:
                entry.pieces = []  # the log holds them now
            self._loop.call_soon_threadsafe(self._on_committed, logged, *appended)

    def _append(self, pieces: list[bytes | memoryview],
                last_seqs: dict[str, int]) -> tuple[int, float, ChunkPlace] | None:
        delays = self._retry_delays()
        while True:
            try:
                started = time.perf_counter()
                size, place = self.wal.append(pieces, last_seqs)
                return size, time.perf_counter() - started, place
            except Exception as exc:  # noqa: BLE001 - this thread must not die: nothing would be acked again
                retry_s = next(delays)
                self._loop.call_soon_threadsafe(self._on_error, exc, retry_s)
            with self._cond:
                if self._cond.wait_for(lambda: self._closing, timeout=retry_s):
                    return None
