"""Bytes ↔ frames. Encoder and incremental decoder, no I/O.

Frame layout (little-endian)::

    u32 body_length | u8 frame_type | body (body_length bytes)

The decoder is fed whatever the transport delivered and returns complete
frames. Payloads of frames that arrive whole inside one chunk are memoryviews
into that chunk (zero copy), which is why ``feed`` requires that the caller
never mutates a chunk after handing it over. A frame split across chunks is
assembled once into a buffer of exactly its size. Buffering is bounded: a
header announcing more than ``max_frame`` bytes is refused before any of the
body is kept.

A transport that reads into buffers it is given (asyncio's BufferedProtocol)
uses ``get_buffer`` / ``buffer_updated`` instead: the rest of a split body is
then read straight into that body, and everything else into a new buffer that
is never handed out again. Only the start of a split body, which came with the
read before, is copied.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from protocol.checksum import crc32
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    Ack,
    DiskOpened,
    Error,
    Frame,
    FrameType,
    Heartbeat,
    Hello,
    OpenDisk,
    Tag,
    TagKind,
    Welcome,
    Write,
)

FRAME_HEADER = struct.Struct("<IB")
WRITE_HEADER = struct.Struct("<IQQQI")  # handle, seq, offset, timestamp_us, crc32
DEFAULT_MAX_FRAME = 4 * 1024 * 1024 + WRITE_HEADER.size
UNSIZED_BUFFER = 64 * 1024  # what FrameDecoder.get_buffer lends when the transport gives no size hint
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# ---------------------------------------------------------------- encoding


def encode_write_header(write: Write) -> bytes:
    """Frame + write header for ``write``; send it followed by ``write.data``.

    Split so a transport can ``writelines`` the payload without copying it.
    """
    if not (0 <= write.handle <= _U32 and 0 <= write.checksum <= _U32
            and all(0 <= v <= _U64 for v in (write.seq, write.offset, write.timestamp_us))):
        raise LocalProtocolError(ErrorCode.BAD_FRAME, "write field out of range", handle=write.handle, seq=write.seq)
    body_len = WRITE_HEADER.size + len(write.data)
    return FRAME_HEADER.pack(body_len, FrameType.WRITE) + WRITE_HEADER.pack(
        write.handle, write.seq, write.offset, write.timestamp_us, write.checksum
    )


def _control_body(frame: Frame) -> tuple[FrameType, dict[str, Any]]:
    match frame:
        case Hello(version, agent, token):
            return FrameType.HELLO, {"version": version, "agent": agent, "token": token}
        case Welcome(version, server, max_frame):
            return FrameType.WELCOME, {"version": version, "server": server, "max_frame": max_frame}
        case OpenDisk(handle, disk, size, block_size):
            return FrameType.OPEN_DISK, {"handle": handle, "disk": disk, "size": size, "block_size": block_size}
        case DiskOpened(handle, disk, resume_seq):
            return FrameType.DISK_OPENED, {"handle": handle, "disk": disk, "resume_seq": resume_seq}
        case Tag(handle, seq, kind, tag_id, timestamp_us):
            return FrameType.TAG, {
                "handle": handle, "seq": seq, "kind": int(kind), "id": tag_id, "timestamp_us": timestamp_us,
            }
        case Ack(acks):
            return FrameType.ACK, {"acks": [list(pair) for pair in acks]}
        case Error(code, message, disk, seq):
            return FrameType.ERROR, {"code": int(code), "message": message, "disk": disk, "seq": seq}
        case Heartbeat(time_us):
            return FrameType.HEARTBEAT, {"time_us": time_us}
    raise LocalProtocolError(ErrorCode.BAD_FRAME, f"not a frame: {type(frame).__name__}")


def encode(frame: Frame) -> bytes:
    """The complete wire bytes of one frame."""
    if isinstance(frame, Write):
        return encode_write_header(frame) + bytes(frame.data)
    frame_type, body = _control_body(frame)
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise LocalProtocolError(ErrorCode.BAD_FRAME, f"cannot encode {frame_type.name}: {exc}") from exc
    try:  # refuse locally what the peer's decoder would refuse, so the bug is ours to see
        _decode_control(frame_type, memoryview(packed))
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    return FRAME_HEADER.pack(len(packed), frame_type) + packed


# ---------------------------------------------------------------- decoding


def _need(body: dict[Any, Any], name: str, kind: type, frame_type: FrameType, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if type(value) is not kind or (kind is int and not 0 <= value <= _U64):
        raise RemoteProtocolError(
            ErrorCode.BAD_FRAME,
            f"{frame_type.name} frame: field {name!r} must be {'a non-negative int' if kind is int else kind.__name__}"
            f", got {type(value).__name__}",
        )
    return value


def _decode_control(frame_type: FrameType, body: memoryview) -> Frame:
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"{frame_type.name} frame: body is not msgpack ({exc})") from exc
    if not isinstance(fields, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"{frame_type.name} frame: body must be a map")
    f = fields
    t = frame_type
    match frame_type:
        case FrameType.HELLO:
            return Hello(_need(f, "version", int, t), _need(f, "agent", str, t), _need(f, "token", str, t))
        case FrameType.WELCOME:
            return Welcome(_need(f, "version", int, t), _need(f, "server", str, t), _need(f, "max_frame", int, t))
        case FrameType.OPEN_DISK:
            handle = _need(f, "handle", int, t)
            if handle > _U32:
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, "OPEN_DISK frame: handle must fit in 32 bits")
            return OpenDisk(handle, _need(f, "disk", str, t), _need(f, "size", int, t), _need(f, "block_size", int, t))
        case FrameType.DISK_OPENED:
            return DiskOpened(_need(f, "handle", int, t), _need(f, "disk", str, t), _need(f, "resume_seq", int, t))
        case FrameType.TAG:
            kind = _need(f, "kind", int, t)
            if kind not in TagKind._value2member_map_:
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"TAG frame: unknown tag kind {kind}")
            return Tag(
                _need(f, "handle", int, t), _need(f, "seq", int, t), TagKind(kind), _need(f, "id", str, t),
                _need(f, "timestamp_us", int, t),
            )
        case FrameType.ACK:
            acks = f.get("acks")
            if not isinstance(acks, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(type(v) is int and 0 <= v <= _U64 for v in p)
                for p in acks
            ):
                raise RemoteProtocolError(ErrorCode.BAD_FRAME, "ACK frame: 'acks' must be a list of [handle, seq]")
            return Ack(tuple((p[0], p[1]) for p in acks))
        case FrameType.ERROR:
            code = _need(f, "code", int, t)
            return Error(
                ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL,
                _need(f, "message", str, t),
                _need(f, "disk", str, t, optional=True),
                _need(f, "seq", int, t, optional=True),
            )
        case FrameType.HEARTBEAT:
            return Heartbeat(_need(f, "time_us", int, t))
    raise AssertionError(frame_type)  # pragma: no cover - FrameType is exhaustive above


def decode_body(frame_type_value: int, body: memoryview, *, verify_checksum: bool = True) -> Frame:
    """Decode one frame body. ``body`` is kept (not copied) by ``Write.data``."""
    if frame_type_value == FrameType.WRITE:
        if len(body) < WRITE_HEADER.size:
            raise RemoteProtocolError(
                ErrorCode.BAD_FRAME,
                f"WRITE frame of {len(body)} bytes is shorter than its {WRITE_HEADER.size}-byte header",
            )
        handle, seq, offset, timestamp_us, checksum = WRITE_HEADER.unpack_from(body)
        data = body[WRITE_HEADER.size:]
        if verify_checksum and crc32(data) != checksum:
            raise RemoteProtocolError(
                ErrorCode.BAD_CHECKSUM, f"payload of {len(data)} bytes at offset {offset} fails its CRC-32",
                handle=handle, seq=seq,
            )
        return Write(handle, seq, offset, timestamp_us, data, checksum)
    if frame_type_value not in FrameType._value2member_map_:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {frame_type_value}")
    return _decode_control(FrameType(frame_type_value), body)


class FrameDecoder:
    """Incremental decoder: ``feed(chunk) -> [frames]``; ``eof()`` at end of stream.

    After it raises once, the stream is out of sync and the decoder refuses
    further input: the connection must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, verify_checksums: bool = True) -> None:
        self.max_frame = max_frame
        self.verify_checksums = verify_checksums
        self._header = bytearray()  # a frame header split across chunks
        self._body: bytearray | None = None  # a body split across chunks
        self._body_have = 0
        self._body_type = 0
        self._failed: RemoteProtocolError | None = None
        self._lent: bytearray | None = None  # the new buffer get_buffer handed out; None: it lent the body

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame (bounded by ``max_frame``)."""
        return len(self._header) + self._body_have

    def feed(self, chunk: bytes | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._feed(memoryview(chunk).cast("B"))
        except RemoteProtocolError as exc:
            self._failed = exc
            raise

    def get_buffer(self, size_hint: int) -> memoryview:
        """Where the transport should put the next bytes: the unfilled rest of a body split across reads,
        else a new buffer of ``size_hint`` bytes — uvloop's TLS layer hints what it holds; asyncio's own
        loop may hint nothing (-1 or 0), and gets UNSIZED_BUFFER rather than a read per frame header.
        Never raises: after a failure the bytes still go somewhere, and ``buffer_updated`` raises the
        failure again."""
        if self._body is not None and self._failed is None:
            self._lent = None
            return memoryview(self._body)[self._body_have:]
        self._lent = bytearray(size_hint if size_hint >= FRAME_HEADER.size else UNSIZED_BUFFER)
        return memoryview(self._lent)

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        """The transport wrote ``nbytes`` into what ``get_buffer`` returned: decode them."""
        if self._failed is not None:
            raise self._failed
        lent, self._lent = self._lent, None
        if lent is not None:
            return self.feed(memoryview(lent)[:nbytes])
        if self._body is None:
            raise RuntimeError("buffer_updated without get_buffer")
        self._body_have += nbytes
        if self._body_have < len(self._body):
            return []
        body, self._body, self._body_have = self._body, None, 0
        try:
            return [decode_body(self._body_type, memoryview(body), verify_checksum=self.verify_checksums)]
        except RemoteProtocolError as exc:
            self._failed = exc
            raise

    def eof(self) -> None:
        """Declare the end of the stream; raises if it ends inside a frame."""
        if self._failed is None and (self._header or self._body is not None):
            want = len(self._body) + FRAME_HEADER.size if self._body is not None else FRAME_HEADER.size
            have = self._body_have + FRAME_HEADER.size if self._body is not None else len(self._header)
            self._failed = RemoteProtocolError(
                ErrorCode.TRUNCATED, f"stream ended inside a frame: {have} of {want} bytes received"
            )
            raise self._failed

    def _start_body(self, length: int, frame_type: int) -> None:
        if length > self.max_frame:
            raise RemoteProtocolError(
                ErrorCode.FRAME_TOO_LARGE, f"frame of {length} bytes exceeds the maximum of {self.max_frame}"
            )
        self._body_type = frame_type

    def _feed(self, view: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        pos, end = 0, len(view)
        hsize = FRAME_HEADER.size
        verify = self.verify_checksums
        while pos < end:
            if self._body is not None:  # continue a split body
                take = min(len(self._body) - self._body_have, end - pos)
                self._body[self._body_have:self._body_have + take] = view[pos:pos + take]
                self._body_have += take
                pos += take
                if self._body_have == len(self._body):
                    body, self._body, self._body_have = self._body, None, 0
                    frames.append(decode_body(self._body_type, memoryview(body), verify_checksum=verify))
                continue
            if self._header or end - pos < hsize:  # a split header
                take = min(hsize - len(self._header), end - pos)
                self._header += view[pos:pos + take]
                pos += take
                if len(self._header) < hsize:
                    continue
                length, frame_type = FRAME_HEADER.unpack(self._header)
                self._header.clear()
            else:
                length, frame_type = FRAME_HEADER.unpack_from(view, pos)
                pos += hsize
            self._start_body(length, frame_type)
            if end - pos >= length:  # whole body in this chunk: zero copy
                frames.append(decode_body(frame_type, view[pos:pos + length], verify_checksum=verify))
                pos += length
            else:
                self._body = bytearray(length)
                self._body_have = 0
        return frames
