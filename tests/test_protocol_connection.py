"""Role-aware state machines: what a process server accepts from an agent and vice versa."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codec import encode, encode_write_header
from protocol.connection import ClientConnection, ServerConnection, State
from protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
    Ack,
    DiskOpened,
    Error,
    Heartbeat,
    Hello,
    OpenDisk,
    Tag,
    TagKind,
    Welcome,
    Write,
)

TOKEN = "tok-3f9a1c7e5b2d4f60"
HELLO = Hello(PROTOCOL_VERSION, "agent-7", TOKEN)
WELCOME = Welcome(PROTOCOL_VERSION, "ps-1", 1 << 20)


def write(handle: int = 1, seq: int = 1) -> Write:
    return Write.make(handle, seq, 4096, b"w" * 512, 1_000)


def wire(frame) -> bytes:
    return encode(frame)


def ready_server(*handles: int) -> ServerConnection:
    server = ServerConnection()
    assert server.receive_data(wire(HELLO)) == [HELLO]
    server.send(WELCOME)
    for h in handles:
        server.receive_data(wire(OpenDisk(h, f"disk-{h}", 1 << 30, 4096)))
        server.send(DiskOpened(h, f"disk-{h}", 0))
    assert server.state is State.READY
    return server


def ready_client(*handles: int) -> ClientConnection:
    client = ClientConnection()
    client.send(HELLO)
    client.receive_data(wire(WELCOME))
    for h in handles:
        client.send(OpenDisk(h, f"disk-{h}", 1 << 30, 4096))
        client.receive_data(wire(DiskOpened(h, f"disk-{h}", 0)))
    assert client.state is State.READY
    return client


def refused(conn, frame, code: ErrorCode = ErrorCode.UNEXPECTED_FRAME) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(wire(frame))
    assert info.value.code is code, str(info.value)
    return info.value


# ---------------------------------------------------------------- server side

AGENT_FRAMES = [OpenDisk(1, "d", 1 << 20, 512), write(), Tag(1, 1, TagKind.CRASH, "t", 0), Heartbeat(1),
                Error(ErrorCode.INTERNAL, "x")]
SERVER_FRAMES = [WELCOME, DiskOpened(1, "d", 0), Ack(((1, 1),))]


@pytest.mark.parametrize("frame", AGENT_FRAMES + SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_refuses_non_hello_first_frame(frame):
    server = ServerConnection()
    assert server.state is State.AWAIT_HELLO
    exc = refused(server, frame)
    assert type(frame).__name__ in str(exc)
    assert server.agent is None


def test_server_hello_then_welcome():
    server = ServerConnection()
    assert server.receive_data(wire(HELLO)) == [HELLO]
    assert server.agent == "agent-7"
    assert server.state is State.AWAIT_WELCOME
    assert server.send(WELCOME) == wire(WELCOME)
    assert server.state is State.READY


@pytest.mark.parametrize("frame", AGENT_FRAMES, ids=lambda f: type(f).__name__)
def test_server_refuses_frames_before_it_has_welcomed(frame):
    server = ServerConnection()
    server.receive_data(wire(HELLO))
    exc = refused(server, frame)
    assert "await-welcome" in str(exc)


def test_server_refuses_a_second_hello_without_leaking_the_token():
    server = ready_server()
    exc = refused(server, HELLO)
    assert "Hello frame not allowed in state ready" in str(exc)
    assert TOKEN not in str(exc) and TOKEN not in repr(exc)


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: type(f).__name__)
def test_server_refuses_frames_only_a_server_sends(frame):
    refused(ready_server(1), frame)


def test_welcome_only_once():
    server = ready_server()
    with pytest.raises(LocalProtocolError) as info:
        server.welcome(WELCOME)
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    with pytest.raises(LocalProtocolError):
        ServerConnection().welcome(WELCOME)  # nor before the HELLO


@settings(max_examples=60, deadline=None)
@given(opened=st.sets(st.integers(0, 2**32 - 1), max_size=4), handle=st.integers(0, 2**32 - 1),
       seq=st.integers(1, 2**64 - 1), as_tag=st.booleans())
def test_server_refuses_writes_and_tags_on_unopened_handles(opened, handle, seq, as_tag):
    server = ready_server(*opened)
    frame = Tag(handle, seq, TagKind.APP, "t", 0) if as_tag else write(handle, seq)
    if handle in opened:
        assert server.receive_data(wire(frame))[0].seq == seq
        return
    exc = refused(server, frame, ErrorCode.DISK_NOT_OPEN)
    assert (exc.handle, exc.seq) == (handle, seq)
    assert f"disk handle {handle}" in str(exc) and f"sequence {seq}" in str(exc)


def test_server_binds_handle_only_when_it_sends_disk_opened():
    server = ready_server()
    opened = server.receive_data(wire(OpenDisk(5, "vm-5", 1 << 30, 4096)))
    assert opened == [OpenDisk(5, "vm-5", 1 << 30, 4096)]
    refused(server, write(5), ErrorCode.DISK_NOT_OPEN)  # pipelined before DISK_OPENED: refused


def test_server_accepts_writes_and_tags_after_disk_opened():
    server = ready_server()
    server.receive_data(wire(OpenDisk(5, "vm-5", 1 << 30, 4096)))
    server.send(DiskOpened(5, "vm-5", 10))
    assert server.disk_of(5) == "vm-5" and server.disk_of(6) is None
    frames = server.receive_data(wire(write(5, 11)) + wire(Tag(5, 12, TagKind.APP, "snap", 2)) + wire(Heartbeat(3)))
    assert [type(f) for f in frames] == [Write, Tag, Heartbeat]
    assert [frames[0].seq, frames[1].seq] == [11, 12]
    assert server.send(Ack(((5, 12),))) == wire(Ack(((5, 12),)))


def test_server_refuses_reopening_an_open_handle():
    server = ready_server(3)
    exc = refused(server, OpenDisk(3, "other", 1 << 20, 512), ErrorCode.BAD_FRAME)
    assert exc.disk == "disk-3"
    assert "handle 3 is already open" in str(exc)


def test_server_sending_error_closes():
    server = ready_server(1)
    out = server.send(Error(ErrorCode.SEQUENCE_GAP, "expected 5", "disk-1", 7))
    assert out == wire(Error(ErrorCode.SEQUENCE_GAP, "expected 5", "disk-1", 7))
    assert server.state is State.CLOSED
    refused(server, write(1, 5))


def test_server_decoder_errors_propagate_and_stick():
    server = ready_server(1)
    bad = Write(1, 9, 0, 0, b"x" * 512, 0)  # wrong CRC
    exc = refused(server, bad, ErrorCode.BAD_CHECKSUM)
    assert (exc.handle, exc.seq) == (1, 9)
    with pytest.raises(RemoteProtocolError) as again:
        server.receive_data(wire(Heartbeat(1)))
    assert again.value is exc


def test_receive_eof_inside_a_frame():
    server = ready_server(1)
    server.receive_data(wire(write(1, 1))[:20])
    assert server.buffered == 20 - 5  # the 5-byte frame header is parsed, 15 body bytes are held
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_eof()
    assert info.value.code is ErrorCode.TRUNCATED
    assert server.state is State.CLOSED


# ---------------------------------------------------------------- client side


@pytest.mark.parametrize("frame", [OpenDisk(1, "d", 1 << 20, 512), Tag(1, 1, TagKind.APP, "t", 0), Heartbeat(0)],
                         ids=lambda f: type(f).__name__)
def test_client_refuses_to_send_before_welcome(frame):
    client = ClientConnection()
    with pytest.raises(LocalProtocolError) as info:
        client.send(frame)  # before HELLO
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    client.send(HELLO)
    assert client.state is State.AWAIT_WELCOME
    with pytest.raises(LocalProtocolError) as info:
        client.send(frame)  # after HELLO, before WELCOME
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    assert "before the server's WELCOME" in str(info.value)
    client.receive_data(wire(WELCOME))
    if isinstance(frame, Tag):  # a tag also needs its disk opened
        client.receive_data(wire(DiskOpened(frame.handle, "disk-a", 0)))
    assert client.send(frame) == wire(frame)


def test_client_refuses_write_header_before_welcome_and_before_disk_opened():
    client = ClientConnection()
    client.send(HELLO)
    with pytest.raises(LocalProtocolError) as info:
        client.send_write_header(write(1, 4))
    assert info.value.code is ErrorCode.DISK_NOT_OPEN and (info.value.handle, info.value.seq) == (1, 4)
    client.receive_data(wire(WELCOME))
    with pytest.raises(LocalProtocolError) as info:
        client.send_write_header(write(1, 4))
    assert info.value.code is ErrorCode.DISK_NOT_OPEN
    client.receive_data(wire(DiskOpened(1, "disk-1", 3)))
    assert client.disk_of(1) == "disk-1"
    assert client.send_write_header(write(1, 4)) == encode_write_header(write(1, 4))


def test_client_hello_only_once():
    client = ClientConnection()
    assert client.send(HELLO) == wire(HELLO)
    with pytest.raises(LocalProtocolError) as info:
        client.send(HELLO)
    assert "HELLO must be the first frame" in str(info.value)


@pytest.mark.parametrize("frame", [DiskOpened(1, "d", 0), Ack(((1, 1),)), Heartbeat(1)],
                         ids=lambda f: type(f).__name__)
def test_client_refuses_anything_but_welcome_first(frame):
    client = ClientConnection()
    client.send(HELLO)
    refused(client, frame)


def test_client_refuses_welcome_it_did_not_ask_for_and_a_second_welcome():
    refused(ClientConnection(), WELCOME)
    refused(ready_client(), WELCOME)


@pytest.mark.parametrize("frame", [HELLO, OpenDisk(1, "d", 1, 512), write(), Tag(1, 1, TagKind.APP, "t", 0)],
                         ids=lambda f: type(f).__name__)
def test_client_refuses_frames_only_an_agent_sends(frame):
    refused(ready_client(1), frame)


@pytest.mark.parametrize("ready", [False, True])
def test_client_accepts_error_in_any_state_and_closes(ready):
    client = ready_client() if ready else ClientConnection()
    if not ready:
        client.send(HELLO)
    err = Error(ErrorCode.AUTH_FAILED, "bad token")
    assert client.receive_data(wire(err)) == [err]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.send(Heartbeat(1))


def test_client_refuses_tag_on_unopened_handle():
    client = ready_client()
    with pytest.raises(LocalProtocolError):
        client.send(Tag(9, 1, TagKind.APP, "t", 0))


# ---------------------------------------------------------------- both sides


@settings(max_examples=40, deadline=None)
@given(n_writes=st.integers(0, 6), resume=st.integers(0, 1000), data=st.data())
def test_full_session_through_bytes(n_writes, resume, data):
    """Agent and server state machines talking to each other, the stream split arbitrarily."""
    client, server = ClientConnection(), ServerConnection()

    def deliver(conn, stream: bytes) -> list:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
        out = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            out += conn.receive_data(stream[a:b])
        return out

    assert deliver(server, client.send(HELLO)) == [HELLO]
    assert deliver(client, server.send(WELCOME)) == [WELCOME]
    opened = deliver(server, client.send(OpenDisk(2, "vm-2", 1 << 30, 4096)))
    assert opened == [OpenDisk(2, "vm-2", 1 << 30, 4096)]
    assert deliver(client, server.send(DiskOpened(2, "vm-2", resume))) == [DiskOpened(2, "vm-2", resume)]

    stream = b""
    sent = []
    for i in range(n_writes):
        w = Write.make(2, resume + 1 + i, 512 * i, bytes([i]) * 512, 100 + i)
        stream += client.send_write_header(w) + w.data
        sent.append(w.seq)
    tag = Tag(2, resume + n_writes + 1, TagKind.APP, "consistent", 999)
    stream += client.send(tag)
    got = deliver(server, stream)
    assert [f.seq for f in got] == [*sent, tag.seq]
    assert got[-1] == tag
    assert all(bytes(f.data) == bytes([i]) * 512 for i, f in enumerate(got[:-1]))
    assert deliver(client, server.send(Ack(((2, tag.seq),)))) == [Ack(((2, tag.seq),))]
    assert client.buffered == 0 and server.buffered == 0


# ---------------------------------------------------------------- credentials

tokens = st.text(alphabet="0123456789abcdef", min_size=16, max_size=64)


@settings(max_examples=100, deadline=None)
@given(token=tokens, agent=st.text(alphabet="ghijklmnop-_", max_size=20), version=st.integers(0, 2**16))
def test_hello_repr_never_shows_the_token(token, agent, version):
    hello = Hello(version, agent, token)
    decoded = ServerConnection().receive_data(encode(hello))[0]
    assert decoded.token == token  # the token does travel on the wire...
    for h in (hello, decoded):  # ...but never into logs
        for shown in (repr(h), str(h), f"{h}", f"{h!r}", repr([h]), repr({"frame": h}), repr((h,))):
            assert token not in shown
            assert "token=<redacted>" in shown
            assert f"agent={agent!r}" in shown and f"version={version}" in shown
