"""serve's applier as its own process: it owns the seed, is restarted when it dies, and never outlives the server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from support import (
    SEED_BACKENDS,
    ServerProcess,
    agent_for,
    backend_sections,
    delete_containers,
    free_port,
    make_config,
    read_seed,
    wait_applied,
    wait_for,
    write_config,
    write_random,
)

from engine.agent import AgentError
from engine.aio import run_loop
from engine.applier import ApplierLock, ApplierLocked
from engine.applier_process import ROLE, ApplierProcessError, _Report
from engine.applier_service import ApplierService
from engine.disks import DiskInfo
from engine.monitor import DiskHealth
from engine.pipeline import DiskStream
from engine.recovery.service import RemoteRecovery, admin_token, open_recovery, running_admin_url
from engine.server import ProcessServer, load_keyring
from engine.workload import ContentPool

MiB = 1024 * 1024
T = 60


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status)
    except FileNotFoundError:
        return False


def _lock_is_free(seed_dir: Path) -> bool:
    lock = ApplierLock(seed_dir)
    try:
        lock.acquire("test")
    except ApplierLocked:
        return False
    lock.release()
    return True


async def _write(agent, disk: str, source: bytearray, pool: ContentPool, seed: int) -> None:  # type: ignore[no-untyped-def]
    await write_random(agent, {disk: source}, 4 * MiB, pool, seed=seed, max_size=256 * 1024)
    await agent.flush()


async def test_the_applier_process_owns_the_seed_and_serves_recovery(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = make_config(data, applier={"process": True, "poll_ms": 60_000})  # uploads must wake it
    pool = ContentPool(4 * MiB)
    source = bytearray(8 * MiB)
    async with ProcessServer(config) as server:
        process = server.applier_process
        assert server.applier is None and process is not None and process.pid is not None
        assert process.pid != os.getpid() and _alive(process.pid)
        assert not _lock_is_free(config.seed_dir), "the applier process must hold the seed lock"
        async with agent_for(data, server.connect_info.port) as agent:
            await agent.open_disk("d", len(source))
            await _write(agent, "d", source, pool, seed=1)
            await asyncio.wait_for(server.drain(), T)
            assert server.applied_seq("d") == agent.disks["d"].acked_seq
        assert read_seed(config, "d") == source
        url = running_admin_url(config)  # how `blockferry failover` finds it
        assert url is not None
        points = await RemoteRecovery(url, admin_token(config)).points("d")
        assert points and points[-1].seq == server.applied_seq("d")
        pid = process.pid
    assert not _alive(pid), "closing the server must stop its applier process"
    assert _lock_is_free(config.seed_dir)


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid`` (field 19 of /proc/<pid>/task/<tid>/stat)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        found.add(int(stat[stat.rindex(")") + 2:].split()[16]))
    return found


async def test_a_killed_applier_process_is_restarted_and_nothing_is_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = make_config(data, applier={"process": True, "nice": 7})
    pool = ContentPool(4 * MiB)
    source = bytearray(8 * MiB)
    async with ProcessServer(config) as server:
        process = server.applier_process
        assert process is not None and process.pid is not None
        async with agent_for(data, server.connect_info.port) as agent:
            await agent.open_disk("d", len(source))
            await _write(agent, "d", source, pool, seed=2)
            first = process.pid
            os.kill(first, signal.SIGKILL)
            await _write(agent, "d", source, pool, seed=3)  # ingest goes on while it is down
            await asyncio.wait_for(server.drain(), T)
            assert process.restarts == 1 and process.pid != first
            assert server.applied_seq("d") == agent.disks["d"].acked_seq
            # under CPU contention acks go first: every thread of the restarted child (its apply and journal
            # pools, started after its start, included) runs applier.nice steps nicer than the server
            assert len(list(Path(f"/proc/{process.pid}/task").iterdir())) > 1
            assert _niceness(process.pid) == {min(19, os.nice(0) + config.applier.nice)}
    assert read_seed(config, "d") == source


def _serve_process(tmp_path: Path) -> tuple[ServerProcess, Path, int]:
    """`blockferry serve` started in its own process on a fresh data directory: (server, data_dir, port)."""
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "bf.toml", f'[server]\ndata_dir = "{data}"\nport = {port}\n'
                                                f'[http]\nport = 0\n[applier]\nhttp_port = 0\npoll_ms = 20\n')
    server = ServerProcess(config, port, tmp_path / "server.log")
    server.start()
    return server, data, port


async def _write_until_applied(data: Path, port: int, source: bytearray, pool: ContentPool, seed: int) -> None:
    """Disk "d" written by a fresh agent, until its seed holds every acknowledged write."""
    async with agent_for(data, port) as agent:
        await agent.open_disk("d", len(source))
        await _write(agent, "d", source, pool, seed=seed)
        await wait_applied(data / "seed", {"d": agent.disks["d"].acked_seq})


async def test_the_applier_process_stops_when_the_server_is_killed(tmp_path: Path) -> None:
    server, data, port = _serve_process(tmp_path)
    pool = ContentPool(4 * MiB)
    source = bytearray(8 * MiB)
    try:
        await _write_until_applied(data, port, source, pool, seed=4)
        assert not _lock_is_free(data / "seed")
        server.kill()  # SIGKILL: no chance to stop its child
        # its stdin closed: the orphan stops by itself
        await wait_for(lambda: _lock_is_free(data / "seed"), "the killed server's applier process to stop", 20)
        server.start()  # and a new server's applier takes over
        await _write_until_applied(data, port, source, pool, seed=5)
    finally:
        server.stop()
    assert (data / "seed" / "d.img").read_bytes() == source


def _thread_names(pid: int) -> set[str]:
    return {(task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}


async def test_the_kernel_knows_serves_threads_by_name(tmp_path: Path) -> None:
    """`top -H`, perf and /proc tell the event loop from the seal threads and the log's commit thread."""
    server, data, port = _serve_process(tmp_path)
    try:
        await _write_until_applied(data, port, bytearray(8 * MiB), ContentPool(4 * MiB), seed=6)
        assert server.proc is not None
        pid = server.proc.pid
        loop = Path(f"/proc/{pid}/task/{pid}/comm").read_text().strip()
        serve = _thread_names(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        applier = _thread_names(int(children[0]))
    finally:
        server.stop()
    assert loop == "blockferry"  # what docs/operations.md tells an operator to look for
    assert {"wal-commit", "seal_0", "spool_0", "store-sync_0", "io_0"} <= serve, serve
    assert {"apply_0", "io_0"} <= applier, applier


async def test_an_applier_process_that_cannot_start_fails_the_server_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = make_config(tmp_path / "data", applier={"process": True, "http_port": taken.getsockname()[1]})
        server = ProcessServer(config)
        with pytest.raises(ApplierProcessError, match="before it was ready"):
            await asyncio.wait_for(server.start(), T)
        await server.close()


async def test_another_applier_on_the_seed_fails_the_start_at_once(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", applier={"process": True})
    other = ApplierLock(config.seed_dir)
    other.acquire(f"pid {os.getpid()} (blockferry apply)")  # e.g. a separate `blockferry apply` left configured
    try:
        server = ProcessServer(config)
        with pytest.raises(ApplierProcessError, match="before it was ready"):
            await asyncio.wait_for(server.start(), 15)  # refused, not waited for
        await server.close()
    finally:
        other.release()


async def test_a_dead_servers_applier_process_is_waited_for(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", applier={"process": True})
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()  # a server pid that no longer runs
    orphan = ApplierLock(config.seed_dir)
    orphan.acquire(f"pid {os.getpid()} (blockferry serve ({ROLE} {gone.pid}))")
    asyncio.get_running_loop().call_later(1.0, orphan.release)  # it finishes its last group
    server = ProcessServer(config)
    await asyncio.wait_for(server.start(), T)
    try:
        assert server.applier_process is not None and _alive(server.applier_process.pid or 0)
        assert not _lock_is_free(config.seed_dir)
    finally:
        await server.close()


async def test_a_seed_lock_freed_between_its_refusal_and_the_look_at_its_holder_is_taken(tmp_path: Path) -> None:
    """The orphaned applier process finishes just after the lock refused the new one: read then, the lock names
    no holder. That is no configuration error to fail the start on; the next try takes the lock."""
    config = make_config(tmp_path / "data")
    load_keyring(config, create=True)
    orphan = ApplierLock(config.seed_dir)
    orphan.acquire("the orphan")
    service = ApplierService(config, "test", control_plane=False)
    acquire = service.lock.acquire

    def refused_then_freed(info: str = "") -> None:
        service.lock.acquire = acquire  # type: ignore[method-assign]
        try:
            acquire(info)
        finally:
            orphan.release()

    service.lock.acquire = refused_then_freed  # type: ignore[method-assign]
    await asyncio.wait_for(service.start(wait_while=lambda holder: False), T)
    try:
        assert not _lock_is_free(config.seed_dir)
    finally:
        await service.close()


async def test_the_servers_monitor_sees_what_its_applier_process_has_not_applied(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """The RPO on serve's own /metrics covers the apply stage too when the applier is its child, and serve
    alerts for it (once: the child does not)."""
    caplog.set_level(logging.INFO, logger="blockferry.alerts")
    data = tmp_path / "data"
    config = make_config(data, applier={"process": True}, batch={"linger_ms": 1},  # the second write waits
                         policy={"crash_point_interval_ms": 3000, "rpo_threshold_s": 1.0})  # 3 s to be applied
    async with ProcessServer(config) as server:
        assert server.control is not None and server.connect_info is not None
        monitor = server.control.monitor

        def health() -> DiskHealth:
            return next(h for h in monitor.snapshot() if h.disk == "d")

        async with agent_for(data, server.connect_info.port) as agent:
            disk = await agent.open_disk("d", 8 * MiB)
            await asyncio.wait_for(await disk.write(0, b"a" * 4096), T)
            await wait_for(lambda: server.applied_seq("d") == 1, "the first write applied")
            await asyncio.wait_for(await disk.write(4096, b"b" * 4096), T)
            held = await wait_for(lambda: (h := health()).stage == "apply" and h.recoverable_lag_s >= 0.5 and h,
                                  "the server to see the write waiting in its applier process")
            assert held.applied_seq == 1 and held.ingest_lag_s == 0 and "applier process" in held.observed
            await wait_for(lambda: server.applied_seq("d") == 2, "the second write applied")
            done = health()
            assert (done.recoverable_lag_s, done.stage, done.applied_seq) == (0, None, 2)
    alerts = [json.loads(r.getMessage())["event"] for r in caplog.records if r.name == "blockferry.alerts"]
    assert alerts[:1] == ["rpo_exceeded"], alerts  # serve's own alert, for a write waiting in its child
    assert "rpo_exceeded" not in capfd.readouterr().err, "the applier process alerted too"


@pytest.mark.parametrize("seed", SEED_BACKENDS)
async def test_a_failover_committed_in_the_applier_process_stops_replication(
        tmp_path: Path, seed: str, request: pytest.FixtureRequest) -> None:
    """Wherever the seed lives (with an Azure seed the server cannot read its state), the child tells the
    server, which then refuses the disk."""
    data = tmp_path / "data"
    azurite = request.getfixturevalue("azurite") if seed == "azure" else None
    config = make_config(data, backend_sections(azurite, seed=seed, label="commit"), applier={"process": True})
    source = bytearray(4 * MiB)
    try:
        async with ProcessServer(config) as server:
            assert server.connect_info is not None
            async with agent_for(data, server.connect_info.port) as agent:
                await agent.open_disk("vm", len(source))
                await _write(agent, "vm", source, ContentPool(4 * MiB), seed=6)
                await asyncio.wait_for(server.drain(), T)
            async with open_recovery(config) as recovery:  # the child's admin API
                assert isinstance(recovery, RemoteRecovery)
                await recovery.failover("vm", "latest", tmp_path / "vm.img", test=False)
                assert await recovery.commit("vm") >= 0
            assert (tmp_path / "vm.img").read_bytes() == source
            async with agent_for(data, server.connect_info.port) as again:
                with pytest.raises(AgentError, match="committed"):
                    await asyncio.wait_for(again.open_disk("vm", len(source)), 10)
    finally:
        await delete_containers(config)


def test_a_stopped_disk_is_reported_failed_until_it_applies_again() -> None:
    """What serve keeps of its child's reports: a failure stands until the disk moves past it."""
    stream = DiskStream(DiskInfo("d", "agent-1", 1 << 20, 4096), durable_seq=0)
    stream.note_applied(3)
    stream.apply_failure = "blob d/4-5: authentication failed"
    stream.note_applied(3)  # a report at the same place (e.g. the child restarted): still stopped
    assert stream.apply_failure is not None
    stream.note_applied(5)
    assert stream.apply_failure is None and stream.applied_seq == 5


def test_a_report_to_a_server_that_is_gone_is_dropped_not_raised_into_the_apply() -> None:
    """serve killed while its applier process applies: the next report used to raise (uvloop: 'the handler
    is closed') inside the apply group's listener, failing the disk's group with a traceback in serve's log."""
    read_end, write_end = os.pipe()

    async def report_then_lose_the_server() -> bytes:
        loop = asyncio.get_running_loop()  # serve's and the applier process's loop (uvloop where installed)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(write_end, "wb", buffering=0))
        report = _Report(transport)
        report.send({"disk": "d", "applied": 1})
        await asyncio.sleep(0.05)
        received = os.read(read_end, 4096)
        os.close(read_end)  # the server is gone
        report.send({"disk": "d", "applied": 2})  # the pipe breaks under this one
        await asyncio.sleep(0.05)
        report.send({"disk": "d", "applied": 3})  # and this one finds it closed
        report.close()
        return received

    assert json.loads(run_loop(report_then_lose_the_server())) == {"disk": "d", "applied": 1}
