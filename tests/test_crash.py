"""Crash safety: components killed with SIGKILL mid-stream lose nothing acknowledged and apply nothing twice."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
from support import (
    BLOCKFERRY,
    ServerProcess,
    agent_for,
    applied_seq,
    free_port,
    state_at,
    wait_applied,
    write_config,
    write_logged,
)

from engine.workload import ContentPool, random_writes

MiB = 1024 * 1024


def _config_text(data: Path, port: int, *, applier: bool = True) -> str:
    return (f'[server]\ndata_dir = "{data}"\nport = {port}\n[http]\nport = 0\n'
            # batches are cut at 2 MiB or after 2 s: a kill always finds writes that were acknowledged
            # from the log but not sealed yet (sealing alone is quick enough to leave none otherwise)
            f'[batch]\nmax_bytes = "2MiB"\nlinger_ms = 2000\n'
            f'[applier]\nenabled = {"true" if applier else "false"}\npoll_ms = 20\nhttp_port = 0\n')


async def test_server_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "bf.toml", _config_text(data, port))
    server = ServerProcess(config, port, tmp_path / "server.log")
    server.start()
    pool = ContentPool(8 * MiB)
    sources = {"a": bytearray(16 * MiB), "b": bytearray(8 * MiB)}
    kills = 0
    try:
        async with agent_for(data, port, reconnect_initial_s=0.02, reconnect_max_s=0.2) as agent:
            for name, src in sources.items():
                await agent.open_disk(name, len(src))
            streams = {n: random_writes(pool, len(s), seed=i) for i, (n, s) in enumerate(sources.items())}
            rng = random.Random(3)
            acked_before_kill: dict[str, int] = {}
            for step in range(1500):
                name = rng.choice(list(sources))
                write = next(streams[name])
                sources[name][write.offset:write.offset + len(write.data)] = write.data
                await agent.disks[name].write(write.offset, write.data)
                if step in (400, 1000):  # kill -9 while writes are in flight, then restart
                    await asyncio.sleep(0.05)
                    acked_before_kill = {n: d.acked_seq for n, d in agent.disks.items()}
                    server.kill()
                    kills += 1
                    server.start()
            await asyncio.wait_for(agent.flush(), 60)
            assert agent.connections >= 1 + kills
            targets = {n: d.acked_seq for n, d in agent.disks.items()}
            # after the last SIGKILL the server must still have held everything it had acknowledged
            assert all(agent.disks[n].resumed_seq >= acked_before_kill[n] > 0 for n in targets), (
                {n: (d.resumed_seq, acked_before_kill[n]) for n, d in agent.disks.items()})
        await wait_applied(data / "seed", targets)
        for name, src in sources.items():
            seed = (data / "seed" / f"{name}.img").read_bytes()
            assert hashlib.sha256(seed).digest() == hashlib.sha256(src).digest(), f"seed disk {name} differs"
            assert applied_seq(data / "seed", name) == targets[name]
    finally:
        server.stop()
    log_text = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log_text
    # the kills hit writes that were acknowledged but not yet sealed: they came back from the log
    assert "acknowledged record(s) of disk" in log_text and "replayed up to sequence" in log_text


def _cli(*args: str) -> str:
    done = subprocess.run([BLOCKFERRY, "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr  # not check=True: the failure message shows the CLI's stderr
    return done.stdout


@pytest.mark.parametrize("retention", ["72", "0.0001"], ids=["during-apply", "during-pruning"])
async def test_applier_killed_repeatedly_keeps_disk_journal_and_points_consistent(tmp_path: Path,
                                                                                  retention: str) -> None:
    """`blockferry apply` killed at random moments while applying (and, with a 0.36 s retention, while
    pruning): the seed disk ends byte-identical and every remaining recovery point is exact."""
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "bf.toml", _config_text(data, port, applier=False) + (
        'prune_interval_s = 0.05\ngroup_max_bytes = "1MiB"\n'
        f"[policy]\nretention_hours = {retention}\ncrash_point_interval_ms = 10\n"))
    server = ServerProcess(config, port, tmp_path / "server.log")
    server.start()
    pool = ContentPool(8 * MiB)
    size = 16 * MiB
    try:
        async with agent_for(data, port) as agent:
            disk = await agent.open_disk("d", size)
            writes = await write_logged(disk, random_writes(pool, size, seed=11), 600)
            await asyncio.wait_for(agent.flush(), 60)
            target = disk.acked_seq
        await asyncio.sleep(0.3)  # uploads finish (the server keeps running)
        seed_dir = data / "seed"
        interrupted = 0
        for _ in range(4):  # kill each applier as soon as it has made progress, i.e. while it is applying
            before = applied_seq(seed_dir, "d")
            proc = await asyncio.to_thread(subprocess.Popen, [BLOCKFERRY, "apply", "--config", str(config)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(400):
                if applied_seq(seed_dir, "d") > before:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(random.uniform(0, 0.05))
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            interrupted += 0 < applied_seq(seed_dir, "d") < target
        assert interrupted >= 2, "the kills should have landed while blobs remained to apply"
        proc = await asyncio.to_thread(subprocess.Popen, [BLOCKFERRY, "apply", "--config", str(config)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_applied(seed_dir, {"d": target})
            await asyncio.sleep(1.0)  # let it prune (a 0.36 s retention), then kill it mid-work too
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
        assert (seed_dir / "d.img").read_bytes() == state_at(writes, size, target)
        # No applier runs now: the CLI recovers the journal itself and materialises each point.
        points = json.loads(_cli("points", "list", "--disk", "d", "--config", str(config), "--json"))
        assert points and points[-1]["seq"] == target
        for point in points[:: max(1, len(points) // 6)] + points[-1:]:
            out = tmp_path / f"p{point['id']}.img"
            _cli("failover", "--disk", "d", "--point", point["id"], "--out", str(out), "--test", "--config",
                 str(config))
            assert out.read_bytes() == state_at(writes, size, point["seq"]), f"point {point['id']} is wrong"
        if retention != "72":
            assert len(points) < 20, "a 0.36 s retention should have pruned most points"
    finally:
        server.stop()
