"""The recovery journal's undo-entry format (sans I/O).

The seed disk always holds the newest applied state. Before the applier changes
it, it saves the bytes about to be overwritten — the *before-images* of every
range the apply group touches — as one undo entry. Rolling the seed back through
the entries newer than sequence S, newest first, yields the disk exactly as it
was at S; that is what a recovery point is.

An entry is named so that a directory or container listing alone gives the
recovery points (sequence range, kind, source time, time recorded); the tag ids
live inside the entry. Byte layout: docs/FORMAT.md.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import lz4.block

from protocol.checksum import crc32
from protocol.errors import LogBlobError
from protocol.frames import TagKind

UNDO_MAGIC = b"\x89BFUNDO\n"
UNDO_VERSION = 1
UNDO_SUFFIX = ".undo"
UNDO_HEADER = struct.Struct("<8sHHQQQQIIIQI")
CHUNK_ENTRY = struct.Struct("<II")  # raw size, stored (compressed) size
CHUNK = 4 * 1024 * 1024
RANGE = struct.Struct("<QI")
TAG = struct.Struct("<QBH")
TAG_ID_BYTES = 48
SEGMENT_SUFFIX = ".journal"
RECORD_MAGIC = b"BFJR"
DELETED_MAGIC = b"BFJX"  # written over RECORD_MAGIC when the entry is pruned; the rest of the header stays
RECORD_HEADER = struct.Struct("<4sHII")  # magic, name length, entry length, CRC-32 of both lengths and the name
RECORD_NAME_MAX = 256  # an entry name is at most ~190 ASCII bytes
_ENTRY_NAME = re.compile(r"(?P<from>[0-9]{20})-(?P<to>[0-9]{20})-(?P<kind>[ac])-(?P<source>[0-9]+)-"
                         r"(?P<recorded>[0-9]+)-(?P<tag>(?:[0-9a-f]{2})*)" + re.escape(UNDO_SUFFIX), re.ASCII)


@dataclass(frozen=True, slots=True)
class EntryName:
    """What a listing tells about an entry: enough to list points without reading it."""

    seq_from: int  # the state the entry rolls back to
    seq_to: int  # the state right after the apply group
    app: bool  # the group ended with an application-consistent tag
    source_us: int  # source time of the group's newest record
    recorded_us: int  # applier wall time when the group was applied (retention only, never ordering)
    tag_id: str = ""  # id of the tag that ended the group, if any (at most TAG_ID_BYTES in the name)

    def __str__(self) -> str:
        tag = self.tag_id.encode()[:TAG_ID_BYTES].hex()
        return (f"{self.seq_from:020d}-{self.seq_to:020d}-{'a' if self.app else 'c'}-"
                f"{self.source_us}-{self.recorded_us}-{tag}{UNDO_SUFFIX}")

    @classmethod
    def parse(cls, name: str) -> EntryName | None:
        match = _ENTRY_NAME.fullmatch(name)
        if match is None:
            return None
        return cls(int(match["from"]), int(match["to"]), match["kind"] == "a", int(match["source"]),
                   int(match["recorded"]), bytes.fromhex(match["tag"]).decode(errors="replace"))


@dataclass(frozen=True, slots=True)
class EntryTag:
    seq: int
    kind: TagKind
    tag_id: str


Mapper = Callable[[Callable[[memoryview], bytes], Iterable[memoryview]], Iterable[bytes]]


@dataclass(slots=True)
class UndoEntry:
    name: EntryName
    ranges: list[tuple[int, int]]  # (offset, length), sorted and disjoint
    # The before-images of ``ranges``, back to back: what the applier reads them into and what the format
    # stores (compressed in chunks), so neither side joins or splits a copy of them.
    images: bytes | bytearray | memoryview
    tags: list[EntryTag] = field(default_factory=list)

    @property
    def before(self) -> list[memoryview]:
        """One before-image per range (views of ``images``)."""
        view, out, at = memoryview(self.images), [], 0
        for _, length in self.ranges:
            out.append(view[at:at + length])
            at += length
        return out

    def encode(self, mapper: Mapper = map) -> bytes:
        """Serialise; the before-images are lz4-compressed in independent chunks of ``CHUNK`` bytes.

        ``mapper`` runs the chunk compressions: the builtin ``map``, or an executor's
        ``map`` so a multi-MiB entry is compressed on every core (lz4 releases the GIL).
        The entry is put together in one copy: its CRC is taken piece by piece.
        """
        meta = [RANGE.pack(o, n) for o, n in self.ranges]
        for tag in self.tags:
            tag_id = tag.tag_id.encode()
            meta.append(TAG.pack(tag.seq, tag.kind, len(tag_id)) + tag_id)
        raw = memoryview(self.images).cast("B")  # lengths and slices in bytes, whatever view was given
        if len(raw) != sum(length for _, length in self.ranges):
            raise ValueError(f"undo entry {self.name}: {len(raw)} bytes of before-images for ranges of "
                             f"{sum(length for _, length in self.ranges)}")
        chunks = list(mapper(_compress, [raw[i:i + CHUNK] for i in range(0, len(raw), CHUNK)]))
        table = [CHUNK_ENTRY.pack(min(CHUNK, len(raw) - i * CHUNK), len(c)) for i, c in enumerate(chunks)]
        body = [*meta, *table, *chunks]
        n = self.name
        fields = (UNDO_MAGIC, UNDO_VERSION, 0, n.seq_from, n.seq_to, n.source_us, n.recorded_us,
                  len(self.ranges), len(self.tags), len(chunks), sum(len(piece) for piece in body))
        crc = crc32(UNDO_HEADER.pack(*fields, 0)[:-4])  # header and body, but the CRC
        for piece in body:
            crc = crc32(piece, crc)
        return b"".join([UNDO_HEADER.pack(*fields, crc), *body])

    @classmethod
    def decode(cls, data: bytes | memoryview, name: EntryName) -> UndoEntry:
        """Parse and check an entry; raises LogBlobError (with the entry name) if it is damaged."""
        n_ranges, n_tags, n_chunks = cls.verify(data, name)
        try:
            return cls._parse(name, memoryview(data)[UNDO_HEADER.size:], n_ranges, n_tags, n_chunks)
        except (struct.error, ValueError, lz4.block.LZ4BlockError) as exc:  # checksum passed: a writer bug
            raise LogBlobError(f"undo entry is malformed: {exc}", name=str(name)) from None

    @staticmethod
    def verify(data: bytes | memoryview, name: EntryName) -> tuple[int, int, int]:
        """Check an entry is whole (header, size, CRC) without decompressing it; raises LogBlobError if not.
        Returns its range, tag and chunk counts."""
        label = str(name)
        if len(data) < UNDO_HEADER.size:
            raise LogBlobError("undo entry is truncated", name=label)
        (magic, version, _flags, seq_from, seq_to, _src, _rec, n_ranges, n_tags, n_chunks, body_size,
         crc) = UNDO_HEADER.unpack_from(data)
        if magic != UNDO_MAGIC or version != UNDO_VERSION:
            raise LogBlobError("not an undo entry of a supported version", name=label)
        if (seq_from, seq_to) != (name.seq_from, name.seq_to):
            raise LogBlobError("undo entry's sequence range does not match its name", name=label)
        body = memoryview(data)[UNDO_HEADER.size:]
        if len(body) != body_size or crc32(body, crc32(memoryview(data)[:UNDO_HEADER.size - 4])) != crc:
            raise LogBlobError("undo entry fails its checksum", name=label)
        return n_ranges, n_tags, n_chunks

    @classmethod
    def _parse(cls, name: EntryName, body: memoryview, n_ranges: int, n_tags: int, n_chunks: int) -> UndoEntry:
        pos = 0
        ranges = []
        for _ in range(n_ranges):
            ranges.append(RANGE.unpack_from(body, pos))
            pos += RANGE.size
        tags = []
        for _ in range(n_tags):
            seq, kind, length = TAG.unpack_from(body, pos)
            pos += TAG.size
            tags.append(EntryTag(seq, TagKind(kind), bytes(body[pos:pos + length]).decode(errors="replace")))
            pos += length
        sizes = []
        for _ in range(n_chunks):
            sizes.append(CHUNK_ENTRY.unpack_from(body, pos))
            pos += CHUNK_ENTRY.size
        pieces = []
        for raw_size, stored in sizes:
            pieces.append(lz4.block.decompress(body[pos:pos + stored], uncompressed_size=raw_size))
            pos += stored
        images = b"".join(pieces)
        if pos != len(body) or len(images) != sum(length for _, length in ranges):
            raise ValueError("ranges and chunks do not add up to the entry's size")
        return cls(name, ranges, images, tags)


@dataclass(frozen=True, slots=True)
class JournalRecord:
    """Where an entry sits in a journal segment: ``header_size`` bytes of record header and name, then the entry."""

    name: str
    header_size: int
    entry_size: int
    deleted: bool = False


def record_header(name: str, entry_size: int) -> bytes:
    """The bytes that go before an entry in a journal segment (docs/FORMAT.md, section 16.3)."""
    raw = name.encode("ascii")
    return RECORD_HEADER.pack(RECORD_MAGIC, len(raw), entry_size, _record_crc(raw, entry_size)) + raw


def parse_record_header(data: bytes | memoryview) -> JournalRecord | None:
    """The record whose header ``data`` starts with (at least RECORD_HEADER.size + RECORD_NAME_MAX bytes, or up to
    the end of the segment), None if no whole, valid header starts there: the end of the records, or damage."""
    if len(data) < RECORD_HEADER.size:
        return None
    magic, name_size, entry_size, crc = RECORD_HEADER.unpack_from(data)
    raw = bytes(data[RECORD_HEADER.size:RECORD_HEADER.size + name_size])
    if magic not in (RECORD_MAGIC, DELETED_MAGIC) or len(raw) != name_size or _record_crc(raw, entry_size) != crc:
        return None
    name = raw.decode("ascii", errors="replace")
    if EntryName.parse(name) is None:
        return None
    return JournalRecord(name, RECORD_HEADER.size + name_size, entry_size, magic == DELETED_MAGIC)


def _record_crc(raw_name: bytes, entry_size: int) -> int:
    return crc32(raw_name, crc32(struct.pack("<HI", len(raw_name), entry_size)))


def _compress(chunk: memoryview) -> bytes:
    return lz4.block.compress(chunk, store_size=False)


def merge_ranges(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint (offset, length) ranges covering every byte of ``extents``."""
    merged: list[list[int]] = []
    for offset, length in sorted(extents):
        end = offset + length
        if merged and offset <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([offset, end])
    return [(start, end - start) for start, end in merged]
