"""The seed volume on Azure page blobs, against a real Azurite (no mocks).

Write planning (coalesced, aligned, in-order, at most 4 MiB per Put Page), the SeedVolume contract on a page
blob, sparse failover copies of only the valid page ranges, bounded parallelism, transient faults (reads report
them, writes ride them out), a permanent failure inside an apply group, secrets, the applier's lease (a second
applier is refused, a restarted one takes its lease back) and an applier killed mid-group with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobType
from azure.storage.blob.aio import BlobLeaseClient, BlobServiceClient
from azurite import Azurite
from faultproxy import FaultProxy
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    BLOCKFERRY,
    ServerProcess,
    agent_for,
    free_port,
    make_config,
    read_seed,
    seed_state,
    state_at,
    write_config,
    write_logged,
)

from engine.applier import ApplierLocked
from engine.config import AZURE_ENV, AzureStoreConfig, ConfigError, SeedAzureConfig, load_config, parse_config
from engine.recovery.azure_volume import (
    MAX_PAGE_WRITE,
    AzureVolumes,
    WrittenRanges,
    plan_page_writes,
    plan_reads,
)
from engine.recovery.service import open_recovery
from engine.recovery.volume import SeedState, VolumeBroken
from engine.store import StoreError
from engine.workload import ContentPool, random_writes
from protocol.journal import EntryName

MiB = 1024 * 1024
BAD_KEY = "bm90IHRoZSBhY2NvdW50IGtleSBidXQgdmFsaWQgYmFzZTY0IG9mIHNvbWUgbGVuZ3RoIQ=="


# --------------------------------------------------------------------------------------------- planning


def apply_in_order(image: bytearray, writes: list[tuple[int, bytes]]) -> None:
    for offset, data in writes:
        image[offset:offset + len(data)] = data


writes_strategy = st.lists(st.tuples(st.integers(0, 40_000), st.integers(0, 9_000)), min_size=0, max_size=12)


@settings(max_examples=200, deadline=None)
@given(writes_strategy, st.sampled_from([512, 1024, 4096]), st.integers(0, 2**32))
def test_page_plan_is_the_in_order_result_in_aligned_chunks(spec, max_bytes: int, seed: int) -> None:
    rnd = random.Random(seed)
    size = 64 * 1024
    old = rnd.randbytes(size)
    writes = [(offset, rnd.randbytes(length)) for offset, length in spec]
    expected = bytearray(old)
    apply_in_order(expected, writes)
    plan = plan_page_writes(writes, max_bytes)
    base = {s: old[s:s + 512] for s in plan.partial}
    got = bytearray(old)
    previous_end = -1
    for chunk in plan.chunks:
        assert chunk.start % 512 == 0 and chunk.end % 512 == 0 and 0 < chunk.end - chunk.start <= max_bytes
        assert chunk.start >= previous_end  # sorted and disjoint: no byte is sent twice
        previous_end = chunk.end
        page = plan.build(chunk, writes, base)
        assert len(page) == chunk.end - chunk.start
        got[chunk.start:chunk.end] = page
    assert got == expected
    # exactly the sectors the writes touch are sent
    touched = {o // 512 for offset, data in writes for o in range(offset, offset + len(data))}
    sent = {o // 512 for chunk in plan.chunks for o in range(chunk.start, chunk.end, 512)}
    assert sent == touched
    # a sector is read first only if the writes cover it in part
    covered = bytearray(size + 16 * 1024)
    for offset, data in writes:
        covered[offset:offset + len(data)] = b"\1" * len(data)
    full = {sector for sector in touched if covered[sector * 512:sector * 512 + 512].count(1) == 512}
    assert {s // 512 for s in plan.partial} == touched - full


def test_page_plan_sends_a_single_write_without_copying() -> None:
    data = memoryview(bytearray(os.urandom(9 * MiB)))
    plan = plan_page_writes([(MiB, data)])
    assert [(c.start, c.end) for c in plan.chunks] == [(MiB, 5 * MiB), (5 * MiB, 9 * MiB), (9 * MiB, 10 * MiB)]
    page = plan.build(plan.chunks[1], [(MiB, data)], {})
    assert isinstance(page, memoryview) and page.obj is data.obj  # a slice of the write, not a copy
    assert not plan.partial


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(0, 1 << 21)), max_size=20),
       st.sampled_from([0, 4096, 65536]), st.sampled_from([4096, 1 << 20]))
def test_read_plan_covers_every_range_in_bounded_spans(ranges, gap: int, max_span: int) -> None:
    spans = plan_reads(ranges, gap=gap, max_span=max_span)
    assert all(0 < b - a <= max_span for a, b in spans)
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
    for offset, length in ranges:
        pos = offset
        while pos < offset + length:
            span = next(s for s in spans if s[0] <= pos < s[1])
            pos = span[1]


def test_seed_config_names_its_keys(monkeypatch) -> None:
    for var in AZURE_ENV.values():
        monkeypatch.delenv(var, raising=False)
    assert parse_config({}).applier.volume == "local"
    config = parse_config({"applier": {"volume": "azure", "azure": {"prefix": "site-a"}}})
    assert (config.applier.azure.container, config.applier.azure.prefix) == ("blockferry-seed", "site-a/")
    for bad, key in (({"volume": "s3"}, "applier.volume"),
                     ({"azure": {"container": "No_Such"}}, "applier.azure.container"),
                     ({"azure": {"prefix": "../up"}}, "applier.azure.prefix"),
                     ({"azure": {"max_concurrency": 0}}, "applier.azure.max_concurrency")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_config({"applier": bad})
    # the seed account is the [store.azure] one: without credentials the applier cannot be built
    with pytest.raises(ConfigError) as missing:
        AzureVolumes.from_config(config)
    assert "applier.volume" in str(missing.value) and "store.azure.connection_string" in str(missing.value)
    monkeypatch.setenv("BLOCKFERRY_AZURE_CONNECTION_STRING", f"AccountName=a;AccountKey={BAD_KEY};"
                                                             "BlobEndpoint=http://127.0.0.1:9/a;")
    volumes = AzureVolumes.from_config(config)
    assert volumes.prefix == "site-a/" and volumes.lease_id_file == config.seed_dir / "azure-lease.id"
    assert BAD_KEY not in repr(volumes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=25),
       st.lists(st.tuples(st.integers(0, 240), st.integers(0, 60)), max_size=5))
def test_written_ranges_are_the_union_of_writes(added, queries) -> None:
    written = WrittenRanges()
    model = set()
    for start, length in added:
        written.add(start, start + length)
        model |= set(range(start, start + length))
    assert all(a < b for a, b in zip(written.starts, written.ends))
    assert all(written.ends[i] < written.starts[i + 1] for i in range(len(written.starts) - 1))  # merged
    assert {x for a, b in zip(written.starts, written.ends) for x in range(a, b)} == model
    for start, length in queries:
        clipped = written.clip(start, start + length)
        assert {x for a, b in clipped for x in range(a, b)} == model & set(range(start, start + length))


# --------------------------------------------------------------------------------------------- on Azurite


@pytest.fixture
async def make_volumes(azurite: Azurite, admin: BlobServiceClient,
                       tmp_path: Path) -> AsyncIterator[Callable[..., AzureVolumes]]:
    """AzureVolumes on fresh containers; closed (lease released), containers deleted, after the test."""
    made: list[AzureVolumes] = []

    def make(container: str | None = None, *, lease_id_file: Path | None = None, store: dict | None = None,
             **seed: object) -> AzureVolumes:
        store_settings = {"connection_string": azurite.connection_string(), **(store or {})}
        volumes = AzureVolumes(AzureStoreConfig(**store_settings),
                               SeedAzureConfig(container=container or azurite.new_container("seed"), **seed),
                               lease_id_file=lease_id_file or tmp_path / f"lease-{len(made)}.id")
        made.append(volumes)
        return volumes

    yield make
    for volumes in made:
        await volumes.close()
    for container in {v.container for v in made}:
        with contextlib.suppress(ResourceNotFoundError):  # never created: nothing to delete
            await admin.delete_container(container)


class Spy:
    """Records the SDK's page uploads ("upload_page") or ranged reads ("download"): ranges, concurrency."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
        from azure.storage.blob._generated.aio.operations._blob_operations import BlobOperations
        from azure.storage.blob.aio import BlobClient

        cls = BlobClient if method == "upload_page" else BlobOperations
        self.calls: list[tuple[int, int]] = []
        self.inflight = self.peak = 0
        original = getattr(cls, method)
        spy = self

        async def wrapper(client, *args, **kwargs):  # type: ignore[no-untyped-def]
            if method == "upload_page":
                spy.calls.append((kwargs["offset"], kwargs["length"]))
            else:
                first, last = kwargs["range"].removeprefix("bytes=").split("-")
                spy.calls.append((int(first), int(last) - int(first) + 1))
            spy.inflight += 1
            spy.peak = max(spy.peak, spy.inflight)
            try:
                await asyncio.sleep(0.001)  # let the other workers start: concurrency becomes visible
                return await original(client, *args, **kwargs)
            finally:
                spy.inflight -= 1

        monkeypatch.setattr(cls, method, wrapper)


async def test_volume_contract_on_a_page_blob(make_volumes, admin: BlobServiceClient, tmp_path: Path,
                                              monkeypatch) -> None:
    volumes = make_volumes(prefix="site-a", max_concurrency=3)
    vol = volumes("vm-1")
    assert await vol.load_state() is None and await volumes.list_disks() == []
    size = 12 * MiB + 1000  # not a multiple of 512: the page blob is rounded up, the logical size kept
    await vol.ensure_size(size)
    blobs = admin.get_container_client(volumes.container)
    props = await blobs.get_blob_client("site-a/vm-1.img").get_blob_properties()
    assert props.blob_type == BlobType.PAGEBLOB and props.size == 12 * MiB + 1024
    model = bytearray(size)
    rng = random.Random(5)
    writes: list[tuple[int, bytes]] = [(0, os.urandom(9 * MiB + 512))]  # more than two Put Page chunks
    for _ in range(60):  # overlapping, some unaligned (a sector written in part is read first)
        length = rng.choice([512, 4096, 100, 70_000, 1 * MiB])
        writes.append((rng.randrange(0, size - length), os.urandom(length)))
    writes.append((size - 10, b"tail end!!"))
    apply_in_order(model, writes)
    uploads = Spy(monkeypatch, "upload_page")
    await vol.write_ranges(writes)
    await vol.flush()
    assert all(o % 512 == 0 and 0 < n <= MAX_PAGE_WRITE and n % 512 == 0 for o, n in uploads.calls)
    assert len({o for o, _ in uploads.calls}) == len(uploads.calls)  # no range sent twice
    assert 1 < uploads.peak <= 3, uploads.peak  # parallel, within max_concurrency
    ranges = [(0, size), (5, 3), (size - 600, 600), (MiB - 1, 2), (3 * MiB, 0)]
    assert await vol.read_ranges(ranges) == [bytes(model[o:o + n]) for o, n in ranges]
    # reads: many small nearby ranges become few requests
    reads = Spy(monkeypatch, "download")
    small = [(o, 512) for o in range(0, 2 * MiB, 8192)]
    assert await vol.read_ranges(small) == [bytes(model[o:o + n]) for o, n in small]
    assert len(reads.calls) == 1 and 1 < len(small)

    # state: one atomic put; the disk is listed once it has a state
    state = SeedState("vm-1", size, applied_seq=7, last_source_us=3, applied_bytes=99)
    await vol.save_state(state)
    assert await vol.load_state() == state and await volumes.list_disks() == ["vm-1"]
    # undo entries: block blobs under journal/<disk>/
    names = [str(EntryName(i, i + 1, i % 2 == 0, 10 + i, 20 + i, "t")) for i in range(3)]
    for name in reversed(names):
        await vol.put_entry(name, name.encode() * 3)
    assert await vol.list_entries() == sorted(names)
    assert await vol.get_entry(names[1]) == names[1].encode() * 3
    await vol.delete_entry(names[1])
    await vol.delete_entry(names[1])  # deleting a missing entry is fine
    assert await vol.list_entries() == [names[0], names[2]]
    listed = sorted([n async for n in blobs.list_blob_names()])
    assert listed == sorted(["site-a/.applier.lock", "site-a/vm-1.img", "site-a/vm-1.state.json"]
                            + [f"site-a/journal/vm-1/{n}" for n in (names[0], names[2])])

    # a sparse copy of only the valid page ranges: what was never written is a hole and is not downloaded
    await vol.ensure_size(64 * MiB)  # grows; nothing is lost, the new part is a hole
    model += bytes(64 * MiB - size)
    island = os.urandom(4096)
    await vol.write_ranges([(40 * MiB, island)])
    model[40 * MiB:40 * MiB + 4096] = island
    downloads = Spy(monkeypatch, "download")
    progress: list[tuple[int, int]] = []
    out = tmp_path / "copy.img"
    assert await vol.copy_image_to(out, lambda done, total: progress.append((done, total))) == 64 * MiB
    assert out.read_bytes() == model
    assert os.stat(out).st_blocks * 512 < 14 * MiB  # sparse
    assert 9 * MiB < sum(n for _, n in downloads.calls) <= 13 * MiB  # only the written ranges travelled
    assert progress[-1] == (64 * MiB, 64 * MiB) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    # ensure_size never shrinks, and another applier process (same lease id: a restart) sees the same image
    await vol.ensure_size(MiB)
    await volumes.close()
    again = make_volumes(volumes.container, prefix="site-a", lease_id_file=volumes.lease_id_file)
    vol2 = again("vm-1")
    assert await vol2.load_state() == state
    assert await vol2.read_ranges([(0, 64 * MiB)]) == [bytes(model)]
    never = again("never-written")
    assert await never.copy_image_to(tmp_path / "empty.img") == 0 and (tmp_path / "empty.img").stat().st_size == 0


async def test_never_written_pages_are_not_read(make_volumes, monkeypatch) -> None:
    """Before-images of pages never written are zeros: a fresh disk (the initial copy) costs no reads."""
    volumes = make_volumes()
    vol = volumes("d")
    await vol.ensure_size(64 * MiB)
    reads = Spy(monkeypatch, "download")
    ranges = [(0, 4 * MiB), (10 * MiB, 4096), (30 * MiB, 8 * MiB)]
    assert await vol.read_ranges(ranges) == [bytes(n) for _, n in ranges] and reads.calls == []
    data = os.urandom(MiB)
    await vol.write_ranges([(31 * MiB, data)])
    expected = [bytes(4 * MiB), bytes(4096), bytes(MiB) + data + bytes(6 * MiB)]
    assert await vol.read_ranges(ranges) == expected
    assert reads.calls == [(31 * MiB, MiB)]  # exactly what was written, nothing around it
    # another process (a restart) learns what was written from the page ranges
    await volumes.close()
    again = make_volumes(volumes.container, lease_id_file=volumes.lease_id_file)("d")
    reads.calls.clear()
    assert await again.read_ranges(ranges) == expected and reads.calls == [(31 * MiB, MiB)]
    # too fragmented to track: everything is read, still right
    monkeypatch.setattr("engine.recovery.azure_volume.MAX_TRACKED_RANGES", 3)
    fragmented = make_volumes(volumes.container, lease_id_file=volumes.lease_id_file)("d")
    await fragmented.write_ranges([(o * MiB, b"f" * 512) for o in (1, 3, 5, 7)])
    reads.calls.clear()
    model = bytearray(64 * MiB)
    model[31 * MiB:32 * MiB] = data
    for o in (1, 3, 5, 7):
        model[o * MiB:o * MiB + 512] = b"f" * 512
    assert await fragmented.read_ranges(ranges) == [bytes(model[o:o + n]) for o, n in ranges]
    assert sum(n for _, n in reads.calls) == 4 * MiB + 4096 + 8 * MiB


async def test_a_second_applier_is_refused_and_a_restarted_one_takes_its_lease_back(make_volumes, admin,
                                                                                   tmp_path: Path) -> None:
    first = make_volumes(prefix="p")
    await first("d").ensure_size(MiB)
    holder = first.holder
    # another machine (another seed directory, so another lease id): refused, naming the holder
    other = make_volumes(first.container, prefix="p", lease_id_file=tmp_path / "other.id")
    with pytest.raises(ApplierLocked) as refused:
        await other.list_disks()
    assert "another applier holds the lease" in str(refused.value) and holder in str(refused.value)
    with pytest.raises(ApplierLocked):
        await other("d").load_state()
    # another prefix in the same container is another applier's own space
    await make_volumes(first.container, prefix="q").list_disks()
    # the same seed directory after a crash (the lease was never released): taken back at once
    restarted = make_volumes(first.container, prefix="p", lease_id_file=first.lease_id_file)
    await restarted("d").ensure_size(2 * MiB)
    await restarted.close()  # releases: now anyone may take it
    await first.close()
    await make_volumes(first.container, prefix="p", lease_id_file=tmp_path / "other.id").list_disks()


async def test_a_broken_lease_stops_changes(make_volumes, admin, tmp_path: Path, caplog) -> None:
    volumes = make_volumes()
    vol = volumes("d")
    await vol.ensure_size(MiB)
    await vol.write_ranges([(0, b"a" * 512)])
    lock = admin.get_container_client(volumes.container).get_blob_client(".applier.lock")
    await BlobLeaseClient(lock).break_lease(lease_break_period=0)  # an operator took the account over
    assert await volumes.check_lease() is False
    assert "lease" in caplog.text and "stops changing" in caplog.text
    for change in (vol.write_ranges([(0, b"b" * 512)]), vol.save_state(SeedState("d", MiB)),
                   vol.put_entry("x.undo", b"x"), vol.read_ranges([(0, 512)])):
        with pytest.raises(StoreError) as exc:
            await change
        assert exc.value.transient is False and "lease" in str(exc.value)
    assert await vol.list_entries() == []  # reading is still allowed


async def test_reads_report_transient_faults_and_writes_ride_them_out(azurite: Azurite, make_volumes,
                                                                      tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    container = azurite.new_container("faulty")
    direct = make_volumes(container)
    vol = direct("d")
    await vol.ensure_size(8 * MiB)
    await direct.close()  # release the lease for the volumes behind the proxy
    upstream = f"http://{azurite.host}:{azurite.port}"
    async with FaultProxy(upstream, seed=7, busy=1.0, max_fault_rate=1.0) as proxy:
        endpoint = azurite.connection_string(azurite.endpoint_via("127.0.0.1", proxy.port))
        proxy.enabled = False
        volumes = make_volumes(container, store={"connection_string": endpoint, "retry_total": 0,
                                                 "retry_initial_ms": 5, "retry_max_ms": 20})
        flaky = volumes("d")
        await flaky.ensure_size(8 * MiB)
        proxy.enabled = True
        with pytest.raises(StoreError) as exc:  # a read fails fast: the applier's pass is retried
            await flaky.read_ranges([(0, 4096)])
        assert exc.value.transient is True and "503" in str(exc.value)
        # a write of an apply group keeps trying (here: until cancelled, as a shutdown would)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(flaky.write_ranges([(0, b"x" * 4096)]), 0.5)
        assert proxy.stats["busy PUT"] >= 3
        assert "retrying in" in caplog.text
    # a third of all requests fail in every way: the writes still land, exactly
    async with FaultProxy(upstream, seed=8, busy=0.08, throttle=0.07, reset_before=0.07, reset_after=0.08,
                          stall=0.03, stall_s=0.6, max_fault_rate=1.0) as proxy:
        endpoint = azurite.connection_string(azurite.endpoint_via("127.0.0.1", proxy.port))
        await volumes.close()
        volumes = make_volumes(container, store={"connection_string": endpoint, "retry_total": 0, "timeout_s": 0.4,
                                                 "retry_initial_ms": 5, "retry_max_ms": 20},
                               lease_id_file=volumes.lease_id_file, max_concurrency=4)
        flaky = volumes("d")
        for _ in range(20):  # the lease and the probe are reads: retried like an applier pass
            try:
                await flaky.ensure_size(8 * MiB)
                break
            except StoreError as exc:
                assert exc.transient
        model = bytearray(8 * MiB)
        writes = [(o, os.urandom(n)) for o, n in ((0, 3 * MiB), (5 * MiB, 2 * MiB + 4096), (MiB, 8192))]
        apply_in_order(model, writes)
        await flaky.write_ranges(writes)
        await flaky.save_state(SeedState("d", 8 * MiB, applied_seq=3))
        assert sum(proxy.stats[k] for k in ("busy", "throttle", "reset_before", "reset_after", "stall")) >= 3, \
            proxy.stats
    await volumes.close()
    check = make_volumes(container, lease_id_file=volumes.lease_id_file)("d")
    assert await check.read_ranges([(0, 8 * MiB)]) == [bytes(model)]
    assert (await check.load_state()).applied_seq == 3


async def test_a_permanent_failure_inside_a_group_stops_changes(make_volumes) -> None:
    volumes = make_volumes()
    vol = volumes("d")
    await vol.ensure_size(MiB)
    name = str(EntryName(0, 5, False, 1, 2))
    await vol.put_entry(name, b"before-images")
    with pytest.raises(VolumeBroken) as exc:  # beyond the page blob: the service refuses, retrying cannot help
        await vol.write_ranges([(2 * MiB, b"z" * 512)])
    assert isinstance(exc.value.__cause__, StoreError) and exc.value.__cause__.transient is False
    for change in (vol.read_ranges([(0, 512)]), vol.write_ranges([(0, b"z" * 512)]),
                   vol.save_state(SeedState("d", MiB, applied_seq=5))):
        with pytest.raises(VolumeBroken, match="opened again"):
            await change
    assert await vol.list_entries() == [name]  # the entry stays: opening the disk again rolls the group back
    other = volumes("other")  # other disks are not affected
    await other.ensure_size(MiB)
    await other.write_ranges([(0, b"o" * 512)])


async def test_secrets_are_never_printed(azurite: Azurite, make_volumes, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    volumes = make_volumes(store={"connection_string": azurite.connection_string(key=BAD_KEY), "retry_total": 0})
    shown = [repr(volumes), repr(volumes("d"))]
    for attempt in (volumes.list_disks(), volumes("d").load_state()):
        with pytest.raises(StoreError) as exc:
            await attempt
        assert exc.value.transient is False and "not authorized" in str(exc.value)
        assert exc.value.__cause__ is None and exc.value.__suppress_context__
        shown += [str(exc.value), "".join(traceback.format_exception(exc.value))]
    shown.append(caplog.text)
    for text in shown:
        assert BAD_KEY not in text


# --------------------------------------------------------------------------------------------- the applier


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([BLOCKFERRY, "--log-level", "WARNING", *args], capture_output=True, text=True, timeout=60,
                          check=False)
    if ok:
        assert done.returncode == 0, done.stderr
    return done


async def test_applier_on_azure_killed_mid_group_keeps_seed_journal_and_points_consistent(
        tmp_path: Path, azurite: Azurite, admin: BlobServiceClient) -> None:
    """`blockferry apply` on an Azure seed, killed with SIGKILL while applying, restarted: the page blob, the
    journal and the points agree (every point materialises to the modelled disk); and while it runs, an applier
    from another seed directory (another machine) is refused."""
    data, port = tmp_path / "data", free_port()
    container = azurite.new_container("crash-seed")
    base = (f'[server]\ndata_dir = "{data}"\nport = {port}\n[batch]\nmax_bytes = "256KiB"\n'
            f'[http]\nenabled = false\n'
            f'[store.azure]\nconnection_string = "{azurite.connection_string()}"\n'
            f'[policy]\ncrash_point_interval_ms = 10\n')
    applier = ('[applier]\nenabled = false\npoll_ms = 20\ngroup_max_bytes = "1MiB"\nvolume = "azure"\n{seed_dir}'
               f'[applier.azure]\ncontainer = "{container}"\nprefix = "dc1/"\n')
    config = write_config(tmp_path / "bf.toml", base + applier.format(seed_dir=""))
    cfg = make_config(data, store={"azure": {"connection_string": azurite.connection_string()}},
                      applier={"volume": "azure", "azure": {"container": container, "prefix": "dc1/"}})
    server = ServerProcess(config, port, tmp_path / "server.log")
    server.start()
    size = 4 * MiB
    try:
        async with agent_for(data, port) as agent:
            disk = await agent.open_disk("d", size)
            writes = await write_logged(disk, random_writes(ContentPool(4 * MiB), size, max_size=128 * 1024, seed=13),
                                        300)
            await asyncio.wait_for(agent.flush(), 60)
            target = disk.acked_seq
        await asyncio.sleep(0.3)  # uploads to the local cache store finish

        def applied() -> int:
            state = seed_state(cfg, "d")
            return state["applied_seq"] if state else 0

        journal = admin.get_container_client(container)

        async def half_applied() -> bool:
            """An undo entry newer than the recorded state: a group between its entry and its state."""
            names = [n async for n in journal.list_blob_names(name_starts_with="dc1/journal/d/")]
            seq = applied()
            return any(EntryName.parse(n.rsplit("/", 1)[1]).seq_to > seq for n in names)  # type: ignore[union-attr]

        interrupted = uncommitted = 0
        for _ in range(3):  # kill each applier after it made progress, as soon as a group is under way
            before = applied()
            proc = await asyncio.to_thread(subprocess.Popen, [BLOCKFERRY, "apply", "--config", str(config)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while applied() == before and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            deadline = time.monotonic() + 1
            while not await half_applied() and time.monotonic() < deadline:
                pass
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            interrupted += 0 < applied() < target
            uncommitted += await half_applied()
        assert interrupted >= 2, "the kills should have landed while blobs remained to apply"
        assert uncommitted >= 1, "a kill should have landed between an undo entry and its state (mid-group)"
        # the killed applier kept its lease; its restart (same seed directory) takes it back
        proc = await asyncio.to_thread(subprocess.Popen, [BLOCKFERRY, "apply", "--config", str(config)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while applied() < target:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, f"applier did not catch up: {applied()} < {target}"
                await asyncio.sleep(0.05)
            # an applier on another machine (its own seed directory) is refused while this one runs
            other = write_config(tmp_path / "other.toml",
                                 base + applier.format(seed_dir=f'seed_dir = "{tmp_path / "other-seed"}"\n'))
            refused = _cli("apply", "--config", str(other), ok=False)
            assert refused.returncode != 0 and "another applier holds the lease" in refused.stderr
        finally:
            proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
        assert read_seed(cfg, "d") == state_at(writes, size, target)
        # No applier runs: the CLI takes the killed applier's lease back and recovers the journal ...
        points = json.loads(_cli("points", "list", "--disk", "d", "--config", str(config), "--json").stdout)
        assert len(points) >= 3 and points[-1]["seq"] == target
        out = tmp_path / "p.img"
        _cli("failover", "--disk", "d", "--point", points[0]["id"], "--out", str(out), "--test", "--config",
             str(config))
        assert out.read_bytes() == state_at(writes, size, points[0]["seq"]), "the oldest point is wrong"
        # ... and so does a recovery service in this process, which materialises every point
        async with open_recovery(load_config(config)) as recovery:
            assert [p.seq for p in await recovery.points("d")] == [p["seq"] for p in points]
            for point in points:
                await recovery.failover("d", point["id"], out, test=True)
                assert out.read_bytes() == state_at(writes, size, point["seq"]), f"point {point['id']} is wrong"
        # every entry in the account is a listed point: none left over from the interrupted groups
        blobs = admin.get_container_client(container)
        entries = [n async for n in blobs.list_blob_names(name_starts_with="dc1/journal/d/")]
        assert len(entries) == len(points)
    finally:
        server.stop()
        with contextlib.suppress(ResourceNotFoundError):  # never created if the test failed early
            await admin.delete_container(container)
