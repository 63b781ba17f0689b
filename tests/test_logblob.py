"""Sealed log blobs: round trips, tamper evidence, key handling, record validation, naming."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import LogBlobError
from protocol.frames import SECTOR_SIZE, TagKind
from protocol.logblob import (
    BLOB_SUFFIX,
    BLOB_VERSION,
    GCM_TAG_SIZE,
    HEADER_FIXED,
    KEY_ID_SIZE,
    MAGIC,
    NONCE_SIZE,
    RECORD_HEADER,
    BlobHeader,
    Codec,
    RecordType,
    Sealer,
    TagRecord,
    WriteRecord,
    blob_name,
    iter_records,
    key_id_of,
    open_blob,
    parse_blob_name,
    tag_record,
    write_record_header,
)

U64 = 2**64 - 1
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
NONCE = bytes(range(0xA0, 0xAC))
TS = 1_700_000_000_000_000

disk_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=NONCE_SIZE, max_size=NONCE_SIZE)
write_specs = st.tuples(st.just("w"), st.integers(0, 2**40), st.integers(0, 2**63),
                        st.binary(max_size=3 * SECTOR_SIZE) | st.integers(0, 4).map(lambda n: b"\0" * n * SECTOR_SIZE))
tag_specs = st.tuples(st.just("t"), st.sampled_from(TagKind), st.integers(0, 2**63), st.text(max_size=30))
record_specs = st.lists(write_specs | tag_specs, min_size=1, max_size=12)


def build(first_seq: int, specs) -> tuple[bytes, list]:
    """Records bytes and the records iter_records should yield for them."""
    out, expected = bytearray(), []
    for i, spec in enumerate(specs):
        seq = first_seq + i
        if spec[0] == "w":
            _, sector, ts, data = spec
            out += write_record_header(seq, ts, sector * SECTOR_SIZE, len(data)) + data
            expected.append(("w", seq, ts, sector * SECTOR_SIZE, data))
        else:
            _, kind, ts, tag_id = spec
            out += tag_record(seq, ts, kind, tag_id)
            expected.append(("t", seq, ts, kind, tag_id))
    return bytes(out), expected


def plain(record) -> tuple:
    if isinstance(record, WriteRecord):
        return ("w", record.seq, record.timestamp_us, record.offset, bytes(record.data))
    return ("t", record.seq, record.timestamp_us, record.kind, record.tag_id)


def header_for(disk: str, first_seq: int, count: int, **kw) -> BlobHeader:
    return BlobHeader(disk, kw.get("disk_size", 1 << 30), first_seq, first_seq + count - 1, count,
                      kw.get("created_us", TS + 1), kw.get("last_source_us", TS))


def ring(*ks: bytes):
    table = {key_id_of(k): k for k in ks}
    return table.get


def sample_blob(key: bytes = KEY, data: bytes = b"\0" * 1024) -> tuple[bytes, bytes]:
    records, _ = build(1, [("w", 8, TS, data), ("t", TagKind.APP, TS, "snap-1")])
    blob = bytes(Sealer(key).seal(records, header_for("vm1-disk0", 1, 2), NONCE))
    return blob, records


def open_fails(blob: bytes, keys=None, *, name: str | None = None) -> LogBlobError:
    with pytest.raises(LogBlobError) as info:
        open_blob(blob, keys or ring(KEY), name=name)
    return info.value


# ---------------------------------------------------------------- round trip


@settings(max_examples=120, deadline=None)
@given(specs=record_specs, key=keys, nonce=nonces, disk=disk_ids, first_seq=st.integers(1, 2**62),
       disk_size=st.integers(0, U64), created=st.integers(0, U64), last_source=st.integers(0, U64))
def test_seal_open_round_trip(specs, key, nonce, disk, first_seq, disk_size, created, last_source):
    records, expected = build(first_seq, specs)
    header = BlobHeader(disk, disk_size, first_seq, first_seq + len(specs) - 1, len(specs), created, last_source)
    blob = bytes(Sealer(key).seal(records, header, nonce))

    opened, plaintext = open_blob(blob, ring(key), name=blob_name(disk, first_seq, header.last_seq))
    assert bytes(plaintext) == records
    assert [plain(r) for r in iter_records(plaintext, opened)] == expected
    assert (opened.disk, opened.disk_size, opened.first_seq, opened.last_seq, opened.record_count) == (
        disk, disk_size, first_seq, first_seq + len(specs) - 1, len(specs))
    assert (opened.created_us, opened.last_source_us) == (created, last_source)
    assert (opened.key_id, opened.nonce, opened.version) == (key_id_of(key), nonce, BLOB_VERSION)
    assert opened.raw_size == len(records)
    assert len(blob) == HEADER_FIXED.size + len(disk.encode()) + opened.payload_size + GCM_TAG_SIZE
    assert blob.startswith(MAGIC)
    if opened.codec is Codec.NONE:
        assert opened.payload_size == opened.raw_size
    else:
        assert opened.payload_size < opened.raw_size


def test_incompressible_records_are_stored_uncompressed():
    noise = random.Random(1234).randbytes(8 * SECTOR_SIZE)
    blob, records = sample_blob(data=noise)
    header, plaintext = open_blob(blob, ring(KEY))
    assert header.codec is Codec.NONE
    assert header.payload_size == header.raw_size == len(records)
    assert blob[12] == Codec.NONE
    assert bytes(plaintext) == records
    assert noise[:64] not in blob  # stored, but still encrypted


def test_compressible_records_use_lz4():
    blob, records = sample_blob(data=b"\0" * 64 * SECTOR_SIZE)
    header, plaintext = open_blob(blob, ring(KEY))
    assert header.codec is Codec.LZ4_BLOCK and blob[12] == Codec.LZ4_BLOCK
    assert header.raw_size == len(records) and header.payload_size < len(records) // 10
    assert bytes(plaintext) == records


def test_seal_reuses_and_grows_the_output_buffer():
    sealer = Sealer(KEY)
    records, _ = build(1, [("w", 0, TS, b"\1" * 512)])
    big = bytearray(1 << 16)
    view = sealer.seal(records, header_for("d", 1, 1), NONCE, big)
    assert view.obj is big and len(view) < len(big)
    small = bytearray(8)
    view2 = sealer.seal(records, header_for("d", 1, 1), NONCE, small)
    assert view2.obj is not small
    assert bytes(view) == bytes(view2)
    assert open_blob(bytes(view2), ring(KEY))[1] == records


def test_sealer_rejects_bad_key_and_nonce_sizes():
    with pytest.raises(ValueError, match="32 bytes, got 16"):
        Sealer(b"k" * 16)
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        Sealer(KEY).seal(b"", header_for("d", 1, 1), b"n" * 8)


# ---------------------------------------------------------------- layout pins (docs/FORMAT.md)


def test_header_layout_offsets():
    assert HEADER_FIXED.size == 98 and RECORD_HEADER.size == 32
    h = BlobHeader("ab", 0x0102030405060708, 0x1111, 0x2222, 0x3333, 0x4444, 0x5555, b"K" * 8, b"N" * 12,
                   Codec.LZ4_BLOCK, 0x6666, 0x7777)
    b = h.pack()
    le = lambda off, size: int.from_bytes(b[off:off + size], "little")
    assert b[0:8] == b"\x89BFLOG\r\n"
    assert le(8, 2) == BLOB_VERSION == 1
    assert le(10, 2) == 100 == len(b)  # header_size = 98 + len(disk)
    assert b[12] == Codec.LZ4_BLOCK and b[13] == 1 and le(14, 2) == 0  # codec, cipher, flags
    assert b[16:24] == b"K" * 8 and b[24:36] == b"N" * 12
    assert (le(36, 8), le(44, 8), le(52, 4)) == (0x1111, 0x2222, 0x3333)
    assert (le(56, 8), le(64, 8), le(72, 8)) == (0x6666, 0x7777, 0x0102030405060708)
    assert (le(80, 8), le(88, 8), le(96, 2)) == (0x4444, 0x5555, 2)
    assert b[98:] == b"ab"
    assert BlobHeader.unpack(b) == h


def test_record_layout_offsets():
    w = write_record_header(0xAA, 0xBB, 0xCC00, 0x200)
    assert struct.unpack("<BBHQQQI", w) == (1, 0, 0, 0xAA, 0xBB, 0xCC00, 0x200)
    assert w[0] == RecordType.WRITE and int.from_bytes(w[4:12], "little") == 0xAA
    assert int.from_bytes(w[12:20], "little") == 0xBB and int.from_bytes(w[20:28], "little") == 0xCC00
    assert int.from_bytes(w[28:32], "little") == 0x200
    t = tag_record(7, 8, TagKind.APP, "é")
    assert t[0] == RecordType.TAG and t[1] == TagKind.APP and t[2:4] == b"\0\0"
    assert int.from_bytes(t[20:28], "little") == 0 and int.from_bytes(t[28:32], "little") == 2
    assert t[32:] == "é".encode()


def test_key_id_known_answer():
    assert key_id_of(KEY).hex() == "f926a0942886dd58"
    assert key_id_of(KEY) == hashlib.sha256(b"blockferry key id\x00" + KEY).digest()[:KEY_ID_SIZE]
    assert key_id_of(OTHER_KEY) != key_id_of(KEY)
    assert Sealer(KEY).key_id == key_id_of(KEY)


KNOWN_BLOB = bytes.fromhex(
    "8942464c4f470d0a01006b0001010000f926a0942886dd58a0a1a2a3a4a5a6a7a8a9aaab010000000000000002000000"
    "000000000200000046020000000000003700000000000000000000400000000020e12518240a060000401e18240a0600"
    "0900766d312d6469736b30a6197c2d45cf02be606516931962e4d476ac59009cb7716c9c0c2e8670a975fe3b5145fda8"
    "20571d5d9f06c8a97c83f94768282912fd2b5b2fb523175a5082f5bbb1949c97df78"
)


def test_known_answer_blob():
    """The test vector printed in docs/FORMAT.md opens to exactly these records."""
    header, plaintext = open_blob(KNOWN_BLOB, ring(KEY))
    assert header == BlobHeader("vm1-disk0", 1 << 30, 1, 2, 2, TS + 500_000, TS, key_id_of(KEY), NONCE,
                                Codec.LZ4_BLOCK, 582, 55)
    assert [plain(r) for r in iter_records(plaintext, header)] == [
        ("w", 1, TS, 4096, b"\0" * 512), ("t", 2, TS, TagKind.APP, "snap-1"),
    ]


# ---------------------------------------------------------------- tamper evidence


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_flipping_any_byte_fails_to_open(data):
    blob, _ = sample_blob()
    pos = data.draw(st.integers(0, len(blob) - 1), label="position")
    tampered = bytearray(blob)
    tampered[pos] ^= data.draw(st.integers(1, 255), label="xor")
    open_fails(bytes(tampered))


@pytest.mark.parametrize("incompressible", [False, True])
def test_flipping_each_byte_fails_to_open(incompressible):
    blob, _ = sample_blob(data=random.Random(5).randbytes(512) if incompressible else b"\0" * 512)
    reasons = set()
    for pos in range(len(blob)):
        tampered = bytearray(blob)
        tampered[pos] ^= 0x80
        reasons.add(open_fails(bytes(tampered)).reason.split(":")[0].split(" ")[0])
    assert {"authentication", "not", "unsupported", "no", "size"} <= reasons


def test_wrong_key_fails_authentication():
    blob, _ = sample_blob()
    exc = open_fails(blob, lambda key_id: OTHER_KEY, name="vm1-disk0/x.bflog")  # same id, wrong key
    assert exc.reason == "authentication failed: the blob was altered or sealed with another key"
    assert exc.disk == "vm1-disk0" and exc.name == "vm1-disk0/x.bflog"
    assert str(exc).startswith("disk 'vm1-disk0', blob vm1-disk0/x.bflog: authentication failed")


def test_unknown_key_id():
    blob, _ = sample_blob()
    exc = open_fails(blob, ring(OTHER_KEY))
    assert exc.reason == f"no key with id {key_id_of(KEY).hex()} in the key ring"


def test_key_ring_with_several_keys():
    blob, records = sample_blob(key=OTHER_KEY)
    assert open_blob(blob, ring(KEY, OTHER_KEY))[1] == records


@pytest.mark.parametrize("cut", [0, 1, 8, HEADER_FIXED.size - 1])
def test_truncated_inside_the_fixed_header(cut):
    blob, _ = sample_blob()
    exc = open_fails(blob[:cut])
    assert exc.reason == f"truncated: {cut} bytes is shorter than the header"


def test_truncated_inside_the_disk_id():
    blob, _ = sample_blob()
    assert open_fails(blob[:HEADER_FIXED.size + 3]).reason == "truncated or inconsistent header size"


@pytest.mark.parametrize("delta", [-GCM_TAG_SIZE - 1, -GCM_TAG_SIZE, -1, 1, 100])
def test_truncated_or_extended_payload(delta):
    blob, _ = sample_blob()
    bad = blob[:delta] if delta < 0 else blob + b"\0" * delta
    exc = open_fails(bad)
    assert exc.reason == f"size {len(bad)} bytes, header says {len(blob)}"


def test_every_truncation_fails():
    blob, _ = sample_blob()
    for cut in range(len(blob)):
        open_fails(blob[:cut])


def _header_bytes(**overrides) -> bytes:
    fields = {"magic": MAGIC, "version": 1, "header_size": 99, "codec": 1, "cipher": 1, "flags": 0,
              "key_id": b"k" * 8, "nonce": b"n" * 12, "first": 1, "last": 1, "count": 1, "raw": 0, "payload": 0,
              "disk_size": 0, "created": 0, "src": 0, "disk_len": 1}
    fields.update(overrides)
    return HEADER_FIXED.pack(*fields.values()) + b"d" + b"\0" * GCM_TAG_SIZE


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"magic": b"\x89PNG\r\n\x1a\n"}, "not a log blob (bad magic)"),
    ({"version": 2}, "unsupported log-blob version 2 (this build reads 1)"),
    ({"codec": 7}, "unknown codec 7 or cipher 1"),
    ({"cipher": 2}, "unknown codec 1 or cipher 2"),
    ({"header_size": 98}, "truncated or inconsistent header size"),
    ({"first": 5, "last": 4}, "first sequence 5 > last sequence 4"),
])
def test_header_rejections(overrides, reason):
    exc = open_fails(_header_bytes(**overrides))
    assert exc.reason == reason


def test_disk_id_must_be_utf8():
    blob = bytearray(_header_bytes())
    blob[HEADER_FIXED.size] = 0xFF
    assert open_fails(bytes(blob)).reason == "disk id is not UTF-8"


def _assert_no_key_material(exc: Exception, key: bytes) -> None:
    for text in (str(exc), repr(exc), exc.reason, " ".join(map(str, exc.args))):
        assert key.hex() not in text.lower()
        assert key.decode("latin-1") not in text
        assert repr(key) not in text and str(list(key)) not in text


@settings(max_examples=60, deadline=None)
@given(key=keys, wrong=keys, data=st.data())
def test_errors_never_contain_key_bytes(key, wrong, data):
    blob, _ = sample_blob(key=key)
    tampered = bytearray(blob)
    tampered[data.draw(st.integers(0, len(blob) - 1), label="pos")] ^= 1
    cases = [
        (blob, (lambda _id: wrong) if wrong != key else ring()),  # wrong key / unknown key
        (blob, ring(wrong) if key_id_of(wrong) != key_id_of(key) else ring()),  # unknown key id
        (bytes(tampered), ring(key)),  # altered
        (blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")], ring(key)),  # truncated
    ]
    for bad, lookup in cases:
        with pytest.raises(LogBlobError) as info:
            open_blob(bad, lookup, name="d/n.bflog")
        _assert_no_key_material(info.value, key)
        _assert_no_key_material(info.value, wrong)


def test_unknown_key_message_names_only_the_key_id():
    blob, _ = sample_blob()
    exc = open_fails(blob, ring(OTHER_KEY))
    assert key_id_of(KEY).hex() in str(exc)
    _assert_no_key_material(exc, KEY)
    _assert_no_key_material(exc, OTHER_KEY)


# ---------------------------------------------------------------- record validation


def _records_fail(records: bytes, header: BlobHeader) -> LogBlobError:
    with pytest.raises(LogBlobError) as info:
        list(iter_records(records, header, name="n"))
    assert info.value.disk == header.disk and info.value.name == "n"
    return info.value


@settings(max_examples=60, deadline=None)
@given(specs=record_specs, first_seq=st.integers(1, 2**40), data=st.data())
def test_iter_records_requires_contiguous_sequences(specs, first_seq, data):
    records, _ = build(first_seq, specs)
    header = header_for("d", first_seq, len(specs))
    assert len(list(iter_records(records, header))) == len(specs)
    # rewrite one record's sequence number: a gap, a repeat or a reordering
    index = data.draw(st.integers(0, len(specs) - 1), label="index")
    pos = 0
    for _ in range(index):
        pos += RECORD_HEADER.size + struct.unpack_from("<I", records, pos + 28)[0]
    seq = first_seq + index
    new_seq = data.draw(st.integers(0, 2**41).filter(lambda s: s != seq), label="new seq")
    bad = bytearray(records)
    struct.pack_into("<Q", bad, pos + 4, new_seq)
    exc = _records_fail(bytes(bad), header)
    assert f"record {index} (sequence {new_seq}) is out of bounds or out of order" in exc.reason


def test_iter_records_checks_record_count_and_last_seq():
    records, _ = build(10, [("w", 0, TS, b"a" * 512), ("t", TagKind.CRASH, TS, "x")])
    good = header_for("d", 10, 2)
    assert [r.seq for r in iter_records(records, good)] == [10, 11]
    count_wrong = BlobHeader("d", 1 << 30, 10, 11, 3, 0, 0)
    assert _records_fail(records, count_wrong).reason == "2 records ending at sequence 11, header says 3 ending at 11"
    last_wrong = BlobHeader("d", 1 << 30, 10, 12, 2, 0, 0)
    assert _records_fail(records, last_wrong).reason == "2 records ending at sequence 11, header says 2 ending at 12"
    assert _records_fail(b"", good).reason == "0 records ending at sequence 9, header says 2 ending at 11"


def test_iter_records_bounds():
    records, _ = build(1, [("w", 0, TS, b"a" * 512)])
    header = header_for("d", 1, 1)
    assert _records_fail(records[:-1], header).reason == "record 0 (sequence 1) is out of bounds or out of order"
    assert _records_fail(records + b"\0" * 5, BlobHeader("d", 0, 1, 2, 2, 0, 0)).reason == "record 1 is truncated"


def test_iter_records_unknown_type():
    bad = bytearray(write_record_header(1, TS, 0, 0))
    bad[0] = 9
    assert _records_fail(bytes(bad), header_for("d", 1, 1)).reason == "record 0 has unknown type 9"
    bad_kind = bytearray(tag_record(1, TS, TagKind.APP, "x"))
    bad_kind[1] = 7  # a tag record of unknown kind is refused too
    _records_fail(bytes(bad_kind), header_for("d", 1, 1))


def test_iter_records_yields_zero_copy_write_data():
    records, _ = build(1, [("w", 3, TS, b"z" * 512)])
    (rec,) = iter_records(records, header_for("d", 1, 1))
    assert isinstance(rec, WriteRecord) and rec.offset == 3 * SECTOR_SIZE
    assert isinstance(rec.data, memoryview) and rec.data.obj is records
    (tag,) = iter_records(tag_record(1, 5, TagKind.CRASH, "snap ✓"), header_for("d", 1, 1))
    assert tag == TagRecord(1, 5, TagKind.CRASH, "snap ✓")


# ---------------------------------------------------------------- names

seqs = st.integers(0, U64)


@settings(max_examples=200, deadline=None)
@given(disk=disk_ids, first=seqs, last=seqs)
def test_blob_name_round_trip(disk, first, last):
    name = blob_name(disk, first, last)
    assert name == f"{disk}/{first:020d}-{last:020d}.bflog"
    assert len(name) == len(disk) + 1 + 20 + 1 + 20 + len(BLOB_SUFFIX)
    assert parse_blob_name(name) == (disk, first, last)


@settings(max_examples=100, deadline=None)
@given(ranges=st.lists(st.tuples(disk_ids, seqs, seqs), min_size=1, max_size=20))
def test_blob_names_sort_by_disk_then_sequence(ranges):
    names = sorted(blob_name(*r) for r in ranges)
    parsed = [parse_blob_name(n) for n in names]
    # within a disk, string order is numeric order
    for disk in {d for d, _, _ in parsed}:
        mine = [(f, l) for d, f, l in parsed if d == disk]
        assert mine == sorted(mine)
    # and each disk's blobs are contiguous in a sorted listing ('/' never occurs in a disk id)
    order = [d for d, _, _ in parsed]
    firsts = {d: order.index(d) for d in order}
    lasts = {d: len(order) - 1 - order[::-1].index(d) for d in order}
    assert all(order[firsts[d]:lasts[d] + 1] == [d] * (lasts[d] - firsts[d] + 1) for d in firsts)


def test_sort_order_examples():
    names = [blob_name("vm", 10, 19), blob_name("vm", 2, 9), blob_name("vm", 100, 100), blob_name("vm", 1, 1)]
    assert [parse_blob_name(n)[1] for n in sorted(names)] == [1, 2, 10, 100]


@pytest.mark.parametrize("name", [
    "00000000000000000001-00000000000000000002.bflog",  # no disk
    "/00000000000000000001-00000000000000000002.bflog",
    "d/00000000000000000001-00000000000000000002.bflo",
    "d/00000000000000000001-00000000000000000002.bflog.tmp",
    "d/00000000000000000001_00000000000000000002.bflog",
    "d/-00000000000000000002.bflog",
    "d/x-1.bflog",
    "d/1-+2.bflog",
    "d/ 1-2.bflog",
    "d/manifest.json",
    "",
])
def test_parse_blob_name_rejects_other_names(name):
    assert parse_blob_name(name) is None


def test_parse_blob_name_rejects_unicode_digits():
    assert parse_blob_name("d/²-1.bflog") is None
