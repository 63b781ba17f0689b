"""Malformed and hostile agent traffic against a real process server over real TLS sockets.

Every case drives a raw protocol client (hand-made bytes, ``protocol.encode`` and
``encode_write_header``) at an in-process ``ProcessServer`` and checks four things:

* the exact ``ErrorCode`` of the server's ERROR frame, and that its message / disk /
  sequence name what was wrong;
* that the server then closed the connection (clean end of stream, on a frame boundary);
* that the server survived: a well-behaved ``Agent`` on the same server keeps
  replicating, and every seed disk ends byte-identical to what was written to it —
  including the writes acknowledged on the *same disk* (often on the very connection
  that then misbehaved) before the bad input: nothing acknowledged is lost;
* that no agent token ever reaches the server log.

Plus a log blob tampered with in the cache store, which the applier must refuse.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine.agent import Agent, AgentDisk
from engine.applier import ApplierLock
from engine.auth import add_agent, read_token
from engine.config import Config
from engine.disks import DiskRegistry
from engine.server import ConnectInfo, ProcessServer, build_applier, load_keyring, open_store
from engine.tls import client_context
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    DiskOpened,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    Hello,
    OpenDisk,
    TagKind,
    Welcome,
    Write,
    encode,
    encode_write_header,
)
from protocol.codec import FRAME_HEADER, WRITE_HEADER
from protocol.logblob import BlobHeader, blob_name

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
DISK_SIZE = 1 * MiB
BLOCK = 4096
VICTIM = "victim"  # the disk the raw client writes to, then misbehaves on
STEADY = "steady"  # a disk the well-behaved agent keeps replicating throughout
RAW_HANDLE = 7
T = 10.0  # seconds: upper bound of every single network wait


def blob(seed: int, size: int = BLOCK) -> bytes:
    return random.Random(seed).randbytes(size)


# ---------------------------------------------------------------- raw protocol client


class RawClient:
    """A TLS connection speaking the wire protocol by hand, with no client-side checks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.pending: deque[Frame] = deque()
        self.eof = False

    @classmethod
    async def connect(cls, info: ConnectInfo) -> RawClient:
        ctx = ssl.create_default_context(cafile=str(info.cafile))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", info.port, ssl=ctx, server_hostname="localhost"), T)
        return cls(reader, writer)

    def send(self, *chunks: bytes) -> None:
        self.writer.write(b"".join(chunks))

    async def next_frame(self) -> Frame | None:
        """The next frame from the server, or ``None`` once it closed the stream."""
        while not self.pending:
            if self.eof:
                return None
            data = await asyncio.wait_for(self.reader.read(64 * KiB), T)
            if not data:
                self.eof = True
                self.decoder.eof()  # raises TRUNCATED if the server stopped inside a frame
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.popleft()

    async def expect(self, kind: type) -> Frame:
        while True:
            frame = await self.next_frame()
            if isinstance(frame, Heartbeat):
                continue
            assert isinstance(frame, kind), f"expected {kind.__name__}, got {frame!r}"
            return frame

    async def hello(self, agent: str, token: str) -> Welcome:
        self.send(encode(Hello(PROTOCOL_VERSION, agent, token)))
        welcome = await self.expect(Welcome)
        assert welcome.version == PROTOCOL_VERSION
        return welcome

    async def open_disk(self, handle: int, disk: str, size: int = DISK_SIZE, block_size: int = BLOCK) -> DiskOpened:
        self.send(encode(OpenDisk(handle, disk, size, block_size)))
        opened = await self.expect(DiskOpened)
        assert (opened.handle, opened.disk) == (handle, disk)
        return opened

    async def wait_ack(self, handle: int, seq: int) -> None:
        while True:
            ack = await self.expect(Ack)
            if dict(ack.acks).get(handle, -1) >= seq:
                assert dict(ack.acks)[handle] == seq, ack  # never acknowledges what was not sent
                return

    async def error_then_close(self) -> Error:
        """Read to the end of the stream: exactly one ERROR, nothing after it, then the server's close."""
        frames: list[Frame] = []
        while (frame := await self.next_frame()) is not None:
            if not isinstance(frame, (Ack, Heartbeat)):
                frames.append(frame)
        assert self.eof, "the server did not close the connection"
        assert len(frames) == 1 and isinstance(frames[0], Error), f"want one ERROR then close, got {frames!r}"
        return frames[0]

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), T)
        except (ConnectionError, ssl.SSLError):
            pass


# ---------------------------------------------------------------- the server under test


@dataclass
class Env:
    cfg: Config
    ps: ProcessServer
    info: ConnectInfo
    tokens: dict[str, str]
    agent: Agent  # well-behaved agent-1
    caplog: pytest.LogCaptureFixture
    models: dict[str, bytearray] = field(default_factory=dict)
    victim_seq: int = 0  # highest sequence the raw client had acknowledged on VICTIM

    def seed_image(self, disk: str) -> bytes:
        return (self.cfg.seed_dir / f"{disk}.img").read_bytes()

    async def raw(self) -> RawClient:
        return await RawClient.connect(self.info)

    async def preload(self) -> RawClient:
        """A raw agent-1 connection that opened VICTIM and had sequences 1..3 acknowledged."""
        client = await self.raw()
        welcome = await client.hello("agent-1", self.tokens["agent-1"])
        assert welcome.max_frame == int(self.cfg.server.max_frame_bytes)
        opened = await client.open_disk(RAW_HANDLE, VICTIM)
        assert opened.resume_seq == 0
        for seq, offset in ((1, 0), (2, 64 * KiB), (3, DISK_SIZE - BLOCK)):  # the last block ends at the disk end
            self.raw_write(client, seq, offset, blob(100 + seq))
        await client.wait_ack(RAW_HANDLE, 3)
        self.victim_seq = 3
        return client

    def raw_write(self, client: RawClient, seq: int, offset: int, data: bytes) -> None:
        """A valid write; the model records it (callers only model writes they will see acknowledged)."""
        client.send(encode(Write.make(RAW_HANDLE, seq, offset, data, 1_700_000_000_000_000 + seq)))
        self.models[VICTIM][offset:offset + len(data)] = data

    async def agent_write(self, disk: AgentDisk, offset: int, data: bytes) -> None:
        await disk.write(offset, data)
        self.models[disk.disk][offset:offset + len(data)] = data

    def records(self) -> list[logging.LogRecord]:
        """Everything logged so far, including while the fixture set the server up."""
        return [*self.caplog.get_records("setup"), *self.caplog.get_records("call")]

    def log_lines(self, name: str = "engine.ingest", level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records() if r.name == name and r.levelno >= level]

    async def wait_log(self, *needles: str) -> str:
        for _ in range(int(T / 0.02)):
            for line in self.log_lines():
                if all(n in line for n in needles):
                    return line
            await asyncio.sleep(0.02)
        raise AssertionError(f"no server log line with {needles}: {self.log_lines()}")

    async def finish(self, *, victim_durable: int | None = None) -> None:
        """After the bad input: the server still works and nothing acknowledged was lost."""
        durable = self.victim_seq if victim_durable is None else victim_durable
        assert self.ps.pipeline is not None and self.ps.applier is not None
        assert self.ps.pipeline.streams[VICTIM].durable_seq == durable
        assert self.ps.pipeline.streams[VICTIM].accepted_seq == durable  # nothing of the bad input was taken
        steady = self.agent.disks[STEADY]
        await self.agent_write(steady, 128 * KiB, blob(20, 8 * KiB))
        victim = await asyncio.wait_for(self.agent.open_disk(VICTIM, DISK_SIZE, BLOCK), T)
        assert victim.acked_seq == durable, "the server resumed the disk from the wrong sequence"
        await self.agent_write(victim, 32 * KiB, blob(30, 2 * BLOCK))  # after the raw client's writes
        await self.agent_write(victim, 62 * KiB, blob(31, BLOCK))  # overlaps sequence 2's block
        await asyncio.wait_for(self.agent.flush(), T)
        assert victim.acked_seq == durable + 2
        await asyncio.wait_for(self.ps.drain(), T)
        assert self.ps.applier.failures == {}
        assert self.ps.applier.applied_seq(VICTIM) == durable + 2
        assert self.ps.applier.applied_seq(STEADY) == steady.acked_seq == 3
        for disk, model in self.models.items():
            image = self.seed_image(disk)
            assert len(image) == DISK_SIZE
            assert image == model, f"seed disk {disk!r} differs from what was acknowledged"
        self.assert_no_tokens_logged()

    def assert_no_tokens_logged(self, *extra_secrets: str) -> None:
        text = "\n".join(r.getMessage() for r in self.records()) + self.caplog.text
        for secret in [*self.tokens.values(), *extra_secrets]:
            assert secret not in text, "a token reached the server log"


@pytest.fixture
async def env(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[Env]:
    caplog.set_level(logging.DEBUG)
    cfg = Config.model_validate({
        "server": {"data_dir": str(tmp_path / "data"), "port": 0},
        "batch": {"linger_ms": 1},
        "applier": {"poll_ms": 20, "process": False},
        "http": {"port": 0},
    })
    # Every agent registered up front (the server then generates no default agent).
    tokens = {
        "agent-1": add_agent(cfg.agents_file, "agent-1"),
        "agent-2": add_agent(cfg.agents_file, "agent-2"),
        "agent-3": add_agent(cfg.agents_file, "agent-3", ("only-*",)),
    }
    ps = ProcessServer(cfg)
    await asyncio.wait_for(ps.start(), T)
    info = ps.connect_info
    assert info is not None
    agent = Agent("127.0.0.1", info.port, "agent-1", tokens["agent-1"], ssl_context=client_context(info.cafile),
                  server_hostname="localhost", reconnect_max_s=0.2)
    try:
        await asyncio.wait_for(agent.start(), T)
        e = Env(cfg, ps, info, tokens, agent, caplog)
        e.models = {STEADY: bytearray(DISK_SIZE), VICTIM: bytearray(DISK_SIZE)}
        steady = await asyncio.wait_for(agent.open_disk(STEADY, DISK_SIZE, BLOCK), T)
        await e.agent_write(steady, 0, blob(10, 16 * KiB))
        await e.agent_write(steady, DISK_SIZE - 512, blob(11, 512))  # the last sector: in bounds
        await asyncio.wait_for(agent.flush(), T)
        assert steady.acked_seq == 2
        yield e
    finally:
        await agent.close()
        try:  # everything accepted is applied before the server closes
            await asyncio.wait_for(ps.drain(), T)
        except Exception:  # the test already failed; closing is what matters now, but keep the cause visible
            logging.getLogger(__name__).warning("drain before close failed", exc_info=True)
        await close_or_fail(ps)


async def close_or_fail(ps: ProcessServer, timeout: float = T) -> None:
    """``ps.close()``, but a hang becomes a loud failure instead of a stuck suite."""
    task = asyncio.ensure_future(ps.close())
    done, _ = await asyncio.wait([task], timeout=timeout)
    if done:
        task.result()
        return
    task.cancel()  # cancels the stuck gather, which cancels the applier task a second time
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(ps.close(), T)
    raise AssertionError("ProcessServer.close() hung: the applier task swallowed its cancellation")


# ---------------------------------------------------------------- bad input on an authenticated connection


@dataclass(frozen=True)
class Bad:
    """Bytes sent on the preloaded connection (VICTIM open on RAW_HANDLE, sequences 1..3 acknowledged)."""

    code: ErrorCode
    wire: Callable[[Env], bytes]
    disk: str | None
    seq: int | None
    says: tuple[str, ...]  # substrings of the ERROR message that name what was wrong


def _write(handle: int, seq: int, offset: int, data: bytes, *, crc_xor: int = 0) -> bytes:
    frame = Write(handle, seq, offset, 1_700_000_000_000_000, data, zlib.crc32(data) ^ crc_xor)
    return encode_write_header(frame) + data


READY_CASES = {
    "write-to-unopened-handle": Bad(ErrorCode.DISK_NOT_OPEN, lambda e: _write(99, 4, 0, blob(1)), None, 4,
                                    ("not opened",)),
    "out-of-bounds-straddling-end": Bad(ErrorCode.OUT_OF_BOUNDS,
                                        lambda e: _write(RAW_HANDLE, 4, DISK_SIZE - 512, blob(2, 1024)), VICTIM, 4,
                                        (f"at offset {DISK_SIZE - 512}", f"disk size {DISK_SIZE}", "1024 bytes")),
    "out-of-bounds-at-end": Bad(ErrorCode.OUT_OF_BOUNDS, lambda e: _write(RAW_HANDLE, 4, DISK_SIZE, blob(2, 512)),
                                VICTIM, 4, (f"at offset {DISK_SIZE}", f"disk size {DISK_SIZE}")),
    "out-of-bounds-far": Bad(ErrorCode.OUT_OF_BOUNDS, lambda e: _write(RAW_HANDLE, 4, 2**64 - 512, blob(2, 512)),
                             VICTIM, 4, (f"at offset {2**64 - 512}",)),
    "misaligned-offset": Bad(ErrorCode.BAD_ALIGNMENT, lambda e: _write(RAW_HANDLE, 4, 4096 + 100, blob(3)), VICTIM,
                             4, ("offset 4196", "512")),
    "misaligned-length": Bad(ErrorCode.BAD_ALIGNMENT, lambda e: _write(RAW_HANDLE, 4, 4096, blob(3, 700)), VICTIM,
                             4, ("length 700", "512")),
    "bad-checksum": Bad(ErrorCode.BAD_CHECKSUM, lambda e: _write(RAW_HANDLE, 4, 4096, blob(4), crc_xor=1), VICTIM, 4,
                        ("CRC-32", "offset 4096")),
    "sequence-gap": Bad(ErrorCode.SEQUENCE_GAP, lambda e: _write(RAW_HANDLE, 6, 4096, blob(5)), VICTIM, 6,
                        ("expected sequence 4",)),
    "second-hello": Bad(ErrorCode.UNEXPECTED_FRAME,
                        lambda e: encode(Hello(PROTOCOL_VERSION, "agent-1", e.tokens["agent-1"])), None, None,
                        ("Hello", "ready")),
    "frame-too-large-header-only": Bad(
        ErrorCode.FRAME_TOO_LARGE,
        lambda e: FRAME_HEADER.pack(int(e.cfg.server.max_frame_bytes) + 1, FrameType.WRITE), None, None,
        ("exceeds",)),
    "frame-too-large-u32-max": Bad(ErrorCode.FRAME_TOO_LARGE, lambda e: FRAME_HEADER.pack(2**32 - 1, FrameType.WRITE),
                                   None, None, (str(2**32 - 1),)),
    "unknown-frame-type": Bad(ErrorCode.UNKNOWN_FRAME_TYPE, lambda e: FRAME_HEADER.pack(0, 42), None, None,
                              ("unknown frame type 42",)),
    "write-shorter-than-header": Bad(ErrorCode.BAD_FRAME,
                                     lambda e: FRAME_HEADER.pack(10, FrameType.WRITE) + bytes(10), None, None,
                                     ("shorter than",)),
    "open-disk-not-msgpack": Bad(ErrorCode.BAD_FRAME, lambda e: FRAME_HEADER.pack(3, FrameType.OPEN_DISK) + b"\xc1ab",
                                 None, None, ("OPEN_DISK", "msgpack")),
    "open-disk-path-traversal": Bad(ErrorCode.BAD_FRAME, lambda e: encode(OpenDisk(8, "../../etc", DISK_SIZE, BLOCK)),
                                    None, None, ("'../../etc'",)),
    "open-disk-size-mismatch": Bad(ErrorCode.DISK_MISMATCH,
                                   lambda e: encode(OpenDisk(8, STEADY, 2 * DISK_SIZE, BLOCK)), STEADY, None,
                                   (str(DISK_SIZE), str(2 * DISK_SIZE))),
    "reopen-handle": Bad(ErrorCode.BAD_FRAME, lambda e: encode(OpenDisk(RAW_HANDLE, STEADY, DISK_SIZE, BLOCK)),
                         VICTIM, None, (f"handle {RAW_HANDLE}",)),
}


@pytest.mark.parametrize("case", list(READY_CASES.values()), ids=list(READY_CASES))
async def test_bad_frame_after_acknowledged_writes(env: Env, case: Bad) -> None:
    client = await env.preload()
    client.send(case.wire(env))
    error = await client.error_then_close()
    assert error.code is case.code, error
    assert (error.disk, error.seq) == (case.disk, case.seq), error
    for needle in case.says:
        assert needle in error.message, (needle, error)
    # the server logged it naming the same disk and sequence
    where = "".join([f" disk {case.disk!r}" if case.disk else "", f" sequence {case.seq}" if case.seq else ""])
    await env.wait_log("agent agent-1 (127.0.0.1:", f"{where} {case.code.name}: {error.message}")
    await client.close()
    await env.finish()


async def test_bad_checksum_is_logged_with_disk_and_sequence(env: Env) -> None:
    client = await env.preload()
    # a good write (sequence 4) in its own round trip, then one whose payload was damaged in flight
    env.raw_write(client, 4, 8 * KiB, blob(40))
    await client.wait_ack(RAW_HANDLE, 4)
    env.victim_seq = 4
    damaged = bytearray(_write(RAW_HANDLE, 5, 12 * KiB, blob(41)))
    damaged[-1] ^= 0xFF  # the last payload byte: header and CRC intact
    client.send(bytes(damaged))
    error = await client.error_then_close()
    assert error.code is ErrorCode.BAD_CHECKSUM
    assert (error.disk, error.seq) == (VICTIM, 5)
    assert "offset 12288" in error.message and "4096 bytes" in error.message
    line = await env.wait_log("BAD_CHECKSUM")
    assert "disk 'victim'" in line and "sequence 5" in line and "agent-1" in line, line
    records = [r for r in env.records() if "BAD_CHECKSUM" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    await client.close()
    await env.finish()
    assert env.seed_image(VICTIM)[12 * KiB:16 * KiB] == bytes(BLOCK)  # the damaged write never reached the seed


async def test_duplicate_sequence_with_other_content_is_ignored(env: Env) -> None:
    """A resend of an acknowledged sequence is skipped and acknowledged again, not applied."""
    client = await env.preload()
    client.send(_write(RAW_HANDLE, 2, 512 * KiB, blob(50)))  # sequence 2 again, different place and bytes
    await client.wait_ack(RAW_HANDLE, 3)
    env.raw_write(client, 4, 16 * KiB, blob(51))  # the connection is still in business
    await client.wait_ack(RAW_HANDLE, 4)
    env.victim_seq = 4
    await client.close()
    await env.finish()
    assert env.seed_image(VICTIM)[512 * KiB:516 * KiB] == bytes(BLOCK)


# ---------------------------------------------------------------- bad input before / during authentication


async def _fresh_connection_case(env: Env, wire: bytes, *, hello_first: tuple[str, str] | None = None,
                                 before: Callable[[RawClient], Awaitable[None]] | None = None) -> Error:
    """Preload VICTIM on one connection, misbehave on a second one, then prove the first still works."""
    good = await env.preload()
    bad = await env.raw()
    if hello_first is not None:
        await bad.hello(*hello_first)
    if before is not None:
        await before(bad)
    bad.send(wire)
    error = await bad.error_then_close()
    await bad.close()
    # the well-behaved connection (same server, often the same agent) is unaffected
    env.raw_write(good, 4, 8 * KiB, blob(60))
    await good.wait_ack(RAW_HANDLE, 4)
    env.victim_seq = 4
    await good.close()
    return error


def _connected_lines(env: Env, agent_id: str) -> list[str]:
    return [line for line in env.log_lines(level=logging.INFO) if line.startswith(f"agent {agent_id} connected")]


@pytest.mark.parametrize("agent_id, token", [("agent-1", "not-the-token"), ("agent-1", ""), ("ghost", None),
                                             ("agent-2", None)],
                         ids=["wrong-token", "empty-token", "unknown-agent", "other-agents-token"])
async def test_auth_failed(env: Env, agent_id: str, token: str | None) -> None:
    token = env.tokens["agent-1"] if token is None else token  # None: a valid token, but agent-1's
    error = await _fresh_connection_case(env, encode(Hello(PROTOCOL_VERSION, agent_id, token)))
    assert error.code is ErrorCode.AUTH_FAILED
    assert (error.disk, error.seq) == (None, None)
    assert error.message == f"unknown agent {agent_id!r} or wrong token"
    line = await env.wait_log("(unauthenticated)", "AUTH_FAILED", repr(agent_id))
    if token:
        assert token not in line
    # only the fixture's agent and the preloading connection ever authenticated
    assert len(_connected_lines(env, "agent-1")) == 2
    if agent_id != "agent-1":
        assert _connected_lines(env, agent_id) == []
    await env.finish()
    env.assert_no_tokens_logged(*([token] if token else []))


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 2**32])
async def test_unsupported_version(env: Env, version: int) -> None:
    error = await _fresh_connection_case(env, encode(Hello(version, "agent-1", env.tokens["agent-1"])))
    assert error.code is ErrorCode.UNSUPPORTED_VERSION
    assert (error.disk, error.seq) == (None, None)
    assert f"version {version}" in error.message and f"server {PROTOCOL_VERSION}" in error.message
    await env.wait_log("UNSUPPORTED_VERSION", f"version {version}")
    assert len(_connected_lines(env, "agent-1")) == 2  # the refused HELLO did not authenticate
    await env.finish()


@pytest.mark.parametrize("first", ["open-disk", "write", "heartbeat"])
async def test_frame_before_hello(env: Env, first: str) -> None:
    wire = {
        "open-disk": encode(OpenDisk(1, VICTIM, DISK_SIZE, BLOCK)),
        "write": _write(RAW_HANDLE, 4, 0, blob(70)),
        "heartbeat": encode(Heartbeat(1)),
    }[first]
    error = await _fresh_connection_case(env, wire)
    assert error.code is ErrorCode.UNEXPECTED_FRAME
    assert error.message == (f"{ {'open-disk': 'OpenDisk', 'write': 'Write', 'heartbeat': 'Heartbeat'}[first]} "
                             "frame not allowed in state await-hello")
    assert (error.disk, error.seq) == (None, None)
    await env.wait_log("(unauthenticated)", "UNEXPECTED_FRAME")
    await env.finish()


async def test_open_disk_pipelined_before_welcome_is_refused(env: Env) -> None:
    """HELLO and OPEN_DISK in one send: the agent must wait for WELCOME (FORMAT.md 7.2)."""
    error = await _fresh_connection_case(env, encode(Hello(PROTOCOL_VERSION, "agent-1", env.tokens["agent-1"]))
                                         + encode(OpenDisk(1, "fresh-disk", DISK_SIZE, BLOCK)))
    assert error.code is ErrorCode.UNEXPECTED_FRAME
    assert error.message == "OpenDisk frame not allowed in state await-welcome"
    assert env.ps.pipeline is not None and "fresh-disk" not in env.ps.pipeline.streams
    await env.finish()


async def test_disk_owned_by_another_agent(env: Env) -> None:
    error = await _fresh_connection_case(env, encode(OpenDisk(1, VICTIM, DISK_SIZE, BLOCK)),
                                         hello_first=("agent-2", env.tokens["agent-2"]))
    assert error.code is ErrorCode.DISK_NOT_ALLOWED
    assert (error.disk, error.seq) == (VICTIM, None)
    assert "another agent" in error.message
    line = await env.wait_log("DISK_NOT_ALLOWED")
    assert "agent agent-2 (" in line and "disk 'victim'" in line, line
    # the refused open did not take the disk over
    info = DiskRegistry(env.cfg.state_dir / "disks").get(VICTIM)
    assert info is not None and info.owner == "agent-1"
    await env.finish()


async def test_disk_outside_the_agents_allowed_patterns(env: Env) -> None:
    async def open_allowed(client: RawClient) -> None:
        opened = await client.open_disk(1, "only-mine")  # within agent-3's "only-*"
        assert opened.resume_seq == 0

    error = await _fresh_connection_case(env, encode(OpenDisk(2, VICTIM, DISK_SIZE, BLOCK)),
                                         hello_first=("agent-3", env.tokens["agent-3"]), before=open_allowed)
    assert error.code is ErrorCode.DISK_NOT_ALLOWED
    assert (error.disk, error.seq) == (VICTIM, None)
    assert error.message == "agent 'agent-3' may not open this disk"
    line = await env.wait_log("DISK_NOT_ALLOWED")
    assert "agent agent-3 (" in line and "disk 'victim'" in line, line
    await env.finish()


# ---------------------------------------------------------------- truncated frames


@pytest.mark.parametrize("cut, ending", [("header", "close"), ("write-header", "close"), ("payload", "close"),
                                         ("payload", "abort")])
async def test_truncated_frame_then_end_of_stream(env: Env, cut: str, ending: str) -> None:
    client = await env.preload()
    frame = _write(RAW_HANDLE, 4, 768 * KiB, blob(80, 64 * KiB))  # a region no other write touches
    keep = {"header": 3, "write-header": FRAME_HEADER.size + WRITE_HEADER.size - 5, "payload": len(frame) // 2}[cut]
    client.send(frame[:keep])
    await client.writer.drain()
    await asyncio.sleep(0.05)  # let the server take in the partial frame before the stream ends
    if ending == "close":  # TLS close_notify: a clean end of stream inside a frame
        await client.close()
        line = await env.wait_log("TRUNCATED")
        assert f"{keep} of {FRAME_HEADER.size if cut == 'header' else len(frame)} bytes" in line, line
        assert "agent-1" in line
    else:  # the TCP connection just drops
        client.writer.transport.abort()
        await asyncio.sleep(0.1)
    assert env.ps.pipeline is not None
    assert env.ps.pipeline.streams[VICTIM].accepted_seq == 3
    # the server is still serving new connections
    fresh = await env.raw()
    await fresh.hello("agent-2", env.tokens["agent-2"])
    await fresh.close()
    await env.finish()
    assert env.seed_image(VICTIM)[768 * KiB:832 * KiB] == bytes(64 * KiB)


# ---------------------------------------------------------------- known bug: the unopened handle is not named


async def test_disk_not_open_error_names_the_handle(env: Env) -> None:
    client = await env.preload()
    client.send(_write(99, 4, 0, blob(1)))
    error = await client.error_then_close()
    assert error.code is ErrorCode.DISK_NOT_OPEN and error.seq == 4
    line = await env.wait_log("DISK_NOT_OPEN")
    assert "99" in error.message and "99" in line


# ---------------------------------------------------------------- a log blob altered in the cache store


def _flip_at(where: str, data: bytes) -> int:
    header = BlobHeader.unpack(data)
    return {
        "ciphertext": header.size + header.payload_size // 2,
        "gcm-tag": len(data) - 1,
        "header-first-seq": 36,  # low byte of first_seq: authenticated as GCM associated data
    }[where]


@pytest.mark.parametrize("tags", [
    "app",  # an APP tag ends every blob: each blob is its own apply group
    "crash",  # the backlog of three blobs is one apply group: its verified prefix must still be applied
])
@pytest.mark.parametrize("where", ["ciphertext", "gcm-tag", "header-first-seq",
                                   "another-blob"])  # a whole blob put under the next one's name
async def test_tampered_blob_is_refused_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 where: str, tags: str) -> None:
    caplog.set_level(logging.INFO)
    disk_name = "tamper"
    cfg = Config.model_validate({"server": {"data_dir": str(tmp_path / "data"), "port": 0}, "http": {"port": 0},
                                 "batch": {"linger_ms": 60_000}})  # only the tags cut batches: 3 blobs
    model = bytearray(DISK_SIZE)
    after_first = b""
    async with ProcessServer(cfg, run_applier=False) as ps:
        info = ps.connect_info
        assert info is not None and info.token_file is not None and ps.pipeline is not None
        agent = Agent("127.0.0.1", info.port, "agent-1", read_token(info.token_file),
                      ssl_context=client_context(info.cafile), server_hostname="localhost")
        async with agent:
            disk = await asyncio.wait_for(agent.open_disk(disk_name, DISK_SIZE), T)
            for group in range(3):  # per blob: two writes and a tag; group 1 overwrites part of group 0
                for i, offset in enumerate(((0, 64 * KiB), (8 * KiB, 128 * KiB), (256 * KiB, 512 * KiB))[group]):
                    data = blob(1000 + 10 * group + i, 16 * KiB)
                    await disk.write(offset, data)
                    model[offset:offset + len(data)] = data
                await disk.tag(TagKind.APP if tags == "app" else TagKind.CRASH, f"g{group}")
                await asyncio.wait_for(disk.flush(), T)
                if group == 0:
                    after_first = bytes(model)
            assert disk.acked_seq == 9
        await asyncio.wait_for(ps.pipeline.drain(), T)
    names = [blob_name(disk_name, 1, 3), blob_name(disk_name, 4, 6), blob_name(disk_name, 7, 9)]
    paths = [cfg.store_dir / n for n in names]
    assert sorted(cfg.store_dir.glob(f"{disk_name}/*.bflog")) == paths
    if where == "another-blob":
        tampered = bytearray(paths[2].read_bytes())
    else:
        tampered = bytearray(paths[1].read_bytes())
        tampered[_flip_at(where, bytes(tampered))] ^= 0x01
    paths[1].write_bytes(tampered)
    third = paths[2].read_bytes()

    lock = ApplierLock(cfg.seed_dir)
    lock.acquire("test_bad_input")
    store = open_store(cfg)
    applier = build_applier(cfg, store, load_keyring(cfg, create=False))
    try:
        await asyncio.wait_for(applier.apply_available(force=True), T)
        failure = applier.failures.get(disk_name)
        assert failure is not None, "the tampered blob was not reported"
        assert failure.disk == disk_name and failure.blob == names[1], failure
        assert ("holds blob" if where == "another-blob" else "authentication") in failure.reason, failure
        errors = [r for r in caplog.records if r.name == "engine.applier" and r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert f"{disk_name!r}" in errors[0].getMessage() and names[1] in errors[0].getMessage()
        assert paths[1].read_bytes() == tampered  # kept for the operator, untouched
        assert paths[2].read_bytes() == third  # everything after it waits
        image_path = cfg.seed_dir / f"{disk_name}.img"
        image = image_path.read_bytes() if image_path.exists() else b""
        padded = image.ljust(DISK_SIZE, b"\0")  # a seed image never written reads as zeros
        assert padded[8 * KiB:24 * KiB] != model[8 * KiB:24 * KiB]  # none of the tampered blob's writes
        assert padded[128 * KiB:144 * KiB] == bytes(16 * KiB)
        # the blob before it is authentic: it is applied (and then deleted)
        assert applier.applied_seq(disk_name) == 3
        assert image == after_first, "the seed disk must hold exactly the blobs before the tampered one"
        assert not paths[0].exists()
        # the disk stays stopped: another pass applies nothing and changes nothing
        assert await asyncio.wait_for(applier.apply_available(force=True), T) == 0
        assert paths[1].exists() and paths[2].exists()
        assert (cfg.seed_dir / f"{disk_name}.img").read_bytes() == after_first
    finally:
        await applier.close()
        await store.close()
        lock.release()


# ---------------------------------------------------------------- close() must not hang when the applier is woken
# (Python 3.11's wait_for could swallow the cancellation when a wake-up raced with close(): CPython gh-86296)


@pytest.mark.parametrize("iterations", [0, 1])
async def test_close_while_the_applier_is_being_woken_returns(tmp_path: Path, iterations: int) -> None:
    cfg = Config.model_validate({"server": {"data_dir": str(tmp_path / "data"), "port": 0}, "http": {"port": 0},
                                 "applier": {"process": False}})
    ps = ProcessServer(cfg, control_plane=False)  # so close() cancels its tasks without awaiting anything first
    await asyncio.wait_for(ps.start(), T)
    await asyncio.sleep(0.05)  # the applier is now waiting for a wake-up or its poll interval
    assert ps.applier is not None
    ps.applier.notify()  # what the pipeline does after each upload
    for _ in range(iterations):
        await asyncio.sleep(0)
    await close_or_fail(ps, timeout=2)  # an idle server closes in milliseconds
