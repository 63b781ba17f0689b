"""One local seed disk's undo entries, appended to segment files instead of a file each.

An entry used to be a file of its own, written under a temporary name, synced,
renamed and its directory synced: ~1.2 ms of machine CPU per apply group on ext4
at 1000 disks, the largest share of a small group's kernel work, and at one
point a second with 72 hours retained, some 260 000 files (inodes) per busy disk.
Appending the entry to the disk's open segment and syncing its data costs about
half, and a segment holds thousands of entries. Layout: docs/FORMAT.md, 16.3.

An entry is synced before its group writes the seed, so a crash can cut short
only the newest record, and only of a group that wrote nothing yet: opening the
journal drops it. Pruning marks entries deleted, from the oldest end, and a
segment file goes once all its entries have; a roll-back takes the newest and
truncates it away. ``*.undo`` files of earlier versions are still read and
deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from engine.fsutil import fsync_dir, write_at
from protocol import LogBlobError
from protocol.journal import (
    DELETED_MAGIC,
    RECORD_HEADER,
    RECORD_NAME_MAX,
    SEGMENT_SUFFIX,
    UNDO_SUFFIX,
    EntryName,
    UndoEntry,
    parse_record_header,
    record_header,
)

log = logging.getLogger(__name__)

# A new segment once the newest holds this much. Pruning frees whole segments, so up to this much per disk
# outlives its retention.
SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Located:
    segment: Path | None  # None: an entry file of an earlier version, under its own name
    start: int  # where the record (its header) starts
    offset: int  # where the entry starts
    size: int


class SegmentJournal:
    """Blocking, and safe to call from several threads (an apply and a failover's reads at once)."""

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync
        self._lock = threading.Lock()
        self._entries: dict[str, _Located] | None = None  # read on first use, in oldest-first order
        self._live: dict[Path, int] = {}  # entries left per segment
        self._tail: Path | None = None  # the segment appends go to
        self._tail_fd = -1
        self._tail_end = 0
        self._closed = False

    def names(self) -> list[str]:
        with self._lock:
            return list(self._index())

    def read(self, name: str) -> bytes:
        with self._lock:
            located = self._index()[name]
        path = located.segment or self.directory / name
        if located.segment is None:
            return path.read_bytes()
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, located.size, located.offset)
        finally:
            os.close(fd)

    def append(self, name: str, entry: bytes) -> None:
        """Durable when it returns (with ``fsync``): the group may then write the seed."""
        with self._lock:
            if self._closed:  # e.g. a cancelled apply's thread that outlived its volume
                raise OSError(errno.EBADF, f"journal {self.directory} was closed")
            entries = self._index()
            if self._tail is None or self._tail_end >= SEGMENT_BYTES:
                self._start_segment(EntryName.parse(name))
            assert self._tail is not None
            header = record_header(name, len(entry))
            start = self._tail_end
            write_at(self._tail_fd, header, start)
            write_at(self._tail_fd, entry, start + len(header))
            if self.fsync:
                os.fdatasync(self._tail_fd)  # a failure leaves the record to the next opening, which rolls it back
            entries[name] = _Located(self._tail, start, start + len(header), len(entry))
            self._live[self._tail] += 1
            self._tail_end = start + len(header) + len(entry)

    def delete(self, name: str) -> None:
        with self._lock:
            located = self._index().pop(name, None)
            if located is None:
                return
            if located.segment is None:
                _unlink(self.directory / name)
                return
            segment = located.segment
            self._live[segment] -= 1
            if not self._live[segment]:
                del self._live[segment]
                if segment == self._tail:
                    self._close_tail()
                _unlink(segment)
            elif segment == self._tail and located.offset + located.size == self._tail_end:  # a roll-back
                os.ftruncate(self._tail_fd, located.start)
                self._tail_end = located.start
            else:  # pruned: marked, so that an opening skips it; its bytes go with its segment
                self._mark_deleted(located)

    def close(self) -> None:
        """For good: an append after it is refused."""
        with self._lock:
            self._closed = True
            self._close_tail()

    # ------------------------------------------------------------ internals (under the lock)

    def _index(self) -> dict[str, _Located]:
        if self._entries is None:
            self._entries = self._scan()
        return self._entries

    def _scan(self) -> dict[str, _Located]:
        names = sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        entries = {n: _Located(None, 0, 0, -1) for n in names if n.endswith(UNDO_SUFFIX)}
        segments = [self.directory / n for n in names if n.endswith(SEGMENT_SUFFIX)]
        for index, segment in enumerate(segments):
            newest = index == len(segments) - 1
            found, end = self._scan_segment(segment, newest=newest)
            if newest:
                self._tail, self._tail_end = segment, end
                self._tail_fd = os.open(segment, os.O_RDWR)
            elif not found:  # every entry pruned, and a crash came before the file went
                _unlink(segment)
                continue
            entries.update(found)
            self._live[segment] = len(found)
        return dict(sorted(entries.items(), key=lambda item: _seq_to(item[0])))

    def _scan_segment(self, segment: Path, *, newest: bool) -> tuple[dict[str, _Located], int]:
        """The segment's whole, live records, and where its records end. Only the newest segment's last record
        can be cut short (by a crash while it was appended); it is truncated away. Anything else that does not
        read is damage: the records after it are lost, and the applier drops the points a gap cuts off."""
        found: dict[str, _Located] = {}
        fd = os.open(segment, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            position = 0
            last: tuple[str, _Located] | None = None  # the last live record walked, if nothing follows it
            while position < size:
                record = parse_record_header(os.pread(fd, RECORD_HEADER.size + RECORD_NAME_MAX, position))
                if record is None or position + record.header_size + record.entry_size > size:
                    break
                located = _Located(segment, position, position + record.header_size, record.entry_size)
                last = None if record.deleted else (record.name, located)
                if not record.deleted:
                    found[record.name] = located
                position += record.header_size + record.entry_size
            if newest and position == size and last is not None and not _whole(fd, *last):
                del found[last[0]]
                position = last[1].start
            if position < size and not newest:  # the points from here back are lost, but not the disk
                log.error("journal segment %s: no whole record at offset %d of %d (damaged); the recovery points "
                          "of disk %r up to the first entry after it can no longer be materialised", segment,
                          position, size, self.directory.name)
            elif position < size:
                log.warning("journal segment %s: %d bytes from offset %d are not a whole record (one a crash cut "
                            "short while it was appended, before its group wrote the seed, or damage); dropped",
                            segment, size - position, position)
                os.ftruncate(fd, position)
        finally:
            os.close(fd)
        return found, position

    def _mark_deleted(self, located: _Located) -> None:
        """Not synced: a mark lost in a crash only lists the entry again, and the next prune takes it again."""
        assert located.segment is not None
        if located.segment == self._tail:
            os.pwrite(self._tail_fd, DELETED_MAGIC, located.start)
            return
        fd = os.open(located.segment, os.O_WRONLY)
        try:
            os.pwrite(fd, DELETED_MAGIC, located.start)
        finally:
            os.close(fd)

    def _start_segment(self, first: EntryName | None) -> None:
        self._close_tail()
        segment = self.directory / f"{first.seq_from if first else 0:020d}{SEGMENT_SUFFIX}"
        self._tail_fd = os.open(segment, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if self.fsync:
            fsync_dir(self.directory)
            fsync_dir(self.directory.parent)  # the disk's journal directory itself, made with its first segment
        self._tail, self._tail_end = segment, 0
        self._live[segment] = 0

    def _close_tail(self) -> None:
        if self._tail_fd >= 0:
            os.close(self._tail_fd)
        self._tail, self._tail_fd, self._tail_end = None, -1, 0


def _whole(fd: int, name: str, located: _Located) -> bool:
    """Whether an entry's bytes are all there (its CRC), the check of a record a crash may have cut short."""
    parsed = EntryName.parse(name)
    try:
        UndoEntry.verify(os.pread(fd, located.size, located.offset), parsed)  # type: ignore[arg-type]
    except LogBlobError:
        return False
    return True


def _seq_to(name: str) -> int:
    parsed = EntryName.parse(name)
    return parsed.seq_to if parsed else -1


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
