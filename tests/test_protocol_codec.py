"""Frame codec: encode -> FrameDecoder round trips, stream splitting, hostile input.

The byte-level format under test is specified in docs/FORMAT.md; the known-answer
tests below pin the exact bytes that document shows.
"""

from __future__ import annotations

import itertools
import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import (
    DEFAULT_MAX_FRAME,
    FRAME_HEADER,
    UNSIZED_BUFFER,
    WRITE_HEADER,
    FrameDecoder,
    decode_body,
    encode,
    encode_write_header,
)
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
    Ack,
    DiskOpened,
    Error,
    FrameType,
    Heartbeat,
    Hello,
    OpenDisk,
    Tag,
    TagKind,
    Welcome,
    Write,
)

U32 = 2**32 - 1
U64 = 2**64 - 1
FAST = settings(max_examples=150, deadline=None)

# ---------------------------------------------------------------- strategies

u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
text = st.text(max_size=40)  # hypothesis never generates lone surrogates here
disk_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)

hellos = st.builds(Hello, u64, text, text)
welcomes = st.builds(Welcome, u64, text, u64)
open_disks = st.builds(OpenDisk, u32, disk_ids, u64, u64)
disk_openeds = st.builds(DiskOpened, u32, disk_ids, u64)
writes = st.builds(
    lambda h, s, o, t, d: Write.make(h, s, o, d, t), u32, u64, u64, u64, st.binary(max_size=1536)
)
tags = st.builds(Tag, u32, u64, st.sampled_from(TagKind), text, u64)
acks = st.builds(Ack, st.lists(st.tuples(u32, u64), max_size=8).map(tuple))
errors = st.builds(Error, st.sampled_from(ErrorCode), text, st.none() | disk_ids, st.none() | u64)
heartbeats = st.builds(Heartbeat, u64)

STRATEGIES = {
    FrameType.HELLO: hellos,
    FrameType.WELCOME: welcomes,
    FrameType.OPEN_DISK: open_disks,
    FrameType.DISK_OPENED: disk_openeds,
    FrameType.WRITE: writes,
    FrameType.TAG: tags,
    FrameType.ACK: acks,
    FrameType.ERROR: errors,
    FrameType.HEARTBEAT: heartbeats,
}
FRAME_CLASS = {
    FrameType.HELLO: Hello, FrameType.WELCOME: Welcome, FrameType.OPEN_DISK: OpenDisk,
    FrameType.DISK_OPENED: DiskOpened, FrameType.WRITE: Write, FrameType.TAG: Tag, FrameType.ACK: Ack,
    FrameType.ERROR: Error, FrameType.HEARTBEAT: Heartbeat,
}
any_frame = st.one_of(*STRATEGIES.values())


def as_plain(frame):
    """A comparable value for a frame: Write.data (a memoryview after decoding) as bytes."""
    if isinstance(frame, Write):
        return ("Write", frame.handle, frame.seq, frame.offset, frame.timestamp_us, bytes(frame.data), frame.checksum)
    return frame


def decode_all(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> list:
    dec = FrameDecoder(max_frame)
    frames = dec.feed(data)
    dec.eof()
    return frames


def frame_bytes(frame_type: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(len(body), frame_type) + body


def raises_remote(data: bytes, code: ErrorCode, max_frame: int = DEFAULT_MAX_FRAME) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, max_frame)
    assert info.value.code is code, str(info.value)
    return info.value


# ---------------------------------------------------------------- round trips


def test_every_frame_type_has_a_strategy():
    assert set(STRATEGIES) == set(FrameType)


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_each_frame_type(frame_type, data):
    frame = data.draw(STRATEGIES[frame_type])
    wire = encode(frame)
    length, type_byte = FRAME_HEADER.unpack_from(wire)
    assert type_byte == frame_type
    assert length == len(wire) - FRAME_HEADER.size
    dec = FrameDecoder()
    out = dec.feed(wire)
    assert len(out) == 1
    assert type(out[0]) is FRAME_CLASS[frame_type]
    assert as_plain(out[0]) == as_plain(frame)
    assert dec.buffered == 0
    dec.eof()  # ends on a frame boundary: no error


@FAST
@given(writes)
def test_write_header_plus_payload_is_the_frame(write):
    head = encode_write_header(write)
    assert len(head) == FRAME_HEADER.size + WRITE_HEADER.size
    assert head + bytes(write.data) == encode(write)
    assert FRAME_HEADER.unpack_from(head) == (WRITE_HEADER.size + len(write.data), FrameType.WRITE)
    assert WRITE_HEADER.unpack_from(head, FRAME_HEADER.size) == (
        write.handle, write.seq, write.offset, write.timestamp_us, zlib.crc32(bytes(write.data)),
    )


def test_known_answer_bytes():
    """The example bytes shown in docs/FORMAT.md."""
    assert encode(Heartbeat(1)).hex() == "0a0000000981a774696d655f757301"
    assert encode(Ack(((7, 42),))).hex() == "0a0000000781a461636b739192072a"
    assert encode(Hello(1, "agent-1", "s3cret")).hex() == (
        "250000000183a776657273696f6e01a56167656e74a76167656e742d31a5746f6b656ea6733363726574"
    )
    write = Write.make(7, 42, 4096, b"\xab" * 512, 1_700_000_000_000_000)
    assert write.checksum == 0x3FABE07A
    assert encode_write_header(write).hex() == (
        "20020000" "05" "07000000" "2a00000000000000" "0010000000000000" "00401e18240a0600" "7ae0ab3f"
    )
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 variant the format uses


def test_whole_frame_in_one_chunk_is_zero_copy():
    wire = encode(Write.make(1, 1, 0, b"z" * 512, 5))
    frames = FrameDecoder().feed(wire)
    assert isinstance(frames[0].data, memoryview)
    assert frames[0].data.obj is wire
    assert bytes(frames[0].data) == b"z" * 512


def test_unknown_map_keys_are_ignored():
    body = msgpack.packb({"time_us": 9, "future_field": [1, 2]})
    assert decode_all(frame_bytes(FrameType.HEARTBEAT, body)) == [Heartbeat(9)]


def test_error_frame_optional_fields_and_unknown_code():
    body = msgpack.packb({"code": 999, "message": "later version"})
    assert decode_all(frame_bytes(FrameType.ERROR, body)) == [Error(ErrorCode.INTERNAL, "later version", None, None)]
    body = msgpack.packb({"code": 13, "message": "gap", "disk": "d1", "seq": 5})
    assert decode_all(frame_bytes(FrameType.ERROR, body)) == [Error(ErrorCode.SEQUENCE_GAP, "gap", "d1", 5)]


# ---------------------------------------------------------------- splitting


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(any_frame, min_size=1, max_size=12), data=st.data())
def test_arbitrary_splits_yield_the_same_frames(frames, data):
    stream = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=30), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    dec = FrameDecoder()
    out = []
    for a, b in itertools.pairwise(bounds):
        out += dec.feed(stream[a:b])
        assert dec.buffered <= dec.max_frame + FRAME_HEADER.size
    dec.eof()
    assert [as_plain(f) for f in out] == [as_plain(f) for f in frames]


def read_into(dec: FrameDecoder, stream: bytes, reads: list[int]) -> list:
    """What a buffered transport does: ask for a buffer (hinting what is pending), fill what fits of it."""
    out, pos = [], 0
    for want in [*reads, len(stream)]:
        while pos < len(stream) and want > 0:
            buf = dec.get_buffer(len(stream) - pos)
            n = min(len(buf), want, len(stream) - pos)
            buf[:n] = stream[pos:pos + n]
            pos, want = pos + n, want - n
            out += dec.buffer_updated(n)
            assert dec.buffered <= dec.max_frame + FRAME_HEADER.size
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(any_frame, min_size=1, max_size=12), data=st.data())
def test_reads_into_lent_buffers_yield_the_same_frames(frames, data):
    stream = b"".join(encode(f) for f in frames)
    reads = data.draw(st.lists(st.integers(1, max(1, len(stream))), max_size=30), label="reads")
    dec = FrameDecoder()
    out = read_into(dec, stream, reads)
    dec.eof()
    assert [as_plain(f) for f in out] == [as_plain(f) for f in frames]


def test_a_split_body_is_read_into_place():
    """The rest of a body split across reads is lent out itself, so the payload is never copied."""
    first, second = Write.make(1, 1, 0, b"a" * 1000, 5), Write.make(1, 2, 0, b"b" * 1000, 6)
    stream = encode(first) + encode(second)
    dec = FrameDecoder()
    lent = dec.get_buffer(300)  # the first frame's header and 300 - 5 bytes of its body
    lent[:300] = stream[:300]
    assert dec.buffer_updated(300) == []
    rest = dec.get_buffer(len(stream) - 300)
    assert len(rest) == len(encode(first)) - 300  # exactly the rest of that body
    rest[:] = stream[300:len(encode(first))]
    (frame,) = dec.buffer_updated(len(rest))
    assert frame.data.obj is rest.obj and bytes(frame.data) == b"a" * 1000
    whole = dec.get_buffer(len(encode(second)))
    whole[:] = encode(second)
    (frame,) = dec.buffer_updated(len(whole))
    assert frame.data.obj is whole.obj  # a whole frame in a lent buffer is zero copy too


@pytest.mark.parametrize("hint", [-1, 0, 3])
def test_no_size_hint_lends_a_buffer_for_more_than_a_header(hint):
    """asyncio's own loop may hint nothing: a header-sized buffer would cost a read per frame header."""
    dec = FrameDecoder()
    wire = encode(Write.make(1, 1, 0, b"h" * 1000, 5)) * 3
    buf = dec.get_buffer(hint)
    assert len(buf) == UNSIZED_BUFFER
    buf[:len(wire)] = wire
    assert [bytes(f.data) for f in dec.buffer_updated(len(wire))] == [b"h" * 1000] * 3


def test_a_failed_decoder_still_lends_a_buffer_and_raises_on_update():
    dec = FrameDecoder(max_frame=10)
    buf = dec.get_buffer(64)
    buf[:5] = FRAME_HEADER.pack(11, 1)
    with pytest.raises(RemoteProtocolError) as first:
        dec.buffer_updated(5)
    assert len(dec.get_buffer(64)) == 64  # the transport's bytes still go somewhere
    with pytest.raises(RemoteProtocolError) as again:
        dec.buffer_updated(64)
    assert again.value is first.value


def test_one_byte_at_a_time():
    frames = [
        Hello(PROTOCOL_VERSION, "a", "t"), OpenDisk(3, "disk-0", 1 << 30, 4096), Write.make(3, 1, 512, b"q" * 1024, 7),
        Tag(3, 2, TagKind.APP, "snap", 8), Write.make(3, 3, 0, b"", 9), Heartbeat(10),
    ]
    stream = b"".join(encode(f) for f in frames)
    dec = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i:i + 1])
        assert dec.buffered <= 1024 + WRITE_HEADER.size
    dec.eof()
    assert [as_plain(f) for f in out] == [as_plain(f) for f in frames]


def test_split_body_buffered_count():
    wire = encode(Write.make(1, 1, 0, b"x" * 1000, 0))
    dec = FrameDecoder()
    assert dec.feed(wire[:3]) == []
    assert dec.buffered == 3  # partial header
    assert dec.feed(wire[3:100]) == []
    assert dec.buffered == 100 - FRAME_HEADER.size  # header consumed, 95 body bytes held
    (frame,) = dec.feed(wire[100:])
    assert dec.buffered == 0
    assert bytes(frame.data) == b"x" * 1000


# ---------------------------------------------------------------- hostile input


def _feed_checked(dec: FrameDecoder, stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` in pieces; only RemoteProtocolError may escape, buffering stays bounded."""
    bounds = [0, *sorted(cuts), len(stream)]
    try:
        for a, b in itertools.pairwise(bounds):
            dec.feed(stream[a:b])
            assert dec.buffered <= dec.max_frame + FRAME_HEADER.size
        dec.eof()
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        with pytest.raises(RemoteProtocolError) as again:  # out of sync: refuses further input
            dec.feed(b"\0" * 16)
        assert again.value is exc


@settings(max_examples=300, deadline=None)
@given(
    garbage=st.binary(max_size=3000),
    max_frame=st.sampled_from([0, 1, 64, 1024, DEFAULT_MAX_FRAME]),
    verify=st.booleans(),
    data=st.data(),
)
def test_random_garbage_only_raises_remote_protocol_error(garbage, max_frame, verify, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=10), label="cuts")
    _feed_checked(FrameDecoder(max_frame, verify_checksums=verify), garbage, cuts)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), U64) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from([
    "version", "agent", "token", "server", "max_frame", "handle", "disk", "size", "block_size", "resume_seq",
    "seq", "kind", "id", "timestamp_us", "acks", "code", "message", "time_us",
])


@settings(max_examples=300, deadline=None)
@given(
    frame_type=st.integers(0, 12),
    body=st.dictionaries(field_names, msgpack_values, max_size=8) | msgpack_values,
    verify=st.booleans(),
)
def test_garbage_msgpack_bodies_only_raise_remote_protocol_error(frame_type, body, verify):
    """Well-framed bodies holding any msgpack value: a frame or a RemoteProtocolError, nothing else."""
    wire = frame_bytes(frame_type, msgpack.packb(body, use_bin_type=True))
    dec = FrameDecoder(verify_checksums=verify)
    try:
        frames = dec.feed(wire)
    except RemoteProtocolError:
        return
    assert len(frames) == 1 and dec.buffered == 0


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(any_frame, min_size=1, max_size=5), data=st.data())
def test_corrupted_valid_stream_only_raises_remote_protocol_error(frames, data):
    stream = bytearray(b"".join(encode(f) for f in frames))
    pos = data.draw(st.integers(0, len(stream) - 1), label="pos")
    stream[pos] ^= data.draw(st.integers(1, 255), label="xor")
    cut = data.draw(st.integers(0, len(stream)), label="truncate at")
    cuts = data.draw(st.lists(st.integers(0, cut), max_size=6), label="cuts")
    _feed_checked(FrameDecoder(4096), bytes(stream[:cut]), cuts)


# ---------------------------------------------------------------- specific errors


@settings(max_examples=50, deadline=None)
@given(max_frame=st.integers(0, 1 << 20), excess=st.integers(1, 1 << 31), frame_type=st.integers(0, 255))
def test_oversized_header_is_refused_before_the_body(max_frame, excess, frame_type):
    length = min(max_frame + excess, U32)
    dec = FrameDecoder(max_frame)
    header = FRAME_HEADER.pack(length, frame_type)
    assert dec.feed(header[:4]) == []  # the length alone is not enough to judge the frame
    with pytest.raises(RemoteProtocolError) as info:
        dec.feed(header[4:])  # no body byte sent yet
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert str(length) in str(info.value) and str(max_frame) in str(info.value)
    assert dec.buffered <= FRAME_HEADER.size


def test_frame_of_exactly_max_frame_is_accepted():
    write = Write.make(1, 1, 0, b"m" * 512, 0)
    max_frame = WRITE_HEADER.size + 512
    assert decode_all(encode(write), max_frame)[0].seq == 1
    raises_remote(encode(write), ErrorCode.FRAME_TOO_LARGE, max_frame - 1)


def test_default_max_frame_fits_a_4_mib_write():
    assert DEFAULT_MAX_FRAME == 4 * 1024 * 1024 + WRITE_HEADER.size
    dec = FrameDecoder()
    dec.feed(FRAME_HEADER.pack(DEFAULT_MAX_FRAME, FrameType.WRITE))  # accepted: waits for the body
    assert dec.buffered == 0
    with pytest.raises(RemoteProtocolError) as info:
        dec.eof()
    assert info.value.code is ErrorCode.TRUNCATED


@settings(max_examples=60, deadline=None)
@given(frames=st.lists(any_frame, min_size=1, max_size=4), data=st.data())
def test_truncated_stream_raises_on_eof(frames, data):
    stream = b"".join(encode(f) for f in frames)
    last = encode(frames[-1])
    start = len(stream) - len(last)
    cut = data.draw(st.integers(start + 1, len(stream) - 1), label="cut") if len(last) > 1 else start + 1
    dec = FrameDecoder()
    got = dec.feed(stream[:cut])
    assert [as_plain(f) for f in got] == [as_plain(f) for f in frames[:-1]]
    with pytest.raises(RemoteProtocolError) as info:
        dec.eof()
    assert info.value.code is ErrorCode.TRUNCATED
    have = cut - start
    want = len(last) if have >= FRAME_HEADER.size else FRAME_HEADER.size
    assert f"{have} of {want} bytes" in str(info.value)


def test_eof_on_frame_boundary_and_on_empty_stream_is_clean():
    dec = FrameDecoder()
    dec.eof()
    dec = FrameDecoder()
    dec.feed(encode(Heartbeat(3)))
    dec.eof()


@settings(max_examples=60, deadline=None)
@given(write=writes, xor=st.integers(1, U32))
def test_bad_checksum_names_handle_and_seq(write, xor):
    bad = Write(write.handle, write.seq, write.offset, write.timestamp_us, write.data, write.checksum ^ xor)
    exc = raises_remote(encode(bad), ErrorCode.BAD_CHECKSUM)
    assert exc.handle == write.handle and exc.seq == write.seq
    assert f"disk handle {write.handle}" in str(exc) and f"sequence {write.seq}" in str(exc)
    # the same bytes pass when checksums are not verified (e.g. a trusted local pipe)
    (frame,) = FrameDecoder(verify_checksums=False).feed(encode(bad))
    assert frame.checksum == bad.checksum


def test_flipped_payload_bit_fails_the_checksum():
    wire = bytearray(encode(Write.make(9, 77, 1024, b"\x00" * 512, 1)))
    wire[-1] ^= 0x01
    exc = raises_remote(bytes(wire), ErrorCode.BAD_CHECKSUM)
    assert (exc.handle, exc.seq) == (9, 77)


@pytest.mark.parametrize("frame_type", [0, 10, 11, 127, 255])
def test_unknown_frame_type(frame_type):
    exc = raises_remote(frame_bytes(frame_type, msgpack.packb({})), ErrorCode.UNKNOWN_FRAME_TYPE)
    assert f"unknown frame type {frame_type}" in str(exc)


@pytest.mark.parametrize("size", [0, 1, WRITE_HEADER.size - 1])
def test_write_shorter_than_its_header(size):
    exc = raises_remote(frame_bytes(FrameType.WRITE, b"\0" * size), ErrorCode.BAD_FRAME)
    assert f"WRITE frame of {size} bytes" in str(exc)


VALID_BODIES = {
    FrameType.HELLO: {"version": 1, "agent": "a", "token": "t"},
    FrameType.WELCOME: {"version": 1, "server": "s", "max_frame": 1024},
    FrameType.OPEN_DISK: {"handle": 1, "disk": "d", "size": 1 << 20, "block_size": 512},
    FrameType.DISK_OPENED: {"handle": 1, "disk": "d", "resume_seq": 0},
    FrameType.TAG: {"handle": 1, "seq": 2, "kind": 1, "id": "x", "timestamp_us": 3},
    FrameType.ERROR: {"code": 1, "message": "m"},
    FrameType.HEARTBEAT: {"time_us": 1},
}
INT_FIELDS = [(t, k) for t, body in VALID_BODIES.items() for k, v in body.items() if isinstance(v, int)]
STR_FIELDS = [(t, k) for t, body in VALID_BODIES.items() for k, v in body.items() if isinstance(v, str)]


@pytest.mark.parametrize("frame_type", VALID_BODIES, ids=lambda t: t.name)
def test_valid_bodies_decode(frame_type):
    (frame,) = decode_all(frame_bytes(frame_type, msgpack.packb(VALID_BODIES[frame_type])))
    assert type(frame) is FRAME_CLASS[frame_type]


@pytest.mark.parametrize("bad", ["1", b"1", True, -1, 1.0, [1], None], ids=repr)
@pytest.mark.parametrize(("frame_type", "field"), INT_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_bad_int_field_names_the_field(frame_type, field, bad):
    body = dict(VALID_BODIES[frame_type], **{field: bad})
    exc = raises_remote(frame_bytes(frame_type, msgpack.packb(body, use_bin_type=True)), ErrorCode.BAD_FRAME)
    assert f"{frame_type.name} frame: field {field!r}" in str(exc)
    assert "non-negative int" in str(exc)


@pytest.mark.parametrize("bad", [1, b"bytes", True, ["s"], None], ids=repr)
@pytest.mark.parametrize(("frame_type", "field"), STR_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_bad_str_field_names_the_field(frame_type, field, bad):
    body = dict(VALID_BODIES[frame_type], **{field: bad})
    exc = raises_remote(frame_bytes(frame_type, msgpack.packb(body, use_bin_type=True)), ErrorCode.BAD_FRAME)
    assert f"{frame_type.name} frame: field {field!r} must be str, got {type(bad).__name__}" in str(exc)


@pytest.mark.parametrize(("frame_type", "field"), INT_FIELDS + STR_FIELDS, ids=lambda x: getattr(x, "name", x))
def test_missing_field_names_the_field(frame_type, field):
    body = {k: v for k, v in VALID_BODIES[frame_type].items() if k != field}
    exc = raises_remote(frame_bytes(frame_type, msgpack.packb(body)), ErrorCode.BAD_FRAME)
    assert f"field {field!r}" in str(exc) and "got NoneType" in str(exc)


@pytest.mark.parametrize("body", [
    b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb(5), msgpack.packb({"time_us": 1}) + b"\x00",
    msgpack.packb({1: 2}),
], ids=["empty", "reserved-byte", "array", "int", "trailing-data", "int-key"])
def test_body_that_is_not_one_msgpack_map(body):
    exc = raises_remote(frame_bytes(FrameType.HEARTBEAT, body), ErrorCode.BAD_FRAME)
    assert "HEARTBEAT frame" in str(exc)


@pytest.mark.parametrize("kind", [0, 3, 255])
def test_unknown_tag_kind(kind):
    body = dict(VALID_BODIES[FrameType.TAG], kind=kind)
    exc = raises_remote(frame_bytes(FrameType.TAG, msgpack.packb(body)), ErrorCode.BAD_FRAME)
    assert f"unknown tag kind {kind}" in str(exc)


def test_open_disk_handle_must_fit_u32():
    body = dict(VALID_BODIES[FrameType.OPEN_DISK], handle=U32 + 1)
    exc = raises_remote(frame_bytes(FrameType.OPEN_DISK, msgpack.packb(body)), ErrorCode.BAD_FRAME)
    assert "handle must fit in 32 bits" in str(exc)
    body["handle"] = U32
    assert decode_all(frame_bytes(FrameType.OPEN_DISK, msgpack.packb(body)))[0].handle == U32


@pytest.mark.parametrize("acks", [None, 5, [[1]], [[1, 2, 3]], [[1, -2]], [[True, 2]], [[1, "2"]], [(1, 2), 3]],
                         ids=repr)
def test_malformed_ack(acks):
    body = {} if acks is None else {"acks": acks}
    exc = raises_remote(frame_bytes(FrameType.ACK, msgpack.packb(body)), ErrorCode.BAD_FRAME)
    assert "'acks' must be a list of [handle, seq]" in str(exc)


def test_decode_body_directly():
    wire = encode(Tag(1, 2, TagKind.CRASH, "c", 3))
    assert decode_body(FrameType.TAG, memoryview(wire)[FRAME_HEADER.size:]) == Tag(1, 2, TagKind.CRASH, "c", 3)


# ---------------------------------------------------------------- local errors


def test_encode_refuses_non_frames():
    with pytest.raises(LocalProtocolError) as info:
        encode("not a frame")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.BAD_FRAME and "not a frame: str" in str(info.value)


@pytest.mark.parametrize(("handle", "seq", "offset"), [(-1, 1, 0), (U32 + 1, 1, 0), (1, -1, 0), (1, U64 + 1, 0),
                                                       (1, 1, -512), (1, 1, U64 + 1)])
def test_encode_write_refuses_out_of_range_fields(handle, seq, offset):
    with pytest.raises(LocalProtocolError) as info:
        encode(Write.make(handle, seq, offset, b"", 0))
    assert info.value.code is ErrorCode.BAD_FRAME


def test_encode_control_refuses_unencodable_values():
    with pytest.raises(LocalProtocolError) as info:
        encode(Heartbeat(U64 + 1))
    assert "cannot encode HEARTBEAT" in str(info.value)


def test_encode_write_refuses_out_of_range_timestamp():
    with pytest.raises(LocalProtocolError):
        encode(Write.make(1, 1, 0, b"", -1))


def test_header_struct_sizes():
    assert struct.calcsize("<IB") == FRAME_HEADER.size == 5
    assert WRITE_HEADER.size == 32
