"""End to end on the embedded default: agent → TLS → process server → spool → cache → applier → seed disk."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from support import (
    agent_for,
    backend_sections,
    delete_containers,
    make_config,
    read_seed,
    seed_state,
    sha,
    wait_for,
    write_random,
)

from engine.agent import AgentDisk, AgentError
from engine.applier import ApplierLocked
from engine.config import Config
from engine.recovery.reset import ResetError, reset_disk
from engine.server import ProcessServer, load_keyring
from engine.store import LocalStore
from engine.store.base import StoreError
from engine.workload import ContentPool

MiB = 1024 * 1024


@pytest.mark.parametrize("store,seed,process", [("local", "local", False), ("local", "local", True),
                                                ("local", "azure", False), ("azure", "azure", True)],
                         ids=["local", "local-applier-process", "azure-seed", "azure-store-and-seed-applier-process"])
async def test_several_disks_replicate_byte_identical(tmp_path: Path, store: str, seed: str, process: bool,
                                                      request: pytest.FixtureRequest) -> None:
    data = tmp_path / "data"
    azurite = request.getfixturevalue("azurite") if "azure" in (store, seed) else None
    # Small batches and a small in-flight budget: many blobs, and backpressure is exercised. The applier runs
    # on the server's loop, or as its own process (serve's default) woken by uploads: its poll is a minute.
    config = make_config(data, backend_sections(azurite, store=store, seed=seed, label="e2e"),
                         batch={"max_bytes": 256 * 1024, "linger_ms": 2}, pipeline={"max_inflight_bytes": 2 * MiB},
                         applier={"process": process, "poll_ms": 60_000 if process else 200})
    pool = ContentPool(8 * MiB)
    try:  # Azurite is CPU-bound and shares this machine's cores: a smaller workload on Azure
        await _replicate_several_disks(config, pool, 120 * MiB if seed == "local" else 48 * MiB)
    finally:
        await delete_containers(config)


async def _replicate_several_disks(config, pool: ContentPool, total: int) -> None:  # type: ignore[no-untyped-def]
    data = config.server.data_dir
    async with ProcessServer(config) as server:
        async with agent_for(data, server.connect_info.port, max_unacked_bytes=8 * MiB) as agent:
            sources = {}
            for i, size in enumerate((16 * MiB, 32 * MiB, 8 * MiB)):
                await agent.open_disk(f"disk{i}", size)
                sources[f"disk{i}"] = bytearray(size)
            peak = 0

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, server.pipeline.inflight_bytes)
                    await asyncio.sleep(0.001)

            watcher = asyncio.create_task(watch())
            written = await write_random(agent, sources, total, pool, tag_rate=0.02)
            await agent.flush()
            watcher.cancel()
            await asyncio.wait_for(server.drain(), 30)  # a lost wake-up would wait for the minute-long poll
            stats = server.pipeline.stats
            assert stats.received_bytes == written  # every byte once, nothing dropped
            assert stats.pauses > 0, "the small in-flight budget should have paused ingest at least once"
            # Bounded: the budget plus at most one read chunk per connection and one max-size write.
            assert peak <= 2 * MiB + 2 * MiB, peak
            for name, source in sources.items():
                seed = read_seed(config, name)
                assert sha(seed) == sha(source), f"{name} differs from its source"
                assert server.applied_seq(name) == agent.disks[name].acked_seq
                assert seed_state(config, name)["applied_seq"] == agent.disks[name].acked_seq  # type: ignore[index]
        # applied blobs are deleted from the cache store, and the spool is empty
        assert not list(config.store_dir.glob("*/*.bflog"))
        assert not list(config.spool_dir.glob("*/*.bflog"))
        assert await server.store.list_blobs() == []  # type: ignore[union-attr]
        if config.applier.volume == "azure":  # nothing of the seed went to the local seed directory
            assert not list(config.seed_dir.glob("*.img")) and not list(config.seed_dir.glob("*.state*"))


async def test_restart_resumes_from_durable_state(tmp_path: Path) -> None:
    """A graceful restart keeps sequence numbers: the agent reconnects and continues where it was."""
    data = tmp_path / "data"
    config = make_config(data)
    pool = ContentPool(4 * MiB)
    source = bytearray(8 * MiB)
    server = ProcessServer(config)
    await server.start()
    port = server.connect_info.port
    config = make_config(data, server={"port": port})  # the restarted server must come back on the same port
    async with agent_for(data, port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", len(source))
        await write_random(agent, {"d": source}, 8 * MiB, pool, seed=1, tag_rate=0.02)
        await agent.flush()
        before = disk.acked_seq
        connections = agent.connections
        await server.close()
        server = ProcessServer(config)
        await server.start()
        await write_random(agent, {"d": source}, 8 * MiB, pool, seed=2, tag_rate=0.02)
        await agent.flush()
        assert agent.connections > connections
        assert disk.acked_seq > before
        await server.drain()
        assert server.applier.applied_seq("d") == disk.acked_seq
        assert sha((config.seed_dir / "d.img").read_bytes()) == sha(source)
    await server.close()


async def test_duplicate_resend_is_skipped(server: ProcessServer) -> None:
    """Writes resent after a lost ack are recognised by sequence number and applied once."""
    data = server.config.server.data_dir
    async with agent_for(data, server.connect_info.port) as agent:
        disk = await agent.open_disk("dup", 1 * MiB)
        await (await disk.write(0, b"A" * 4096))
        await (await disk.write(0, b"B" * 4096))
        # Simulate a resend of sequence 1 (the "A" write) as if its ack had been lost.
        stream = server.pipeline.streams["dup"]
        from protocol import Write

        assert server.pipeline.accept_write(stream, Write.make(disk.handle, 1, 0, b"A" * 4096, 0)) is False
        await server.drain()
        assert (server.config.seed_dir / "dup.img").read_bytes()[:4096] == b"B" * 4096
        assert server.pipeline.stats.received_bytes == 8192


HELD_BACK = {"policy": {"crash_point_interval_ms": 60_000},  # the applier: one group, then none for a minute
             "batch": {"linger_ms": 60_000}}  # a write stays in the log until the pipeline is drained


async def _started(data: Path, *, run_applier: bool = True, **sections: dict) -> tuple[ProcessServer, Config]:
    """A started server on ``data``, and its config with the port it got: restarted on that config, it comes back
    where the agent reconnects."""
    server = ProcessServer(make_config(data, **sections), run_applier=run_applier)
    await server.start()
    assert server.connect_info is not None
    return server, make_config(data, server={"port": server.connect_info.port}, **sections)


def _refusing_blob(server: ProcessServer, first_seq: int) -> None:
    """The cache store refuses disk d's blob that starts at ``first_seq`` (busy, for now) and takes the others."""
    put_files = server.store.put_files  # type: ignore[union-attr]

    async def refusing(items: list[tuple[str, Path]]) -> None:
        if any(name.startswith(f"d/{first_seq:020d}-") for name, _ in items):
            raise StoreError("the store is busy (refused for now)", transient=True)
        await put_files(items)

    server.store.put_files = refusing  # type: ignore[method-assign,union-attr]


async def _first_write_applied(server: ProcessServer, disk: AgentDisk, data: bytes = b"\x01" * 4096) -> None:
    """Write 1 of disk d (at offset 0) acknowledged, stored and applied to the seed."""
    await (await disk.write(0, data))
    assert server.pipeline is not None
    await server.pipeline.drain()
    await wait_for(lambda: server.applied_seq("d") == 1, "write 1 applied")


async def _restarted_without(server: ProcessServer, config: Config, *, spool: bool, keep_watermarks: bool = False,
                             run_applier: bool = True) -> ProcessServer:
    """The server comes back without its upload watermarks and (``spool``) its spool's disk, with the
    write-ahead log; the seed and the cache store remain. (It stops as a kill would: nothing is drained.)"""
    await server.close()
    if spool:
        shutil.rmtree(config.spool_dir)
    if not keep_watermarks:
        (config.state_dir / "uploaded.json").unlink(missing_ok=True)
    server = ProcessServer(config, run_applier=run_applier)
    await server.start()
    return server


async def _seed_after_applying_everything(config: Config) -> bytes:
    async with ProcessServer(make_config(config.server.data_dir, server={"port": config.server.port})) as server:
        await server.drain()
    return read_seed(config, "d")


async def test_an_agent_told_that_acknowledged_writes_were_lost_stops_and_says_so(tmp_path: Path) -> None:
    """The seed holds write 1 only, and writes 2-3 were in the spool only, when the server lost it: resending
    from its resume point would be refused as a gap, and the lost writes would never come back. The agent
    stops, naming the disk and the lost sequences, and what to do."""
    data = tmp_path / "data"
    server, config = await _started(data, **HELD_BACK)
    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await _first_write_applied(server, disk)
        for seq in range(1, 3):
            await (await disk.write(4096 * seq, bytes([seq + 1]) * 4096))
        server = await _restarted_without(server, config, spool=True)

        async def write_once() -> int:
            return await (await disk.write(0, bytes(4096)))

        with pytest.raises(AgentError, match=r"disk 'd'.*after sequence 1.*acknowledged up to 3.*writes 2-3 were "
                                             r"lost.*full resync"):
            await asyncio.wait_for(write_once(), 10)
    await server.close()


@pytest.mark.parametrize("applier", ["in-process", "process", "apart"])
async def test_a_server_that_lost_only_what_the_seed_holds_resumes_the_disk_after_the_seed(
        tmp_path: Path, applier: str) -> None:
    """Everything the server acknowledged was applied before it lost its spool: the disk resumes after what
    its seed holds, and the agent goes on with nothing lost and no resync. Resumed at 0, the agent would
    have been told that writes 1-3 were lost, and a resync numbered from 1 skipped as already applied. The
    server learns the seed's sequence from its applier, in-process or its child, or (with the applier run
    apart) from the seed's state file."""
    data = tmp_path / "data"
    server, config = await _started(data, applier={"process": applier == "process"})
    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        for seq in range(3):
            await (await disk.write(4096 * seq, bytes([seq + 1]) * 4096))
        await server.drain()
        server = await _restarted_without(server, config, spool=True, run_applier=applier != "apart")
        assert json.loads((config.state_dir / "uploaded.json").read_bytes())["d"] == 3  # saved as it starts
        assert await asyncio.wait_for(await disk.write(3 * 4096, b"\x04" * 4096), 10) == 4
    await server.close()
    assert await _seed_after_applying_everything(config) == \
        b"".join(bytes([n]) * 4096 for n in range(1, 5)) + bytes(1 * MiB - 4 * 4096)


@pytest.mark.parametrize("lost", ["spool", "watermarks"])
async def test_a_server_resumes_a_disk_after_what_the_cache_store_or_its_log_still_holds(
        tmp_path: Path, lost: str) -> None:
    """The seed holds write 1 (and the log no longer does); writes 2-3 are in the cache store (the spool was
    lost) or only in the log (the watermark file was lost). Resumed at what the seed holds, a resync numbered
    from there would have been skipped for the store's blobs, and the log's records dropped as following a
    hole (and replayed over the new numbering at a later start). The disk resumes after write 3, and the
    agent goes on."""
    data = tmp_path / "data"
    small_log = {"spool": {"max_bytes": 2 * MiB}}  # segments of 256 KiB: write 1 fills one, released once applied
    server, config = await _started(data, **HELD_BACK, **small_log)
    first = b"\x01" * (384 * 1024)
    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await _first_write_applied(server, disk, first)
        await wait_for(lambda: server.pipeline.wal.size_bytes == 0, "write 1 released from the log")
        for seq in range(2, 4):
            await (await disk.write(MiB // 2 + 4096 * seq, bytes([seq]) * 4096))
        if lost == "spool":
            await server.pipeline.drain()  # in the cache store, not applied for a minute
        # the applier apart and stopped: it would have applied the store's blobs as it started
        server = await _restarted_without(server, config, spool=lost == "spool", run_applier=lost != "spool")
        assert server.pipeline.streams["d"].durable_seq == 3
        assert await asyncio.wait_for(await disk.write(MiB // 2 + 4096 * 4, b"\x04" * 4096), 10) == 4
    await server.close()
    expected = bytearray(MiB)
    expected[:len(first)] = first
    for seq in range(2, 5):
        expected[MiB // 2 + 4096 * seq:MiB // 2 + 4096 * (seq + 1)] = bytes([seq]) * 4096
    assert await _seed_after_applying_everything(config) == expected


@pytest.mark.parametrize("spool", ["kept", "lost"])
async def test_a_blob_stored_ahead_of_an_earlier_one_leaves_the_earlier_one_to_the_spool(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, spool: str) -> None:
    """Uploads finish in any order: blob 3 reached the cache store while blob 2 was still being retried when the
    server stopped. The restart resumes after the run the seed and the store hold without a gap (write 1), so
    the spool's blobs 2 and 3 follow on and are stored again; taken up to blob 3, blob 2 would have been dropped
    from the spool as uploaded and its records skipped in the log, and the applier would wait for it for ever.
    With the spool lost too, write 2 is lost: said, and no new write is numbered over blob 3."""
    data = tmp_path / "data"
    server, config = await _started(data, run_applier=False, batch={"linger_ms": 1})

    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await (await disk.write(0, b"\x01" * 4096))
        await server.pipeline.drain()
        _refusing_blob(server, 2)
        await (await disk.write(4096, b"\x02" * 4096))
        await wait_for(lambda: server.pipeline.stats.upload_errors > 0, "blob 2 refused")
        await (await disk.write(8192, b"\x03" * 4096))
        await wait_for(lambda: any(p.name.startswith("00000000000000000003-") for p in (config.store_dir / "d").iterdir()),
                       "blob 3 stored")
        server = await _restarted_without(server, config, spool=spool == "lost", keep_watermarks=True)
        assert server.pipeline.streams["d"].durable_seq == 3
        assert await asyncio.wait_for(await disk.write(12288, b"\x04" * 4096), 10) == 4
        # and once more, as a kill right after would: write 4 is in the log only, after the lost gap
        server = await _restarted_without(server, config, spool=False, keep_watermarks=True)
        assert server.pipeline.streams["d"].durable_seq == 4
    await server.close()
    if spool == "kept":
        assert (await _seed_after_applying_everything(config))[:4 * 4096] == \
            b"\x01" * 4096 + b"\x02" * 4096 + b"\x03" * 4096 + b"\x04" * 4096
    else:
        assert "disk 'd': sequences 2-2 are in neither the cache store, the spool nor the write-ahead log (lost), " \
               "but the store holds blobs after them up to 3" in caplog.text
        await _reset_and_resync(config, 4)


async def test_a_disk_whose_first_blob_was_lost_is_reset_from_no_seed_at_all(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Blob 1's upload was being retried when the spool was lost, blob 2 had been stored: nothing was ever
    applied, so there is no seed state, and the disk registry gives the reset the disk's size. A mistyped disk
    is refused, leaving nothing behind."""
    data = tmp_path / "data"
    server, config = await _started(data, run_applier=False, batch={"linger_ms": 1})
    _refusing_blob(server, 1)
    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await (await disk.write(0, b"\x01" * 4096))
        await wait_for(lambda: server.pipeline.stats.upload_errors > 0, "blob 1 refused")
        await (await disk.write(4096, b"\x02" * 4096))
        await wait_for(lambda: (config.store_dir / "d").is_dir() and any((config.store_dir / "d").iterdir()),
                       "blob 2 stored")
    server = await _restarted_without(server, config, spool=True, keep_watermarks=True)
    await server.close()
    assert "disk 'd': sequences 1-1 are in neither" in caplog.text
    with pytest.raises(ResetError, match="'typo' has neither a seed"):
        await reset_disk(config, LocalStore(config.store_dir), load_keyring(config, create=False), "typo")
    assert not list(config.seed_dir.rglob("typo*"))
    await _reset_and_resync(config, 2)


async def _reset_and_resync(config: Config, base: int) -> None:
    """The way out of a lost gap: the disk's seed emptied, its applied sequence set past everything held of it
    (``base``), then a resync (here: two blocks) numbered after that fills it — not while serve runs."""
    keys = load_keyring(config, create=False)
    async with ProcessServer(config) as server:
        with pytest.raises(ApplierLocked, match="another process server is running"):
            await reset_disk(config, server.store, keys, "d")
    result = await reset_disk(config, LocalStore(config.store_dir), keys, "d")
    assert result.applied_seq == base and seed_state(config, "d")["applied_seq"] == base
    async with ProcessServer(config) as server:
        assert server.applier is not None and server.applier.points("d") == []
        async with agent_for(config.server.data_dir, config.server.port) as agent:
            disk = await agent.open_disk("d", 1 * MiB)
            assert disk.resumed_seq == base
            await (await disk.write(0, b"\x11" * 4096))
            assert await (await disk.write(8192, b"\x13" * 4096)) == base + 2
        await server.drain()
        assert await server.store.list_blobs() == []
    expected = bytearray(MiB)
    expected[:4096], expected[8192:12288] = b"\x11" * 4096, b"\x13" * 4096
    assert read_seed(config, "d") == expected


@pytest.mark.parametrize("process", [False, True], ids=["in-process", "applier-process"])
async def test_serve_applies_nothing_before_it_knows_where_each_disk_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, process: bool) -> None:
    """The spool was lost; the seed holds write 1, the store writes 2-3. Had the applier applied and deleted
    them while the server started (here: a store slow to clean up), they would be in neither the seed's
    sequence it read first nor the store's listing after: the disk would resume after 1, below its seed."""
    data = tmp_path / "data"
    server, config = await _started(data, **HELD_BACK, applier={"process": process})
    async with agent_for(data, config.server.port, reconnect_max_s=0.2) as agent:
        disk = await agent.open_disk("d", 1 * MiB)
        await _first_write_applied(server, disk)
        for seq in range(2, 4):
            await (await disk.write(4096 * seq, bytes([seq]) * 4096))
        await server.pipeline.drain()
    remove_temporaries = LocalStore.remove_temporaries

    async def slow(self: LocalStore) -> int:
        await asyncio.sleep(0.5)
        return await remove_temporaries(self)

    monkeypatch.setattr(LocalStore, "remove_temporaries", slow)
    server = await _restarted_without(server, config, spool=True)
    try:
        assert server.pipeline.streams["d"].durable_seq == 3
    finally:
        await server.close()


async def test_a_second_server_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    """Two servers on one spool and log would corrupt both: the second one's start fails, naming the first,
    and leaves the first running; once that one stopped, a server starts there again."""
    server, config = await _started(tmp_path / "data")
    try:
        with pytest.raises(ApplierLocked, match=r"another process server is running on .*\(pid \d+ \(blockferry serve\)\)"):
            await ProcessServer(config).start()
        assert server.connect_info is not None
        async with agent_for(config.server.data_dir, config.server.port) as agent:
            disk = await agent.open_disk("d", 1 * MiB)
            assert await (await disk.write(0, b"\x01" * 4096)) == 1
    finally:
        await server.close()
    async with ProcessServer(config):
        pass
