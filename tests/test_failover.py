"""Failover and test failover while replication keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from support import SEED_BACKENDS, agent_for, backend_sections, delete_containers, make_config, read_seed, state_at

from engine.config import Config
from engine.recovery.service import LocalRecovery, RecoveryError
from engine.server import ProcessServer
from engine.workload import ContentPool, random_writes
from protocol import TagKind
from protocol.journal import EntryName

MiB = 1024 * 1024
SIZE = 8 * MiB


class Recorder:
    """The source disk as a log of (seq, offset, data): its state at any sequence can be rebuilt."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self.writes: list[tuple[int, int, bytes]] = []

    def state_at(self, seq: int) -> bytes:
        return state_at(self.writes, self.size, seq)


async def write_some(disk, recorder: Recorder, writes, count: int) -> None:
    for _ in range(count):
        w = next(writes)
        seq = disk.next_seq
        await disk.write(w.offset, w.data)
        recorder.writes.append((seq, w.offset, bytes(w.data)))


@pytest.fixture(params=SEED_BACKENDS)
async def seed(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Config]]:
    """Builds configs for the seed backend of this run (local files, or page blobs on Azurite); deletes the
    Azure containers afterwards."""
    azurite = request.getfixturevalue("azurite") if request.param == "azure" else None
    made: list[Config] = []

    def config(data: Path, **sections: dict) -> Config:
        made.append(make_config(data, backend_sections(azurite, seed=request.param, label="failover"), **sections))
        return made[-1]

    config.backend = request.param  # type: ignore[attr-defined]
    yield config
    for config in made:
        await delete_containers(config)


async def test_failover_to_app_point_and_latest_while_writing(tmp_path: Path, seed) -> None:
    data = tmp_path / "data"
    config = seed(data, policy={"crash_point_interval_ms": 20})
    writes = random_writes(ContentPool(4 * MiB), SIZE, max_size=256 * 1024, seed=3)
    recorder = Recorder()
    async with ProcessServer(config) as server, agent_for(data, server.connect_info.port) as agent:
        recovery = LocalRecovery(server.applier, server.config)
        disk = await agent.open_disk("vm1", SIZE)
        await write_some(disk, recorder, writes, 150)
        app_seq = disk.next_seq
        await disk.tag(TagKind.APP, "vss-1")
        await write_some(disk, recorder, writes, 150)
        await agent.flush()
        await server.drain()  # "latest-app" is the latest *processed* app point, as in ASR
        await write_some(disk, recorder, writes, 50)  # a third point of its own, whatever the churn below
        await agent.flush()  # gets applied while the points are listed
        await server.drain()

        keep_writing = asyncio.Event()

        # Slower on Azurite (CPU-bound, sharing this machine's cores), whose apply rate is below what the agent
        # writes here: keeps the backlog (and the final drain) short.
        pause = 0.005 if seed.backend == "local" else 0.05

        async def churn() -> None:  # replication goes on during the failovers
            while not keep_writing.is_set():
                await write_some(disk, recorder, writes, 5)
                await asyncio.sleep(pause)

        writer = asyncio.create_task(churn())
        try:
            applied_before = server.applier.applied_seq("vm1")
            app = await recovery.failover("vm1", "latest-app", tmp_path / "app.img", test=True)
            assert app["seq"] == app_seq and app["point"]["tag_id"] == "vss-1"
            assert (tmp_path / "app.img").read_bytes() == recorder.state_at(app_seq)

            latest = await recovery.failover("vm1", "latest", tmp_path / "latest.img", test=True)
            assert latest["seq"] >= applied_before
            assert (tmp_path / "latest.img").read_bytes() == recorder.state_at(latest["seq"])

            processed = await recovery.failover("vm1", "latest-processed", tmp_path / "lp.img", test=True)
            assert (tmp_path / "lp.img").read_bytes() == recorder.state_at(processed["seq"])

            # every point listed can be recovered, by id
            points = await recovery.points("vm1")
            assert len(points) >= 3 and [p.seq for p in points] == sorted(p.seq for p in points)
            middle = points[len(points) // 2]
            by_id = await recovery.failover("vm1", middle.id, tmp_path / "mid.img", test=True)
            assert (tmp_path / "mid.img").read_bytes() == recorder.state_at(middle.seq) and by_id["seq"] == middle.seq

            # by time: the newest point whose source time is at or before the app point's
            app_point = next(p for p in points if p.kind == "app")
            by_time = await recovery.failover("vm1", app_point.source_time.isoformat(), tmp_path / "t.img", test=True)
            assert by_time["seq"] == max(p.seq for p in points if p.source_us <= app_point.source_us)
            assert (tmp_path / "t.img").read_bytes() == recorder.state_at(by_time["seq"])
        finally:
            keep_writing.set()
            await writer
        await agent.flush()
        # test failovers changed nothing: replication went on and the seed is still the source
        await server.drain()
        assert server.applier.applied_seq("vm1") == disk.acked_seq
        assert read_seed(config, "vm1") == recorder.state_at(disk.acked_seq)
        assert server.applier.disks["vm1"].state.failover_seq is None


async def test_failover_commit_stops_replication(tmp_path: Path, seed) -> None:
    data = tmp_path / "data"
    config = seed(data, policy={"crash_point_interval_ms": 10})
    writes = random_writes(ContentPool(2 * MiB), SIZE, max_size=64 * 1024, seed=4)
    recorder = Recorder()
    async with ProcessServer(config) as server:
        recovery = LocalRecovery(server.applier, server.config)
        async with agent_for(data, server.connect_info.port) as agent:
            disk = await agent.open_disk("vm2", SIZE)
            await write_some(disk, recorder, writes, 100)
            await agent.flush()
        # acknowledged means spooled; "latest" applies what reached the cache store: let the uploads finish
        await server.pipeline.drain()
        with pytest.raises(RecoveryError, match="no failover to commit"):
            await recovery.commit("vm2")
        result = await recovery.failover("vm2", "latest", tmp_path / "fo.img", test=False)
        assert (tmp_path / "fo.img").read_bytes() == recorder.state_at(result["seq"])
        assert result["seq"] == disk.acked_seq
        released = await recovery.commit("vm2")
        assert released >= 1 and await recovery.points("vm2") == []
        # the agent can no longer replicate the disk
        from engine.agent import AgentError

        async with agent_for(data, server.connect_info.port) as again:
            with pytest.raises(AgentError, match="committed"):
                await asyncio.wait_for(again.open_disk("vm2", SIZE), 10)
        with pytest.raises(RecoveryError, match="committed"):
            await recovery.failover("vm2", "latest", tmp_path / "again.img", test=True)


async def test_unknown_point_and_disk_are_clear_errors(tmp_path: Path, seed) -> None:
    async with ProcessServer(seed(tmp_path / "data")) as server:
        await _unknown_point_and_disk_are_clear_errors(server, tmp_path)


async def _unknown_point_and_disk_are_clear_errors(server: ProcessServer, tmp_path: Path) -> None:
    recovery = LocalRecovery(server.applier, server.config)
    with pytest.raises(RecoveryError, match="no seed disk"):
        await recovery.failover("nope", "latest", tmp_path / "x.img", test=True)
    async with agent_for(server.config.server.data_dir, server.connect_info.port) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await (await disk.write(0, b"x" * 4096))
    await server.drain()
    with pytest.raises(RecoveryError, match="no retained point with id 999"):
        await recovery.failover("d", "999", tmp_path / "x.img", test=True)
    with pytest.raises(RecoveryError, match="no application-consistent point"):
        await recovery.failover("d", "latest-app", tmp_path / "x.img", test=True)
    with pytest.raises(RecoveryError, match="not latest"):
        await recovery.failover("d", "yesterday", tmp_path / "x.img", test=True)


@contextlib.asynccontextmanager
async def disk_with_points(tmp_path: Path, disk_id: str, groups: int,
                           seed: int) -> AsyncIterator[tuple[ProcessServer, LocalRecovery, Recorder]]:
    """A running server whose disk ``disk_id`` was written in ``groups`` apply groups, one point each."""
    data = tmp_path / "data"
    config = make_config(data, policy={"crash_point_interval_ms": 0})
    recorder = Recorder()
    writes = random_writes(ContentPool(2 * MiB), SIZE, max_size=64 * 1024, seed=seed)
    async with ProcessServer(config) as server, agent_for(data, server.connect_info.port) as agent:
        disk = await agent.open_disk(disk_id, SIZE)
        for _ in range(groups):
            await write_some(disk, recorder, writes, 3)
            await agent.flush()
            await server.drain()
        yield server, LocalRecovery(server.applier, server.config), recorder


async def test_cost_is_a_copy_plus_the_changes_since_the_point(tmp_path: Path) -> None:
    """Latest = one copy (nothing rolled back); an older point rolls back only the entries after it."""
    async with disk_with_points(tmp_path, "cost", 12, seed=5) as (_, recovery, recorder):
        points = await recovery.points("cost")
        assert len(points) == 12
        latest = await recovery.failover("cost", "latest-processed", tmp_path / "l.img", test=True)
        assert latest["rolled_back_entries"] == 0
        for back in (1, 5, 11):
            point = points[-1 - back]
            result = await recovery.failover("cost", point.id, tmp_path / "p.img", test=True)
            assert result["rolled_back_entries"] == back
            assert (tmp_path / "p.img").read_bytes() == recorder.state_at(point.seq)


async def test_a_failover_refuses_to_roll_back_across_a_lost_entry(tmp_path: Path) -> None:
    """An entry lost while the disk is open (opening drops what no longer chains): rolled back across the gap,
    the copy would be handed out as the point with the lost group's writes still in it."""
    async with disk_with_points(tmp_path, "gap", 4, seed=8) as (server, recovery, recorder):
        points = await recovery.points("gap")
        volume = server.applier.disks["gap"].volume
        lost = sorted((e for n in await volume.list_entries() if (e := EntryName.parse(n))), key=lambda e: e.seq_to)[2]
        await volume.delete_entry(str(lost))
        with pytest.raises(RecoveryError, match=f"one ends at sequence {lost.seq_from}, the next newer rolls back "
                                                f"to {lost.seq_to}"):
            await recovery.failover("gap", points[0].id, tmp_path / "p.img", test=True)
        result = await recovery.failover("gap", points[-2].id, tmp_path / "q.img", test=True)  # after the gap
        assert (tmp_path / "q.img").read_bytes() == recorder.state_at(result["seq"])


async def test_a_failover_saves_the_disk_state_under_the_disk_lock(tmp_path: Path) -> None:
    """The apply pass saves the same state file under that lock: two savers at once could tear it."""
    data = tmp_path / "data"
    config = make_config(data, policy={"crash_point_interval_ms": 0})
    writes = random_writes(ContentPool(2 * MiB), SIZE, max_size=64 * 1024, seed=7)
    async with ProcessServer(config) as server, agent_for(data, server.connect_info.port) as agent:
        disk = await agent.open_disk("locked", SIZE)
        await write_some(disk, Recorder(), writes, 3)
        await agent.flush()
        await server.drain()
        d = server.applier.disks["locked"]
        held: list[bool] = []
        save_state = d.volume.save_state

        async def recording(state: object) -> None:
            held.append(d.lock.locked())
            await save_state(state)

        d.volume.save_state = recording  # type: ignore[method-assign]
        await LocalRecovery(server.applier, server.config).failover("locked", "latest-processed",
                                                                    tmp_path / "f.img", test=False)
        assert held == [True]


async def test_failover_does_not_pause_the_applier_and_repairs_a_torn_copy(tmp_path: Path) -> None:
    """The copy is slowed down while the agent keeps writing: groups are applied *during* the copy (the
    copy is torn) and the roll-back still yields exactly the chosen point."""
    data = tmp_path / "data"
    config = make_config(data, policy={"crash_point_interval_ms": 5})
    size = 32 * MiB
    recorder = Recorder(size)
    writes = random_writes(ContentPool(4 * MiB), size, max_size=256 * 1024, seed=6)
    async with ProcessServer(config) as server, agent_for(data, server.connect_info.port) as agent:
        recovery = LocalRecovery(server.applier, server.config)
        disk = await agent.open_disk("torn", size)
        await write_some(disk, recorder, writes, 200)
        await agent.flush()
        await server.drain()
        applied_during: list[int] = []
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                await write_some(disk, recorder, writes, 4)
                await asyncio.sleep(0.002)

        def slow_progress(done: int, total: int) -> None:  # runs in the copying thread
            applied_during.append(server.applier.applied_seq("torn"))
            time.sleep(0.05)

        writer = asyncio.create_task(churn())
        try:
            result = await recovery.failover("torn", "latest-processed", tmp_path / "torn.img", test=True,
                                             progress=slow_progress)
        finally:
            stop.set()
            await writer
        assert applied_during[-1] > applied_during[0], "the applier kept applying while the copy ran"
        assert result["rolled_back_entries"] > 0, "groups applied during the copy were rolled back"
        assert (tmp_path / "torn.img").read_bytes() == recorder.state_at(result["seq"])
