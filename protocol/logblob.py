"""The log-blob format: what the process server stores in the cache store.

A log blob is one sealed batch of one disk::

    header (fixed part + disk id, authenticated as GCM associated data)
    AES-256-GCM( codec( records ) )  + 16-byte tag

Records are a plain concatenation of ``RECORD_HEADER`` + body. Every field of the
header is covered by the GCM tag, so a blob whose sequence range, disk or sizes
were altered fails to open exactly like one whose payload was. The byte-level
specification is docs/FORMAT.md; this module is the reference implementation.
Pure computation: the caller supplies nonces, clocks and buffers.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.errors import LogBlobError
from protocol.frames import TagKind

MAGIC = b"\x89BFLOG\r\n"
BLOB_VERSION = 1
KEY_SIZE = 32
KEY_ID_SIZE = 8
NONCE_SIZE = 12
GCM_TAG_SIZE = 16
BLOB_SUFFIX = ".bflog"

HEADER_FIXED = struct.Struct("<8sHHBBH8s12sQQIQQQQQH")
RECORD_HEADER = struct.Struct("<BBHQQQI")  # type, tag kind, reserved, seq, timestamp_us, offset, length


class Codec(IntEnum):
    NONE = 0
    LZ4_BLOCK = 1


class Cipher(IntEnum):
    AES_256_GCM = 1


class RecordType(IntEnum):
    WRITE = 1
    TAG = 2


@dataclass(frozen=True, slots=True)
class BlobHeader:
    disk: str
    disk_size: int
    first_seq: int
    last_seq: int
    record_count: int
    created_us: int
    last_source_us: int
    key_id: bytes = b"\0" * KEY_ID_SIZE
    nonce: bytes = b"\0" * NONCE_SIZE
    codec: Codec = Codec.LZ4_BLOCK
    raw_size: int = 0
    payload_size: int = 0
    version: int = BLOB_VERSION

    @property
    def size(self) -> int:
        return HEADER_FIXED.size + len(self.disk.encode())

    def pack(self) -> bytes:
        disk = self.disk.encode()
        return HEADER_FIXED.pack(
            MAGIC, self.version, HEADER_FIXED.size + len(disk), self.codec, Cipher.AES_256_GCM, 0,
            self.key_id, self.nonce, self.first_seq, self.last_seq, self.record_count, self.raw_size,
            self.payload_size, self.disk_size, self.created_us, self.last_source_us, len(disk),
        ) + disk

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, name: str | None = None) -> BlobHeader:
        """Parse (not authenticate) a header; enough to list and route a blob."""
        if len(data) < HEADER_FIXED.size:
            raise LogBlobError(f"truncated: {len(data)} bytes is shorter than the header", name=name)
        (magic, version, header_size, codec, cipher, _flags, key_id, nonce, first_seq, last_seq, count,
         raw_size, payload_size, disk_size, created_us, last_source_us, disk_len) = HEADER_FIXED.unpack_from(data)
        if magic != MAGIC:
            raise LogBlobError("not a log blob (bad magic)", name=name)
        if version != BLOB_VERSION:
            raise LogBlobError(f"unsupported log-blob version {version} (this build reads {BLOB_VERSION})", name=name)
        if header_size != HEADER_FIXED.size + disk_len or len(data) < header_size:
            raise LogBlobError("truncated or inconsistent header size", name=name)
        if codec not in Codec._value2member_map_ or cipher != Cipher.AES_256_GCM:
            raise LogBlobError(f"unknown codec {codec} or cipher {cipher}", name=name)
        try:
            disk = bytes(data[HEADER_FIXED.size:header_size]).decode()
        except UnicodeDecodeError:
            raise LogBlobError("disk id is not UTF-8", name=name) from None
        if first_seq > last_seq:
            raise LogBlobError(f"first sequence {first_seq} > last sequence {last_seq}", disk=disk, name=name)
        return cls(disk, disk_size, first_seq, last_seq, count, created_us, last_source_us, key_id, nonce,
                   Codec(codec), raw_size, payload_size, version)


@dataclass(frozen=True, slots=True)
class WriteRecord:
    seq: int
    timestamp_us: int
    offset: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class TagRecord:
    seq: int
    timestamp_us: int
    kind: TagKind
    tag_id: str


Record = WriteRecord | TagRecord


def write_record_header(seq: int, timestamp_us: int, offset: int, length: int) -> bytes:
    return RECORD_HEADER.pack(RecordType.WRITE, 0, 0, seq, timestamp_us, offset, length)


def tag_record(seq: int, timestamp_us: int, kind: TagKind, tag_id: str) -> bytes:
    body = tag_id.encode()
    return RECORD_HEADER.pack(RecordType.TAG, kind, 0, seq, timestamp_us, 0, len(body)) + body


def key_id_of(key: bytes) -> bytes:
    """A key's public name: safe to log and to store, reveals nothing about the key."""
    return hashlib.sha256(b"blockferry key id\0" + key).digest()[:KEY_ID_SIZE]


class Sealer:
    """Compress and encrypt batches under one key. Thread-safe (AESGCM is)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"an AES-256 key is {KEY_SIZE} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.key_id = key_id_of(key)

    def seal(self, records: bytes | bytearray | memoryview, header: BlobHeader, nonce: bytes,
             out: bytearray | None = None) -> memoryview:
        """Seal ``records`` into ``out`` (grown if too small) and return the used part.

        Reusing ``out`` across batches avoids a fresh multi-MiB allocation per blob,
        which costs page faults that dominate AES-GCM on small machines.
        """
        if len(nonce) != NONCE_SIZE:
            raise ValueError("nonce must be 12 bytes")
        compressed = lz4.block.compress(records, store_size=False)
        codec = Codec.LZ4_BLOCK
        payload: bytes | bytearray | memoryview = compressed
        if len(compressed) >= len(records):  # incompressible: store, and skip decompression on apply
            codec, payload = Codec.NONE, records
        full = BlobHeader(
            header.disk, header.disk_size, header.first_seq, header.last_seq, header.record_count,
            header.created_us, header.last_source_us, self.key_id, nonce, codec, len(records), len(payload),
        )
        head = full.pack()
        total = len(head) + len(payload) + GCM_TAG_SIZE
        if out is None or len(out) < total:
            out = bytearray(total)
        view = memoryview(out)
        view[:len(head)] = head
        self._aead.encrypt_into(nonce, payload, head, view[len(head):total])
        return view[:total]


KeyLookup = Callable[[bytes], bytes | None]


def open_blob(data: bytes | memoryview, keys: KeyLookup, *, name: str | None = None) -> tuple[BlobHeader, bytes]:
    """Authenticate, decrypt and decompress a blob; returns its header and records.

    Raises LogBlobError with a reason an operator can act on; never returns
    unauthenticated bytes.
    """
    header, payload = authenticate_blob(data, keys, name=name)
    if header.codec is Codec.NONE:
        records = payload
    else:
        try:
            records = lz4.block.decompress(payload, uncompressed_size=header.raw_size)
        except lz4.block.LZ4BlockError as exc:
            raise LogBlobError(f"lz4 decompression failed: {exc}", disk=header.disk, name=name) from None
    if len(records) != header.raw_size:
        raise LogBlobError(f"records are {len(records)} bytes, header says {header.raw_size}",
                           disk=header.disk, name=name)
    return header, records


def authenticate_blob(data: bytes | memoryview, keys: KeyLookup, *,
                      name: str | None = None) -> tuple[BlobHeader, bytes]:
    """Authenticate and decrypt a blob, not decompress it: its header and its (compressed) payload."""
    header = BlobHeader.unpack(data, name=name)
    expected = header.size + header.payload_size + GCM_TAG_SIZE
    if len(data) != expected:
        raise LogBlobError(f"size {len(data)} bytes, header says {expected}", disk=header.disk, name=name)
    key = keys(header.key_id)
    if key is None:
        raise LogBlobError(f"no key with id {header.key_id.hex()} in the key ring", disk=header.disk, name=name)
    view = memoryview(data)
    try:
        payload = AESGCM(key).decrypt(header.nonce, view[header.size:], view[:header.size])
    except InvalidTag:
        raise LogBlobError("authentication failed: the blob was altered or sealed with another key",
                           disk=header.disk, name=name) from None
    return header, payload


def iter_records(records: bytes | memoryview, header: BlobHeader, *, name: str | None = None) -> Iterator[Record]:
    """Records of an opened blob, with their bounds and sequence range checked."""
    view = memoryview(records)
    pos, end, count = 0, len(view), 0
    expected_seq = header.first_seq
    while pos < end:
        if end - pos < RECORD_HEADER.size:
            raise LogBlobError(f"record {count} is truncated", disk=header.disk, name=name)
        rtype, kind, _, seq, ts, offset, length = RECORD_HEADER.unpack_from(view, pos)
        pos += RECORD_HEADER.size
        if end - pos < length or seq != expected_seq:
            raise LogBlobError(f"record {count} (sequence {seq}) is out of bounds or out of order",
                               disk=header.disk, name=name)
        body = view[pos:pos + length]
        pos += length
        if rtype == RecordType.WRITE:
            yield WriteRecord(seq, ts, offset, body)
        elif rtype == RecordType.TAG:
            if kind not in TagKind._value2member_map_:
                raise LogBlobError(f"record {count} is a tag of unknown kind {kind}", disk=header.disk, name=name)
            yield TagRecord(seq, ts, TagKind(kind), bytes(body).decode(errors="replace"))
        else:
            raise LogBlobError(f"record {count} has unknown type {rtype}", disk=header.disk, name=name)
        count += 1
        expected_seq += 1
    if count != header.record_count or expected_seq - 1 != header.last_seq:
        raise LogBlobError(f"{count} records ending at sequence {expected_seq - 1}, header says "
                           f"{header.record_count} ending at {header.last_seq}", disk=header.disk, name=name)


_BLOB_NAME = re.compile(r"(?P<disk>[^/]+)/(?P<first>[0-9]{20})-(?P<last>[0-9]{20})" + re.escape(BLOB_SUFFIX), re.ASCII)


def blob_name(disk: str, first_seq: int, last_seq: int) -> str:
    """Deterministic name: the same sequence range always maps to the same blob (idempotent uploads)."""
    return f"{disk}/{first_seq:020d}-{last_seq:020d}{BLOB_SUFFIX}"


def check_named(header: BlobHeader, name: str) -> None:
    """A blob under ``name`` must hold that blob: a reused spool file, or a blob put under another's name,
    holds other records. LogBlobError names the blob it holds."""
    held = blob_name(header.disk, header.first_seq, header.last_seq)
    if held != name:
        raise LogBlobError(f"holds blob {held}, which does not match its name", name=name)


def parse_blob_name(name: str) -> tuple[str, int, int] | None:
    """Inverse of :func:`blob_name`; ``None`` for names that are not log blobs."""
    match = _BLOB_NAME.fullmatch(name)
    if match is None:
        return None
    return match["disk"], int(match["first"]), int(match["last"])
