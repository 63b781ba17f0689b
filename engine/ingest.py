"""The agent port: one asyncio protocol object per TLS connection.

Bytes go through the sans-IO ``ServerConnection``; frames are routed to the
pipeline. Every protocol violation is answered with an ERROR frame naming the
disk and sequence, then the connection is closed; the agent reconnects and
resends from its last acknowledgement, so nothing acknowledged is affected.
Backpressure is ``transport.pause_reading()``: the kernel buffers fill and TCP
flow control slows the agent down.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from engine.auth import AgentEntry, AgentRegistry
from engine.disks import DiskRegistry
from engine.pipeline import DiskStream, Pipeline
from protocol import (
    PROTOCOL_VERSION,
    DiskOpened,
    Error,
    ErrorCode,
    Frame,
    Heartbeat,
    Hello,
    OpenDisk,
    ProtocolError,
    RemoteProtocolError,
    ServerConnection,
    Tag,
    Welcome,
    Write,
    disk_id_problem,
)
from protocol.frames import Ack

log = logging.getLogger(__name__)

MIN_READ_BUFFER = 32 * 1024  # a connection's receive buffer however many share server.read_buffers_total_bytes


class IngestContext:
    """What every connection shares: the pipeline, who may connect, which disks exist."""

    def __init__(self, pipeline: Pipeline, agents: AgentRegistry, disks: DiskRegistry,
                 is_committed: Callable[[str], bool], *, server_name: str, max_frame: int, read_buffer: int,
                 read_buffers_total: int) -> None:
        self.pipeline = pipeline
        self.is_committed = is_committed
        self.agents = agents
        self.disks = disks
        self.server_name = server_name
        self.max_frame = max_frame
        self.read_buffer = read_buffer
        self.read_buffers_total = read_buffers_total
        self.connections: set[AgentConnection] = set()

    def read_buffer_size(self) -> int:
        """A connection's receive buffer: ``read_buffer``, or its share of ``read_buffers_total`` among
        the connections, at least MIN_READ_BUFFER."""
        share = self.read_buffers_total // max(1, len(self.connections))
        return min(self.read_buffer, max(MIN_READ_BUFFER, share))

    def add(self, connection: AgentConnection) -> None:
        """Each new connection gets its share; whenever their number reaches a power of two, every
        connection is given the new share, so that those that came first do not keep the buffers of a
        quieter time (nor, once many have gone, the small ones of a busier one). Between two such
        points the older connections keep their larger share: the total stays under twice the budget."""
        self.connections.add(connection)
        self._share_read_buffers(connection)

    def remove(self, connection: AgentConnection) -> None:
        self.connections.discard(connection)
        self._share_read_buffers(None)

    def _share_read_buffers(self, new: AgentConnection | None) -> None:
        count = len(self.connections)
        everyone = count & (count - 1) == 0
        for each in self.connections if everyone else ([new] if new is not None else []):
            each.set_read_buffer(self.read_buffer_size())


class AgentConnection(asyncio.BufferedProtocol):
    """One agent's connection. A buffered protocol, so that the TLS layer decrypts straight into the
    buffers frames are decoded from: whole frames are views into what was read, and a body split across
    reads is completed in place (only its start, read with the frame before, is copied)."""

    def __init__(self, ctx: IngestContext) -> None:
        self.ctx = ctx
        self.proto = ServerConnection(ctx.max_frame)
        self.transport: asyncio.Transport | None = None
        self.agent: AgentEntry | None = None
        self.streams: dict[int, DiskStream] = {}
        self.handles: dict[str, int] = {}  # disk → handle, for acks
        self.peer = "?"
        self.last_seen = time.monotonic()  # of the agent's last bytes, less the time we were not reading
        self._paused_at: float | None = None
        self._pending_acks: dict[int, int] = {}
        self._ack_scheduled = False
        self._closing = False

    # ------------------------------------------------------------ transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.ctx.add(self)
        self.ctx.pipeline.flow_listeners.add(self)
        if self.ctx.pipeline.paused:
            self.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proto.receive_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_seen = time.monotonic()
        try:
            for frame in self.proto.received_into(nbytes):
                self._handle(frame)
                if self._closing:
                    return
        except ProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool | None:
        try:
            self.proto.receive_eof()
        except RemoteProtocolError as exc:
            self.ctx.pipeline.stats.protocol_errors[exc.code.name] += 1
            log.warning("agent %s (%s): %s", self.agent.agent if self.agent else "?", self.peer, exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.ctx.remove(self)
        self.ctx.pipeline.flow_listeners.discard(self)
        for stream in self.streams.values():
            stream.listeners.pop(self, None)

    def pause_reading(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.pause_reading()
            if self._paused_at is None:
                self._paused_at = time.monotonic()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()
            if self._paused_at is not None:  # not the agent's silence: the idle timeout must not count it
                self.last_seen += time.monotonic() - self._paused_at
                self._paused_at = None

    def set_read_buffer(self, size: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            except (OSError, ValueError):  # ValueError: a socket closed under us (uvloop: fd -1)
                pass  # the kernel's default then: a smaller buffer is an optimisation, not a condition

    def silent_s(self, now: float) -> float:
        """How long the agent has sent nothing, not counting time this server was not reading it (under
        backpressure a connection can wait its turn longer than the idle timeout)."""
        return (self._paused_at if self._paused_at is not None else now) - self.last_seen

    # ------------------------------------------------------------ frames

    def _handle(self, frame: Frame) -> None:
        if isinstance(frame, (Write, Tag)):
            stream = self.streams[frame.handle]
            accept = self.ctx.pipeline.accept_write if isinstance(frame, Write) else self.ctx.pipeline.accept_tag
            if not accept(stream, frame) and frame.seq <= stream.durable_seq:  # type: ignore[arg-type]
                self._queue_ack(frame.handle, stream.durable_seq)  # a resend of something durable
        elif isinstance(frame, OpenDisk):
            self._open(frame)
        elif isinstance(frame, Hello):
            self._hello(frame)
        elif isinstance(frame, Heartbeat):
            pass  # last_seen is enough
        elif isinstance(frame, Error):
            log.warning("agent %s reports %s: %s", self._who(), frame.code.name, frame.message)
            self.close()

    def _hello(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION,
                                      f"agent speaks version {hello.version}, server {PROTOCOL_VERSION}")
        self.agent = self.ctx.agents.authenticate(hello.agent, hello.token)
        if self.agent is None:
            raise RemoteProtocolError(ErrorCode.AUTH_FAILED, f"unknown agent {hello.agent!r} or wrong token")
        log.info("agent %s connected from %s", hello.agent, self.peer)
        self._send_raw(self.proto.welcome(Welcome(PROTOCOL_VERSION, self.ctx.server_name, self.ctx.max_frame)))

    def _open(self, frame: OpenDisk) -> None:
        assert self.agent is not None
        problem = disk_id_problem(frame.disk)
        if problem:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, problem)
        if not self.agent.may_open(frame.disk):
            raise RemoteProtocolError(ErrorCode.DISK_NOT_ALLOWED,
                                      f"agent {self.agent.agent!r} may not open this disk", disk=frame.disk)
        if frame.size <= 0 or frame.size % 512 or frame.block_size <= 0 or frame.block_size % 512:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME,
                                      "disk size and block size must be positive multiples of 512", disk=frame.disk)
        if frame.disk in self.handles:
            raise RemoteProtocolError(ErrorCode.BAD_FRAME, "disk is already open on this connection",
                                      disk=frame.disk)
        info, _ = self.ctx.disks.claim(frame.disk, self.agent.agent, frame.size, frame.block_size)
        if self.ctx.is_committed(frame.disk):
            raise RemoteProtocolError(ErrorCode.DISK_NOT_ALLOWED, "disk was failed over and the failover "
                                      "committed; replication of it has stopped", disk=frame.disk)
        stream = self.ctx.pipeline.stream(info)
        stream.check_not_stopped()
        for other in list(stream.listeners):  # a reconnect supersedes a connection not yet known dead
            if isinstance(other, AgentConnection) and other is not self:
                other.fail(RemoteProtocolError(ErrorCode.SHUTTING_DOWN, "disk opened by a newer connection",
                                               disk=frame.disk))
        self.streams[frame.handle] = stream
        self.handles[frame.disk] = frame.handle
        stream.listeners[self] = self._on_durable
        self._send(DiskOpened(frame.handle, frame.disk, stream.durable_seq))

    # ------------------------------------------------------------ acks

    def _on_durable(self, disk: str, seq: int) -> None:
        handle = self.handles.get(disk)
        if handle is not None:
            self._queue_ack(handle, seq)

    def _queue_ack(self, handle: int, seq: int) -> None:
        self._pending_acks[handle] = max(seq, self._pending_acks.get(handle, 0))
        if not self._ack_scheduled:  # coalesce every advance of this loop iteration into one frame
            self._ack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        if self._pending_acks and not self._closing:
            self._send(Ack(tuple(self._pending_acks.items())))
        self._pending_acks.clear()

    # ------------------------------------------------------------ output

    def _who(self) -> str:
        return f"{self.agent.agent if self.agent else '(unauthenticated)'} ({self.peer})"

    def _send(self, frame: DiskOpened | Ack | Error | Heartbeat) -> None:
        self._send_raw(self.proto.send(frame))

    def _send_raw(self, data: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(data)

    def heartbeat(self) -> None:
        self._send(Heartbeat(time.time_ns() // 1000))

    def fail(self, exc: ProtocolError) -> None:
        """Report a protocol violation to the agent and the log, then close."""
        if self._closing:
            return
        disk = exc.disk
        if disk is None and exc.handle is not None and exc.handle in self.streams:
            disk = self.streams[exc.handle].info.disk
        message = exc.message if disk is not None or exc.handle is None else f"{exc.message} (handle {exc.handle})"
        error = Error(exc.code, message, disk, exc.seq)
        self.ctx.pipeline.stats.protocol_errors[exc.code.name] += 1
        where = "".join([f" disk {disk!r}" if disk else "", f" sequence {exc.seq}" if exc.seq is not None else ""])
        log.warning("agent %s:%s %s: %s", self._who(), where, exc.code.name, message)
        self._send(error)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.close()
