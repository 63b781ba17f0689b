"""The spool's write-ahead log format: what makes a write durable before it is sealed into a blob.

An acknowledgement must not wait for lz4 (the dearest step of the data path) nor for a file per blob,
so a write is first appended to a log, one **chunk** per group commit, holding whatever arrived for any
number of disks since the previous commit::

    chunk    = header (magic, chunk number, key id, nonce, ciphertext length; GCM associated data)
               AES-256-GCM( section* ) + 16-byte tag
    section  = disk id length, disk size, first seq, last seq, record count, records length,
               disk id, records

Records are log-blob records (``RECORD_HEADER`` + body, see :mod:`protocol.logblob`), so a section
replays into a batch unchanged. Chunks are encrypted for the reason blobs are (nothing in clear text at
rest) but not compressed. Pure computation: the caller supplies nonces, buffers and files.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.checksum import crc32
from protocol.errors import LogBlobError
from protocol.logblob import (
    GCM_TAG_SIZE,
    KEY_SIZE,
    NONCE_SIZE,
    RECORD_HEADER,
    BlobHeader,
    KeyLookup,
    WriteRecord,
    iter_records,
    key_id_of,
)

WAL_MAGIC = b"\x89BFWAL\r\n"
CHUNK_HEADER = struct.Struct("<8sQ8s12sI")  # magic, chunk number, key id, nonce, ciphertext length (incl. tag)
SECTION_HEADER = struct.Struct("<HQQQII")  # disk id length, disk size, first seq, last seq, records, bytes
STREAM_BUFFER = 1024 * 1024  # records are encrypted (and handed out) in pieces of this size
AES_BLOCK = 16


@dataclass(frozen=True, slots=True)
class WalSection:
    """One disk's records from one chunk."""

    disk: str
    disk_size: int
    first_seq: int
    last_seq: int
    record_count: int
    records: memoryview

    def blob_header(self) -> BlobHeader:
        """The header :func:`protocol.logblob.iter_records` checks the records against."""
        return BlobHeader(self.disk, self.disk_size, self.first_seq, self.last_seq, self.record_count, 0, 0)


@dataclass(frozen=True, slots=True)
class WalChunk:
    number: int
    sections: list[WalSection]
    size: int  # bytes on disk, header and tag included


def section_header(disk: str, disk_size: int, first_seq: int, last_seq: int, record_count: int,
                   records_size: int) -> bytes:
    name = disk.encode()
    return SECTION_HEADER.pack(len(name), disk_size, first_seq, last_seq, record_count, records_size) + name


class WalSealer:
    """Encrypts chunks under one key, streaming: a chunk of any size passes through two small buffers,
    with neither a joined copy of all the records nor a chunk-sized output (a commit under load holds
    tens of MiB). Not thread-safe (the buffers): one per log writer.

    The records are gathered into a staging buffer and encrypted in one call per ``STREAM_BUFFER``, not
    one per record piece: every call releases the GIL, and in a thread beside the busy event loop each
    release costs up to a switch interval (5 ms) to win it back, which is latency for every write the
    chunk acknowledges. For the same reason the header shares the first view, so a chunk up to
    ``STREAM_BUFFER`` is written in one call."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"an AES-256 key is {KEY_SIZE} bytes, got {len(key)}")
        self._key = key
        self.key_id = key_id_of(key)
        self._staging = bytearray(STREAM_BUFFER)
        # the header, then ciphertext; update_into wants room for a block beyond its input
        self._buffer = bytearray(CHUNK_HEADER.size + STREAM_BUFFER + GCM_TAG_SIZE)

    @staticmethod
    def chunk_size(pieces: Sequence[bytes | memoryview]) -> int:
        """The bytes :meth:`seal` hands out for ``pieces``, header and tag included."""
        return CHUNK_HEADER.size + sum(map(len, pieces)) + GCM_TAG_SIZE

    def seal(self, number: int, pieces: Sequence[bytes | memoryview], nonce: bytes) -> Iterator[memoryview]:
        """The chunk of the concatenated ``pieces`` (section headers and records), in order, as views
        each valid only until the next is taken: one view for a chunk of up to ``STREAM_BUFFER`` bytes
        of pieces."""
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        out = memoryview(self._buffer)
        start = CHUNK_HEADER.size  # where the ciphertext of the current view starts
        CHUNK_HEADER.pack_into(out, 0, WAL_MAGIC, number, self.key_id, nonce, self.chunk_size(pieces) - start)
        encryptor = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(out[:start])
        staging = memoryview(self._staging)
        fill = 0
        for piece in pieces:
            rest = memoryview(piece)
            while rest:
                if fill == STREAM_BUFFER:  # only now: were these the last bytes, they and the tag are one view
                    yield out[:start + encryptor.update_into(staging, out[start:])]
                    start = fill = 0
                take = min(len(rest), STREAM_BUFFER - fill)
                staging[fill:fill + take] = rest[:take]
                fill += take
                rest = rest[take:]
        end = start + (encryptor.update_into(staging[:fill], out[start:]) if fill else 0)
        encryptor.finalize()
        out[end:end + GCM_TAG_SIZE] = encryptor.tag
        yield out[:end + GCM_TAG_SIZE]

    def open_range_into(self, nonce: bytes, offset: int, ciphertext: bytes | memoryview, out: memoryview) -> None:
        """Decrypt into ``out`` (as long as it) ``ciphertext``, the bytes at ``offset`` in the records of the
        chunk sealed with ``nonce`` — without the tag, which covers the whole chunk: this reads back a few
        records of a chunk this sealer wrote, and the caller checks them against the checksums it kept
        for them.

        GCM encrypts in counter mode: the first block of records uses counter block ``nonce ‖ 2``."""
        block, skip = divmod(offset, AES_BLOCK)
        counter = nonce + (2 + block).to_bytes(4, "big")
        decryptor = Cipher(algorithms.AES(self._key), modes.CTR(counter)).decryptor()
        if skip:
            decryptor.update(bytes(skip))
        decryptor.update_into(ciphertext, out)  # counter mode: finalize() adds nothing
        decryptor.finalize()


def read_chunk(data: bytes | memoryview, offset: int, keys: KeyLookup, *, name: str | None = None,
               floor: int = 0) -> WalChunk | None:
    """The chunk at ``offset``, or None where the log ends: no more bytes, or a chunk cut short or
    garbled by a crash during its write (never acknowledged, since acks follow the write's fsync).
    A chunk numbered below ``floor`` is None too, told by its header alone: in a recycled segment it is
    the file's old content, possibly sealed under a key retired since.

    Raises LogBlobError for a complete chunk sealed with a key the ring does not hold, or whose
    sections do not add up (a bug or tampering, not a torn write: the tag authenticated them).
    """
    view = memoryview(data)
    if len(view) - offset < CHUNK_HEADER.size:
        return None
    magic, number, key_id, nonce, length = CHUNK_HEADER.unpack_from(view, offset)
    end = offset + CHUNK_HEADER.size + length
    if magic != WAL_MAGIC or length < GCM_TAG_SIZE or end > len(view) or number < floor:
        return None
    key = keys(key_id)
    if key is None:
        raise LogBlobError(f"write-ahead log chunk {number} at offset {offset} was sealed with key id "
                           f"{key_id.hex()}, which is not in the key ring", name=name)
    try:
        plaintext = AESGCM(key).decrypt(nonce, view[offset + CHUNK_HEADER.size:end],
                                        view[offset:offset + CHUNK_HEADER.size])
    except InvalidTag:
        return None
    return WalChunk(number, _sections(memoryview(plaintext), number, name), end - offset)


def _sections(plaintext: memoryview, number: int, name: str | None) -> list[WalSection]:
    sections = []
    pos = 0
    while pos < len(plaintext):
        if len(plaintext) - pos < SECTION_HEADER.size:
            raise LogBlobError(f"write-ahead log chunk {number}: section header truncated", name=name)
        disk_len, disk_size, first, last, count, size = SECTION_HEADER.unpack_from(plaintext, pos)
        pos += SECTION_HEADER.size
        if len(plaintext) - pos < disk_len + size or first > last or count != last - first + 1:
            raise LogBlobError(f"write-ahead log chunk {number}: section of sequences {first}-{last} does not "
                               f"add up", name=name)
        disk = bytes(plaintext[pos:pos + disk_len]).decode()
        pos += disk_len
        sections.append(WalSection(disk, disk_size, first, last, count, plaintext[pos:pos + size]))
        pos += size
    return sections


def check_read_back(records: bytes | memoryview, disk: str, first_seq: int, checksums: Sequence[int | None],
                    headers_crc: int) -> None:
    """Raise LogBlobError, naming the disk and sequence, unless ``records`` (read back from the log with
    :meth:`WalSealer.open_range_into`) are the run of sequences from ``first_seq`` that was logged: one record
    per checksum, every write's body matching its checksum (the agent's CRC-32; None for a tag) and the
    rest — record headers, tags whole — matching ``headers_crc`` (:func:`headers_crc`). Counter mode
    without its tag lets a damaged bit through as exactly that bit, so every byte is covered by one."""
    header = BlobHeader(disk, 0, first_seq, first_seq + len(checksums) - 1, len(checksums), 0, 0)
    view = memoryview(records)
    pos, crc = 0, 0
    for record, checksum in zip(list(iter_records(view, header, name="(write-ahead log, read back)")), checksums):
        if isinstance(record, WriteRecord):
            crc = crc32(view[pos:pos + RECORD_HEADER.size], crc)
            pos += RECORD_HEADER.size + len(record.data)
            if checksum is not None and crc32(record.data) != checksum:
                raise LogBlobError(f"sequence {record.seq} read back from the write-ahead log fails its CRC-32",
                                   disk=disk)
        else:
            size = RECORD_HEADER.size + RECORD_HEADER.unpack_from(view, pos)[-1]
            crc = crc32(view[pos:pos + size], crc)
            pos += size
    if crc != headers_crc:
        raise LogBlobError(f"sequences {first_seq}-{header.last_seq} read back from the write-ahead log: their "
                           "record headers fail their CRC-32", disk=disk)


def headers_crc(records: Iterable[bytes | memoryview]) -> int:
    """CRC-32 over the records' parts a write's own checksum does not cover: the first piece of each
    record as the pipeline holds it (a write's header; a tag whole)."""
    crc = 0
    for first_piece in records:
        crc = crc32(first_piece, crc)
    return crc
