"""The agent library: what a protected machine embeds to replicate its disks.

``Agent`` keeps one TLS connection to a process server. ``AgentDisk.write``
numbers each write (per-disk sequence, the basis of exactly-once), keeps it until
the server acknowledges it as durable, and returns a future resolved then. The
unacknowledged bytes are bounded (``max_unacked_bytes``): a full window makes
``write`` wait, which is how a slow pipeline pushes back on the writer. On a lost
connection the agent reconnects with backoff, reopens its disks, learns from
each ``DISK_OPENED`` how far the server got, forgets what is durable and resends
the rest in order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Self

from protocol import (
    PROTOCOL_VERSION,
    SECTOR_SIZE,
    Ack,
    ClientConnection,
    DiskOpened,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    OpenDisk,
    ProtocolError,
    State,
    Tag,
    TagKind,
    Welcome,
    Write,
    encode,
)
from protocol.codec import encode_write_header

log = logging.getLogger(__name__)

# Errors that a reconnect cannot cure: the agent stops and reports them.
FATAL_CODES = {ErrorCode.AUTH_FAILED, ErrorCode.UNSUPPORTED_VERSION, ErrorCode.DISK_NOT_ALLOWED,
               ErrorCode.DISK_MISMATCH, ErrorCode.OUT_OF_BOUNDS, ErrorCode.BAD_ALIGNMENT, ErrorCode.BAD_FRAME}


# Bytes queued in the transport before a writer waits. uvloop's TLS transport goes on encrypting what is
# queued into its outgoing buffer while the socket is full, then takes all of it out as one bytes object:
# at 4 MiB that was fresh memory each time, and at 1000 agents the kernel zeroing those pages was 37 % of
# the load generator's CPU (docs/benchmarks.md).
SEND_BUFFER_HIGH = 256 * 1024
YIELD_EVERY_BYTES = 1024 * 1024  # a writer that never waits yields to the loop this often (fairness between disks)


class AgentError(Exception):
    """The server refused the agent for a reason retrying cannot fix."""


@dataclass
class _Unacked:
    seq: int
    header: bytes  # wire bytes of the frame, without the write payload
    data: bytes | memoryview
    future: asyncio.Future[int] = field(repr=False)


class AgentDisk:
    """One replicated disk. Sequence numbers start after what the server already holds."""

    def __init__(self, agent: Agent, handle: int, disk: str, size: int, block_size: int) -> None:
        self.agent = agent
        self.handle = handle
        self.disk = disk
        self.size = size
        self.block_size = block_size
        self.next_seq = 0  # set from the first DISK_OPENED
        self.acked_seq = 0
        self.resumed_seq = 0  # what the server said it holds at the last (re)connect
        self.sent_bytes = 0
        self.acked_bytes = 0
        self._unacked: deque[_Unacked] = deque()
        self._opened: asyncio.Future[int] | None = None
        self._live = False  # opened on the current connection

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    async def write(self, offset: int, data: bytes | memoryview) -> asyncio.Future[int]:
        """Queue a write; the returned future resolves with its sequence once durable.

        ``data`` must not be modified until then. Waits while the unacknowledged
        window is full.
        """
        size = len(data)
        if offset % SECTOR_SIZE or size % SECTOR_SIZE or size == 0:
            raise ValueError(f"disk {self.disk!r}: offset {offset} and length {size} must be non-zero "
                             f"multiples of {SECTOR_SIZE}")
        if offset + size > self.size:
            raise ValueError(f"disk {self.disk!r}: write of {size} bytes at {offset} ends beyond the size {self.size}")
        await self.agent._reserve(size)
        seq = self._take_seq()
        frame = Write.make(self.handle, seq, offset, data, time.time_ns() // 1000)
        future = self._queue(seq, encode_write_header(frame), data, size)
        await self.agent._drain()
        await self.agent._share_loop(size)
        return future

    async def tag(self, kind: TagKind = TagKind.CRASH, tag_id: str = "") -> asyncio.Future[int]:
        """Mark the current point in this disk's stream (e.g. after an application-consistent snapshot)."""
        await self.agent._reserve(0)
        seq = self._take_seq()
        frame = encode(Tag(self.handle, seq, kind, tag_id or f"{kind.name.lower()}-{seq}", time.time_ns() // 1000))
        return self._queue(seq, frame, b"", 0)

    async def flush(self) -> None:
        """Wait until everything written so far is durable on the server."""
        while self._unacked:
            await asyncio.shield(self._unacked[-1].future)

    def _take_seq(self) -> int:
        if self.agent._fatal is not None:
            raise self.agent._fatal
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def _queue(self, seq: int, header: bytes, data: bytes | memoryview, size: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        item = _Unacked(seq, header, data, future)
        self._unacked.append(item)
        if self._live:
            self.agent._transmit(item)
        self.sent_bytes += size
        return future

    def _acknowledged(self, seq: int) -> None:
        released = 0
        while self._unacked and self._unacked[0].seq <= seq:
            item = self._unacked.popleft()
            released += len(item.data)
            if not item.future.done():
                item.future.set_result(item.seq)
        self.acked_seq = max(self.acked_seq, seq)
        self.acked_bytes += released
        if released:
            self.agent._release(released)

    def _resumed(self, resume_seq: int) -> None:
        """The server holds everything up to ``resume_seq``: drop that, resend the rest."""
        self.resumed_seq = resume_seq
        if self.next_seq == 0:
            self.next_seq = resume_seq + 1
            self.acked_seq = resume_seq
        self._acknowledged(resume_seq)
        self._live = True
        for item in self._unacked:
            self.agent._transmit(item)

    def _fail(self, exc: Exception) -> None:
        for item in self._unacked:
            if not item.future.done():
                item.future.set_exception(exc)
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(exc)


class Agent:
    def __init__(self, host: str, port: int, agent_id: str, token: str, *, ssl_context: ssl.SSLContext,
                 server_hostname: str | None = None, max_unacked_bytes: int = 64 * 1024 * 1024,
                 reconnect_initial_s: float = 0.05, reconnect_max_s: float = 5.0, heartbeat_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.agent_id = agent_id
        self._token = token
        self._ssl = ssl_context
        self._server_hostname = server_hostname
        self.max_unacked_bytes = max_unacked_bytes
        self.reconnect_initial_s = reconnect_initial_s
        self.reconnect_max_s = reconnect_max_s
        self.heartbeat_s = heartbeat_s
        self.disks: dict[str, AgentDisk] = {}
        self.connections = 0  # sessions established, for monitoring and tests
        self._by_handle: dict[int, AgentDisk] = {}
        self._unacked_bytes = 0
        self._since_yield = 0  # bytes written since the last yield to the loop (see _share_loop)
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._writer: asyncio.StreamWriter | None = None
        self._conn: ClientConnection | None = None
        self._ready: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._fatal: AgentError | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"Agent({self.agent_id!r} -> {self.host}:{self.port})"  # never the token

    # ------------------------------------------------------------ public API

    async def start(self) -> None:
        """Connect and authenticate; raises AgentError if the server refuses us."""
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"agent-{self.agent_id}")
        await self._ready

    async def open_disk(self, disk: str, size: int, block_size: int = 4096) -> AgentDisk:
        if disk in self.disks:
            return self.disks[disk]
        handle = len(self._by_handle) + 1
        d = AgentDisk(self, handle, disk, size, block_size)
        d._opened = asyncio.get_running_loop().create_future()
        self.disks[disk] = self._by_handle[handle] = d
        if self._conn is not None and self._writer is not None:
            self._send_open(d)
        await d._opened
        return d

    async def flush(self) -> None:
        await asyncio.gather(*(d.flush() for d in self.disks.values()))

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ window

    async def _reserve(self, size: int) -> None:
        """Wait, first come first served, until ``size`` more bytes fit in the window."""
        if self._fatal is not None:
            raise self._fatal
        if self._waiters or not self._fits(size):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append((size, waiter))
            await waiter  # resolved by _wake_waiters, which also takes the bytes for us
            return
        self._unacked_bytes += size

    async def _share_loop(self, size: int) -> None:
        """Yield to the event loop after every ``YIELD_EVERY_BYTES`` written.

        ``write`` only suspends when the window or the socket is full; while neither is, a disk's writer
        would keep the loop to itself and starve the agent's other disks (measured: 25 699 writes on one
        disk of the demo against 1 297 on the other). Once per MiB costs nothing measurable.
        """
        self._since_yield += size
        if self._since_yield >= YIELD_EVERY_BYTES:
            self._since_yield = 0
            await asyncio.sleep(0)

    def _fits(self, size: int) -> bool:
        # An oversized write still goes alone through an empty window rather than never.
        return self._unacked_bytes + size <= self.max_unacked_bytes or self._unacked_bytes == 0

    def _release(self, size: int) -> None:
        self._unacked_bytes -= size
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
            elif self._fatal is not None:
                self._waiters.popleft()
                waiter.set_exception(self._fatal)
            elif self._fits(size):
                self._waiters.popleft()
                self._unacked_bytes += size
                waiter.set_result(None)
            else:
                return

    # ------------------------------------------------------------ connection

    def _transmit(self, item: _Unacked) -> None:
        if self._writer is not None:
            if item.data:
                self._writer.writelines((item.header, item.data))
            else:
                self._writer.write(item.header)

    async def _drain(self) -> None:
        """Wait while the socket's send buffer is full; this also gives acks a turn on the event loop,
        which a writer with room in its window would otherwise starve."""
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() > SEND_BUFFER_HIGH:
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # the session task notices and reconnects; the write stays queued for resending

    def _send_open(self, disk: AgentDisk) -> None:
        assert self._conn is not None and self._writer is not None
        self._writer.write(self._conn.send(OpenDisk(disk.handle, disk.disk, disk.size, disk.block_size)))

    async def _run(self) -> None:
        delay = self.reconnect_initial_s
        while not self._closing:
            try:
                await self._session()
                delay = self.reconnect_initial_s
            except AgentError as exc:
                self._give_up(exc)
                return
            except (OSError, ProtocolError, asyncio.IncompleteReadError, ssl.SSLError, ConnectionError) as exc:
                log.warning("%r: connection lost (%s); reconnecting in %.2fs", self, exc, delay)
            finally:
                self._writer, self._conn = None, None
                for disk in self.disks.values():
                    disk._live = False
            if self._closing:
                return
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    def _give_up(self, exc: AgentError) -> None:
        log.error("%r: %s", self, exc)
        self._fatal = exc
        for disk in self.disks.values():
            disk._fail(exc)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
        self._wake_waiters()

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self._ssl, server_hostname=self._server_hostname, limit=4 * 1024 * 1024)
        writer.transport.set_write_buffer_limits(high=SEND_BUFFER_HIGH)
        conn = ClientConnection()
        try:
            writer.write(conn.send(Hello(PROTOCOL_VERSION, self.agent_id, self._token)))
            self._conn, self._writer = conn, writer
            heartbeat = asyncio.create_task(self._heartbeat(writer, conn))
            try:
                await self._read_loop(reader, conn)
            finally:
                heartbeat.cancel()
        finally:
            writer.close()

    async def _heartbeat(self, writer: asyncio.StreamWriter, conn: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if conn.state is State.READY:
                writer.write(conn.send(Heartbeat(time.time_ns() // 1000)))

    async def _read_loop(self, reader: asyncio.StreamReader, conn: ClientConnection) -> None:
        while True:
            data = await reader.read(1024 * 1024)
            if not data:
                conn.receive_eof()
                raise ConnectionError("server closed the connection")
            for frame in conn.receive_data(data):
                self._on_frame(frame)
            if self._writer is not None and self._writer.transport.get_write_buffer_size() > 8 * 1024 * 1024:
                await self._writer.drain()

    def _on_frame(self, frame: object) -> None:
        if isinstance(frame, Ack):
            for handle, seq in frame.acks:
                disk = self._by_handle.get(handle)
                if disk is not None:
                    disk._acknowledged(seq)
        elif isinstance(frame, DiskOpened):
            disk = self._by_handle.get(frame.handle)
            if disk is not None:
                if frame.resume_seq < disk.acked_seq:
                    # resending from there would be refused as a gap, or worse, taken for the lost writes
                    raise AgentError(f"disk {disk.disk!r}: the server resumes it after sequence {frame.resume_seq} "
                                     f"but had acknowledged up to {disk.acked_seq}: writes {frame.resume_seq + 1}-"
                                     f"{disk.acked_seq} were lost on the server (its spool or write-ahead log was "
                                     "lost or damaged); the disk needs a full resync: restart its agent, which "
                                     "sends every block again (docs/operations.md)")
                disk._resumed(frame.resume_seq)
                if disk._opened is not None and not disk._opened.done():
                    disk._opened.set_result(frame.resume_seq)
        elif isinstance(frame, Welcome):
            self.connections += 1
            for disk in self.disks.values():
                self._send_open(disk)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif isinstance(frame, Error):
            where = "".join([f" disk {frame.disk!r}" if frame.disk else "",
                             f" sequence {frame.seq}" if frame.seq is not None else ""])
            message = f"server refused{where}: {frame.code.name}: {frame.message}"
            if frame.code in FATAL_CODES:
                raise AgentError(message)
            raise ConnectionError(message)
        # HEARTBEAT needs no answer: our own heartbeat task keeps the server's idle timer fresh
