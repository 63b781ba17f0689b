"""blockferry's wire protocol and log-blob format, sans I/O.

Nothing in this package touches sockets, files or an event loop: bytes go in,
frames or records come out, so the same code serves the asyncio engine, a
threaded agent, tools and tests.
"""

from protocol.codec import DEFAULT_MAX_FRAME, FrameDecoder, encode, encode_write_header
from protocol.connection import ClientConnection, ServerConnection, State
from protocol.errors import ErrorCode, LocalProtocolError, LogBlobError, ProtocolError, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
    SECTOR_SIZE,
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
    disk_id_problem,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PROTOCOL_VERSION",
    "SECTOR_SIZE",
    "Ack",
    "ClientConnection",
    "DiskOpened",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Heartbeat",
    "Hello",
    "LocalProtocolError",
    "LogBlobError",
    "OpenDisk",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerConnection",
    "State",
    "Tag",
    "TagKind",
    "Welcome",
    "Write",
    "disk_id_problem",
    "encode",
    "encode_write_header",
]
