"""Typed protocol errors, in the style of h11.

A ``RemoteProtocolError`` means the peer sent something we must refuse; a
``LocalProtocolError`` means our own code tried to send something invalid. Both
carry an :class:`ErrorCode` so the engine can put the same code on the wire in an
``Error`` frame, and the disk handle / sequence number the problem concerns, so an
operator reading the message knows *which* write was bad.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes carried in ``Error`` frames (values are part of the wire format)."""

    BAD_FRAME = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME_TYPE = 3
    BAD_CHECKSUM = 4
    UNSUPPORTED_VERSION = 5
    AUTH_FAILED = 6
    UNEXPECTED_FRAME = 7
    DISK_NOT_OPEN = 8
    DISK_NOT_ALLOWED = 9
    DISK_MISMATCH = 10
    OUT_OF_BOUNDS = 11
    BAD_ALIGNMENT = 12
    SEQUENCE_GAP = 13
    TRUNCATED = 14
    SHUTTING_DOWN = 15
    INTERNAL = 16


class ProtocolError(Exception):
    """Base of all wire-protocol errors."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        handle: int | None = None,
        disk: str | None = None,
        seq: int | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.handle = handle
        self.disk = disk
        self.seq = seq
        super().__init__(self.describe())

    def describe(self) -> str:
        where = []
        if self.disk is not None:
            where.append(f"disk {self.disk!r}")
        elif self.handle is not None:
            where.append(f"disk handle {self.handle}")
        if self.seq is not None:
            where.append(f"sequence {self.seq}")
        prefix = f"{self.code.name}"
        if where:
            prefix += f" ({', '.join(where)})"
        return f"{prefix}: {self.message}"


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the connection must be closed after reporting it."""


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug in the caller)."""


class LogBlobError(Exception):
    """A log blob cannot be trusted: bad magic, unknown key, failed authentication, ...

    Never contains key material: only the key *id* may be mentioned.
    """

    def __init__(self, reason: str, *, disk: str | None = None, name: str | None = None) -> None:
        self.reason = reason
        self.disk = disk
        self.name = name
        where = ", ".join(p for p in (f"disk {disk!r}" if disk else "", f"blob {name}" if name else "") if p)
        super().__init__(f"{where}: {reason}" if where else reason)
