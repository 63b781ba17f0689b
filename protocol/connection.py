"""Role-aware protocol state machines (the h11 shape: bytes in → frames out).

``ServerConnection`` enforces what a process server may accept from an agent
(HELLO first, writes only on handles the server has opened for it) and resolves
handles to disk ids so every error names the disk. ``ClientConnection`` is the
mirror image for agents. Neither knows about sockets, so both are usable from
asyncio, threads or tests alike.
"""

from __future__ import annotations

from enum import Enum

from protocol.codec import DEFAULT_MAX_FRAME, FrameDecoder, encode, encode_write_header
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    Ack,
    DiskOpened,
    Error,
    Frame,
    Heartbeat,
    Hello,
    OpenDisk,
    Tag,
    Welcome,
    Write,
)


class State(Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    READY = "ready"
    CLOSED = "closed"


class _Connection:
    _accepts: tuple[type, ...] = ()

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, verify_checksums: bool = True) -> None:
        self._decoder = FrameDecoder(max_frame, verify_checksums=verify_checksums)
        self.disks: dict[int, str] = {}  # open handles → disk ids
        self.state = State.CLOSED

    @property
    def buffered(self) -> int:
        return self._decoder.buffered

    def disk_of(self, handle: int) -> str | None:
        return self.disks.get(handle)

    def receive_data(self, data: bytes | memoryview) -> list[Frame]:
        """Decode and validate what arrived. Raises RemoteProtocolError on bad input."""
        return self._checked(self._decoder.feed(data))

    def receive_buffer(self, size_hint: int) -> memoryview:
        """Where the transport should read the next bytes into (``FrameDecoder.get_buffer``)."""
        return self._decoder.get_buffer(size_hint)

    def received_into(self, nbytes: int) -> list[Frame]:
        """Decode and validate the ``nbytes`` read into ``receive_buffer``. Raises RemoteProtocolError."""
        return self._checked(self._decoder.buffer_updated(nbytes))

    def _checked(self, frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            self._check_incoming(frame)
        return frames

    def receive_eof(self) -> None:
        self.state = State.CLOSED
        self._decoder.eof()

    def _unexpected(self, frame: Frame) -> RemoteProtocolError:
        return RemoteProtocolError(
            ErrorCode.UNEXPECTED_FRAME, f"{type(frame).__name__} frame not allowed in state {self.state.value}"
        )

    def _check_incoming(self, frame: Frame) -> None:
        if not isinstance(frame, self._accepts):
            raise self._unexpected(frame)

    def _check_handle(self, handle: int, seq: int) -> None:
        if handle not in self.disks:
            raise RemoteProtocolError(
                ErrorCode.DISK_NOT_OPEN, "write or tag on a disk handle that was not opened", handle=handle, seq=seq
            )


class ServerConnection(_Connection):
    _accepts = (Hello, OpenDisk, Write, Tag, Heartbeat, Error)

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, verify_checksums: bool = True) -> None:
        super().__init__(max_frame, verify_checksums=verify_checksums)
        self.state = State.AWAIT_HELLO
        self.agent: str | None = None

    def _check_incoming(self, frame: Frame) -> None:
        super()._check_incoming(frame)
        if self.state is State.AWAIT_HELLO:
            if not isinstance(frame, Hello):
                raise self._unexpected(frame)
            self.agent = frame.agent
            self.state = State.AWAIT_WELCOME  # until the server has authenticated it
            return
        if self.state is not State.READY or isinstance(frame, Hello):
            raise self._unexpected(frame)
        if isinstance(frame, (Write, Tag)):
            self._check_handle(frame.handle, frame.seq)
        elif isinstance(frame, OpenDisk) and frame.handle in self.disks:
            raise RemoteProtocolError(
                ErrorCode.BAD_FRAME, f"handle {frame.handle} is already open", disk=self.disks[frame.handle]
            )

    def welcome(self, frame: Welcome) -> bytes:
        """Accept the authenticated agent."""
        if self.state is not State.AWAIT_WELCOME:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_FRAME, f"cannot welcome in state {self.state.value}")
        self.state = State.READY
        return encode(frame)

    def send(self, frame: Welcome | DiskOpened | Ack | Error | Heartbeat) -> bytes:
        if isinstance(frame, Welcome):
            return self.welcome(frame)
        if isinstance(frame, DiskOpened):
            self.disks[frame.handle] = frame.disk
        if isinstance(frame, Error):
            self.state = State.CLOSED
        return encode(frame)


class ClientConnection(_Connection):
    _accepts = (Welcome, DiskOpened, Ack, Error, Heartbeat)

    def _check_incoming(self, frame: Frame) -> None:
        super()._check_incoming(frame)
        if isinstance(frame, Error):
            self.state = State.CLOSED
            return
        if self.state is State.AWAIT_WELCOME:
            if not isinstance(frame, Welcome):
                raise self._unexpected(frame)
            self.state = State.READY
        elif isinstance(frame, Welcome) or self.state is not State.READY:
            raise self._unexpected(frame)
        elif isinstance(frame, DiskOpened):
            self.disks[frame.handle] = frame.disk

    def send(self, frame: Hello | OpenDisk | Tag | Heartbeat) -> bytes:
        if isinstance(frame, Hello):
            if self.state is not State.CLOSED:
                raise LocalProtocolError(ErrorCode.UNEXPECTED_FRAME, "HELLO must be the first frame")
            self.state = State.AWAIT_WELCOME
        elif self.state is not State.READY:
            raise LocalProtocolError(
                ErrorCode.UNEXPECTED_FRAME, f"{type(frame).__name__} before the server's WELCOME"
            )
        elif isinstance(frame, Tag) and frame.handle not in self.disks:
            raise LocalProtocolError(ErrorCode.DISK_NOT_OPEN, "tag before the disk was opened",
                                     handle=frame.handle, seq=frame.seq)
        return encode(frame)

    def send_write_header(self, write: Write) -> bytes:
        """Header bytes for ``write``; the caller sends ``write.data`` right after."""
        if self.state is not State.READY or write.handle not in self.disks:
            raise LocalProtocolError(
                ErrorCode.DISK_NOT_OPEN, "write before the disk was opened", handle=write.handle, seq=write.seq
            )
        return encode_write_header(write)

