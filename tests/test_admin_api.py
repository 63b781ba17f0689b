"""The CLI's path to a running applier: the lock advertises the admin API, the API does the work."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from support import agent_for, make_config

from engine.recovery.service import LocalRecovery, RecoveryError, RemoteRecovery, open_recovery
from engine.server import ProcessServer

MiB = 1024 * 1024


async def test_recovery_goes_through_the_running_applier(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = make_config(data, policy={"crash_point_interval_ms": 10})
    async with ProcessServer(config) as server:
        async with agent_for(data, server.connect_info.port) as agent:
            disk = await agent.open_disk("api", 2 * MiB)
            await disk.write(0, b"\x01" * 65536)
            await agent.flush()
            await server.drain()
            await disk.write(0, b"\x02" * 65536)
            await agent.flush()
            await server.drain()
        progress: list[tuple[int, int]] = []
        async with open_recovery(config) as recovery:
            assert isinstance(recovery, RemoteRecovery), "a running applier must be used, not a second one"
            points = await recovery.points("api")
            assert [p.seq for p in points] == [1, 2]
            (status,) = await recovery.status()
            assert (status["disk"], status["applied_seq"], status["recoverable_lag_s"]) == ("api", 2, 0.0)
            first = await recovery.failover("api", "1", tmp_path / "p1.img", test=True,
                                            progress=lambda done, total: progress.append((done, total)))
            assert first["seq"] == 1 and first["rolled_back_entries"] == 1
            image = (tmp_path / "p1.img").read_bytes()
            assert image[:65536] == b"\x01" * 65536 and len(image) == 2 * MiB
            assert progress and progress[-1] == (2 * MiB, 2 * MiB)
            with pytest.raises(RecoveryError, match="no retained point with id 7"):
                await recovery.failover("api", "7", tmp_path / "x.img", test=True)
            await recovery.failover("api", "latest", tmp_path / "fo.img", test=False)
            assert await recovery.commit("api") == 2
        # the admin API refuses callers without the token
        url = f"http://127.0.0.1:{server.control.http_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/api/points", params={"disk": "api"}) as response:
                assert response.status == 401
            async with session.get(url + "/api/status",
                                   headers={"Authorization": "Bearer wrong"}) as response:
                assert response.status == 401
            async with session.get(url + "/healthz") as response:
                assert response.status == 200
    # with no applier running, the same operations make the command the applier for a moment
    async with open_recovery(config) as recovery:
        assert isinstance(recovery, LocalRecovery)
        (status,) = await recovery.status()
        assert (status["disk"], status["applied_seq"]) == ("api", 2)
        assert await recovery.points("api") == [], "the committed failover released the points"


async def test_a_failover_through_a_damaged_undo_entry_says_so(tmp_path: Path) -> None:
    """The roll-back to an older point reads the entries newer than it; one with bad bytes must end the request
    with an error naming it, not leave the caller waiting for a last message that never comes."""
    data = tmp_path / "data"
    config = make_config(data, policy={"crash_point_interval_ms": 10})
    async with ProcessServer(config) as server:
        async with agent_for(data, server.connect_info.port) as agent:
            disk = await agent.open_disk("api", 2 * MiB)
            for byte in (b"\x01", b"\x02"):
                await disk.write(0, byte * 65536)
                await agent.flush()
                await server.drain()
        [segment] = (config.seed_dir / "journal" / "api").glob("*.journal")
        os.truncate(segment, segment.stat().st_size - 100)  # the newest entry's before-images lose their end
        with segment.open("ab") as file:
            file.write(bytes(100))
        async with open_recovery(config) as recovery:
            assert [p.seq for p in await recovery.points("api")] == [1, 2]
            with pytest.raises(RecoveryError, match="cannot be materialised: .*undo entry fails its checksum"):
                await asyncio.wait_for(recovery.failover("api", "1", tmp_path / "p1.img", test=True), 30)
