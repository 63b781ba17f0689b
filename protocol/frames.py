"""The frames of the agent ↔ process-server protocol, as plain values.

Frames are events in the h11 sense: the codec turns bytes into these and these
into bytes; nothing here performs I/O. ``Write`` is the hot-path frame and has a
fixed binary layout; the rare control frames are msgpack maps (see
docs/FORMAT.md for the byte-level specification).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

from protocol.checksum import crc32
from protocol.errors import ErrorCode

PROTOCOL_VERSION = 1
SECTOR_SIZE = 512
_DISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def disk_id_problem(disk: str) -> str | None:
    """Why ``disk`` is not a usable disk id, or ``None``.

    Disk ids become path components and blob-name prefixes, so they are kept to a
    conservative alphabet rather than escaped.
    """
    if _DISK_ID.fullmatch(disk) is None:
        return f"disk id {disk[:80]!r} must be 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"
    return None


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    OPEN_DISK = 3
    DISK_OPENED = 4
    WRITE = 5
    TAG = 6
    ACK = 7
    ERROR = 8
    HEARTBEAT = 9


class TagKind(IntEnum):
    """Consistency of the moment a tag marks (ASR: crash- vs application-consistent)."""

    CRASH = 1
    APP = 2


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of an agent: who it is and the token that proves it."""

    version: int
    agent: str
    token: str

    def __repr__(self) -> str:  # the token is a credential: never print it
        return f"Hello(version={self.version}, agent={self.agent!r}, token=<redacted>)"


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    server: str
    max_frame: int


@dataclass(frozen=True, slots=True)
class OpenDisk:
    """Binds a connection-local ``handle`` (chosen by the agent) to a disk id."""

    handle: int
    disk: str
    size: int
    block_size: int


@dataclass(frozen=True, slots=True)
class DiskOpened:
    """``resume_seq`` is the highest durable sequence; the agent resends from the next one."""

    handle: int
    disk: str
    resume_seq: int


@dataclass(frozen=True, slots=True)
class Write:
    handle: int
    seq: int
    offset: int
    timestamp_us: int
    data: bytes | memoryview
    checksum: int

    @classmethod
    def make(cls, handle: int, seq: int, offset: int, data: bytes | memoryview, timestamp_us: int) -> Write:
        """Build a write with its checksum computed (what an agent normally wants)."""
        return cls(handle, seq, offset, timestamp_us, data, crc32(data))


@dataclass(frozen=True, slots=True)
class Tag:
    handle: int
    seq: int
    kind: TagKind
    tag_id: str
    timestamp_us: int


@dataclass(frozen=True, slots=True)
class Ack:
    """Highest durable sequence per disk handle; cumulative, so a lost ack is harmless."""

    acks: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str
    disk: str | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    time_us: int


Frame = Hello | Welcome | OpenDisk | DiskOpened | Write | Tag | Ack | Error | Heartbeat
