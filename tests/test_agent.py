"""The agent library's own promises, over a real TLS connection to a real process server."""

from __future__ import annotations

import asyncio

from support import agent_for

from engine.agent import SEND_BUFFER_HIGH
from engine.server import ProcessServer

KiB = 1024
MiB = 1024 * KiB


async def test_disks_of_one_agent_share_it_fairly(server: ProcessServer) -> None:
    """Two writers that never hit the window (32 MiB each, window 64 MiB) must interleave: before the
    fix the first one ran to the end before the second wrote anything."""
    assert server.connect_info is not None
    order: list[str] = []
    async with agent_for(server.config.server.data_dir, server.connect_info.port) as agent:
        for name in ("a", "b"):
            await agent.open_disk(name, 64 * MiB)
        payload = bytes(range(256)) * 256  # 64 KiB

        async def writer(name: str) -> None:
            disk = agent.disks[name]
            for i in range(512):  # 32 MiB
                await disk.write(i * len(payload), payload)
                order.append(name)

        await asyncio.gather(writer("a"), writer("b"))
        await agent.flush()
    last = {name: max(i for i, n in enumerate(order) if n == name) for name in "ab"}
    first_done = min(last.values()) + 1  # when the first writer had written everything
    behind = min(order[:first_done].count(name) for name in "ab")
    assert behind >= 512 // 4, f"one disk waited: {behind} of 512 writes when the other finished"


async def test_a_writer_waits_once_its_connection_holds_a_bounded_backlog(server: ProcessServer) -> None:
    """While the server reads nothing (its ingest paused, as under memory pressure), an agent's writes queue
    in its TLS transport only up to SEND_BUFFER_HIGH and a write, then wait: uvloop's transport encrypts all
    that is queued into one buffer and takes it out whole, so a backlog of MiBs meant fresh memory each time."""
    assert server.connect_info is not None and server.pipeline is not None
    async with agent_for(server.config.server.data_dir, server.connect_info.port) as agent:
        disk = await agent.open_disk("p", 64 * MiB)
        payload = bytes(range(256)) * 256  # 64 KiB
        server.pipeline._set_paused(True)

        async def writer() -> None:
            for i in range(1024):  # as much as the window takes: the socket fills first
                await disk.write(i * len(payload), payload)

        writing = asyncio.create_task(writer())
        sent = -1
        while disk.sent_bytes != sent:  # until the writer stopped making progress
            sent = disk.sent_bytes
            await asyncio.sleep(0.3)
        assert not writing.done() and sent < 64 * MiB
        assert agent._writer is not None
        backlog = agent._writer.transport.get_write_buffer_size()
        assert backlog <= SEND_BUFFER_HIGH + len(payload) <= 512 * KiB, f"{backlog} bytes queued in the transport"
        server.pipeline._set_paused(False)
        await writing
        await agent.flush()
