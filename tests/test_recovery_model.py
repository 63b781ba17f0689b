"""Model-based test of recovery points: every retained point recovers exactly the modelled disk.

Random writes and tags on a small disk are sealed into log blobs (as the process
server would), applied in random-sized passes, pruned at random moments; after
each step every retained point is materialised and compared byte for byte with
an in-memory model of the disk at that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import BlobServiceClient
from azurite import Azurite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.fsutil
from engine.applier import Applier
from engine.config import AzureStoreConfig, PolicyConfig, SeedAzureConfig
from engine.keys import KeyRing
from engine.recovery.azure_volume import AzureVolumes
from engine.recovery.failover import commit, failover
from engine.recovery.points import PointNotFound
from engine.recovery.volume import LocalVolume, LocalVolumes, VolumeBroken
from engine.store import LocalStore
from engine.store.base import StoreError
from protocol import TagKind
from protocol.logblob import BlobHeader, Sealer, blob_name, tag_record, write_record_header

DISK = "m"
SIZE = 64 * 1024
SECTOR = 512
KEY = bytes(range(32))

write_op = st.tuples(st.just("write"), st.integers(0, SIZE // SECTOR - 1), st.integers(1, 16), st.integers(0, 255))
tag_op = st.tuples(st.just("tag"), st.sampled_from([TagKind.CRASH, TagKind.APP]))
cut_op = st.just(("cut",))
apply_op = st.just(("apply",))
prune_op = st.tuples(st.just("prune"), st.integers(0, 4))
ops = st.lists(st.one_of(write_op, write_op, write_op, tag_op, cut_op, cut_op, apply_op, prune_op),
               min_size=1, max_size=40)


class Model:
    def __init__(self) -> None:
        self.disk = bytearray(SIZE)
        self.seq = 0
        self.at: dict[int, bytes] = {0: bytes(SIZE)}  # state after each sequence that ends a blob
        self.records: list[bytes | memoryview] = []
        self.first = 1
        self.last_ts = 0


def seal_blob(store_dir: Path, sealer: Sealer, model: Model) -> None:
    if model.seq < model.first:
        return
    header = BlobHeader(DISK, SIZE, model.first, model.seq, model.seq - model.first + 1, 0, model.last_ts)
    blob = bytes(sealer.seal(b"".join(model.records), header, os.urandom(12)))
    path = store_dir / blob_name(DISK, model.first, model.seq)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    model.at[model.seq] = bytes(model.disk)
    model.records = []
    model.first = model.seq + 1


async def check_points(applier: Applier, model: Model, tmp: Path) -> None:
    d = applier.disks.get(DISK)
    if d is None:
        return
    seqs = [p.seq for p in applier.points(DISK)] + [d.state.applied_seq]
    for seq in seqs:
        out = tmp / f"point-{seq}.img"
        await failover(applier, DISK, str(seq), out, test=True)
        assert out.read_bytes() == model.at[seq], f"point {seq} differs from the model"
        out.unlink()


async def run(operations: list[tuple], tmp: Path, azure: tuple[Azurite, str] | None = None) -> None:
    """``azure``: the seed volume as page blobs in this Azurite container (a fresh prefix per run)."""
    store_dir, seed_dir = tmp / "cache", tmp / "seed"
    store = LocalStore(store_dir, fsync=False)
    sealer = Sealer(KEY)
    policy = PolicyConfig(crash_point_interval_ms=0, retention_hours=1)
    if azure is None:
        applier = Applier(store, KeyRing(KEY), LocalVolumes(seed_dir, fsync=False), lambda disk: policy,
                          group_max_bytes=1 << 20)
    else:
        azurite, container = azure
        volumes = AzureVolumes(AzureStoreConfig(connection_string=azurite.connection_string()),
                               SeedAzureConfig(container=container, prefix=f"{uuid.uuid4().hex}/"))
        applier = Applier(store, KeyRing(KEY), volumes, lambda disk: policy, group_max_bytes=1 << 20)
    model = Model()
    try:
        for op in operations:
            if op[0] == "write":
                _, sector, count, value = op
                count = min(count, SIZE // SECTOR - sector)
                data = bytes([value]) * (count * SECTOR)
                model.seq += 1
                model.last_ts += 1
                model.records += [write_record_header(model.seq, model.last_ts, sector * SECTOR, len(data)), data]
                model.disk[sector * SECTOR:sector * SECTOR + len(data)] = data
            elif op[0] == "tag":
                model.seq += 1
                model.records.append(tag_record(model.seq, model.last_ts, op[1], f"tag-{model.seq}"))
                seal_blob(store_dir, sealer, model)  # the server cuts a batch at every tag
            elif op[0] == "cut":
                seal_blob(store_dir, sealer, model)
            elif op[0] == "apply":
                await applier.apply_available(force=True)
                await check_points(applier, model, tmp)
            elif op[0] == "prune" and DISK in applier.disks:
                entries = applier.disks[DISK].entries
                keep = op[1]
                retention_us = 3600 * 10**6
                # "now" such that only the newest `keep` entries were recorded within the retention window
                now_us = (entries[-keep].recorded_us + retention_us if keep and len(entries) >= keep
                          else (entries[-1].recorded_us + retention_us + 1 if entries else 0))
                recent = [e.seq_to for e in entries if e.recorded_us >= now_us - retention_us]
                await applier.prune(now_us=now_us)
                remaining = [p.seq for p in applier.points(DISK)]
                assert all(seq in remaining for seq in recent), "a point within retention was pruned"
                await check_points(applier, model, tmp)
        seal_blob(store_dir, sealer, model)
        await applier.apply_available(force=True)
        assert applier.applied_seq(DISK) == (model.seq if model.seq else 0)
        await check_points(applier, model, tmp)
        if model.seq and azure is None:
            assert (seed_dir / f"{DISK}.img").read_bytes() == bytes(model.disk)
        elif model.seq:
            await applier.disks[DISK].volume.copy_image_to(tmp / "seed.img")
            assert (tmp / "seed.img").read_bytes() == bytes(model.disk)
    finally:
        await applier.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_every_retained_point_recovers_the_model(operations: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(operations, Path(tmp)))


@pytest.fixture
def seed_container(azurite: Azurite) -> Iterator[str]:
    container = azurite.new_container("model")
    yield container
    with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
        try:
            client.delete_container(container)
        except ResourceNotFoundError:
            pass


# The same model on page blobs in Azurite: fewer examples (every step materialises every point over HTTP).
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(operations=ops)
def test_every_retained_point_recovers_the_model_on_azure(operations: list[tuple], azurite: Azurite,
                                                          seed_container: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(operations, Path(tmp), (azurite, seed_container)))


async def test_before_images_are_read_back_to_back_with_zeros_for_holes_and_past_the_end(tmp_path: Path) -> None:
    """The undo entry compresses them straight from this buffer: a byte out of place would roll back wrong."""
    volume = LocalVolume(tmp_path, "d")
    try:
        data = os.urandom(4096)
        os.pwrite(volume._fd, data, 8192)  # a hole, then 4 KiB of data; the image ends at 12 KiB
        ranges = [(0, 4096), (8192, 4096), (10240, 4096)]
        images = volume._read_images(ranges)
        assert bytes(images) == bytes(4096) + data + data[2048:] + bytes(2048)
        assert volume._read_ranges(ranges) == [bytes(4096), data, data[2048:] + bytes(2048)]
    finally:
        await volume.close()


async def test_overlapping_blobs_apply_each_sequence_once(tmp_path: Path) -> None:
    """After a power loss took a spooled blob's name but not the copy the store already held, the log
    is replayed into batches cut anew: blobs in the store may overlap or lie inside one another."""
    records: dict[int, list[bytes]] = {}
    model = bytearray(SIZE)
    for seq in range(1, 8):
        if seq in (4, 6):
            records[seq] = [tag_record(seq, seq, TagKind.APP, f"backup-{seq}")]
            continue
        data = bytes([seq]) * (2 * SECTOR)
        records[seq] = [write_record_header(seq, seq, (seq % 3) * SECTOR, len(data)), data]
        model[(seq % 3) * SECTOR:(seq % 3) * SECTOR + len(data)] = data
    store_dir = tmp_path / "cache"
    for first, last in [(1, 4), (1, 7), (2, 3), (5, 6)]:
        header = BlobHeader(DISK, SIZE, first, last, last - first + 1, 0, last)
        path = store_dir / blob_name(DISK, first, last)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(Sealer(KEY).seal(b"".join(r for seq in range(first, last + 1) for r in records[seq]),
                                                header, os.urandom(12))))
    applier = _local_applier(store_dir, tmp_path / "seed")
    try:
        while await applier.apply_available(force=True):
            pass
        assert applier.disks[DISK].state.applied_seq == 7
        assert [(p.seq, p.tag_id) for p in applier.points(DISK) if p.kind == "app"] == [(4, "backup-4")]
        out = tmp_path / "latest.img"
        await failover(applier, DISK, "latest", out, test=True)
        assert out.read_bytes() == bytes(model)
        assert await applier.store.list_blobs() == []
    finally:
        await applier.close()


def _local_applier(store: Path | LocalStore, seed_dir: Path, *, fsync: bool = False) -> Applier:
    """An applier of a local cache store (a directory, or the store itself) onto local seed volumes, every group
    a point."""
    policy = PolicyConfig(crash_point_interval_ms=0, retention_hours=1)
    store = store if isinstance(store, LocalStore) else LocalStore(store, fsync=False)
    return Applier(store, KeyRing(KEY), LocalVolumes(seed_dir, fsync=fsync), lambda disk: policy)


def _store_blob(store_dir: Path, seq: int, offset: int, data: bytes, disk: str = DISK) -> None:
    header = BlobHeader(disk, SIZE, seq, seq, 1, 0, seq)
    path = store_dir / blob_name(disk, seq, seq)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = write_record_header(seq, seq, offset, len(data)) + data
    path.write_bytes(bytes(Sealer(KEY).seal(record, header, os.urandom(12))))


@pytest.mark.parametrize("seed", ["local", "azure"])
async def test_a_group_failing_after_its_undo_entry_is_rolled_back_before_it_is_applied_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, seed: str) -> None:
    """The state cannot be saved (a full disk, a refused request) after the group's writes landed. Applying
    the group again on that image would store the half-applied image as the point before it: the volume
    refuses every change, and the applier opens the disk again, which rolls the group back, before it
    retries."""
    store_dir = tmp_path / "cache"
    policy = PolicyConfig(crash_point_interval_ms=0, retention_hours=1)
    if seed == "local":
        volumes: object = LocalVolumes(tmp_path / "seed", fsync=False)
    else:
        azurite = request.getfixturevalue("azurite")
        volumes = AzureVolumes(AzureStoreConfig(connection_string=azurite.connection_string()),
                               SeedAzureConfig(container=request.getfixturevalue("seed_container"),
                                               prefix=f"{uuid.uuid4().hex}/"))
    applier = Applier(LocalStore(store_dir, fsync=False), KeyRing(KEY), volumes, lambda disk: policy)  # type: ignore[arg-type]
    first, second = b"a" * 1024, b"b" * 512
    _store_blob(store_dir, 1, 0, first)
    try:
        assert await applier.apply_available(force=True) == 1
        _store_blob(store_dir, 2, 256, second)
        broken = applier.disks[DISK].volume
        if seed == "local":
            def full_disk(state: object) -> None:
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(broken, "_save_state", full_disk)
        else:
            async def refused(*args: object, **kwargs: object) -> None:
                raise StoreError("No space left in the account (refused)", transient=False)

            monkeypatch.setattr(broken._state, "upload_blob", refused)  # type: ignore[attr-defined]
        assert await applier.apply_available(force=True) == 0
        with pytest.raises(VolumeBroken, match=r"disk 'm'.*up to sequence 2.*No space left.*opened again"):
            await broken.write_ranges([(0, b"x" * 512)])
        assert applier.disks[DISK].volume is not broken
        assert applier.applied_seq(DISK) == 1
        assert (await applier.disks[DISK].volume.read_ranges([(0, 1024)]))[0] == first  # rolled back
        assert await applier.apply_available(force=True) == 1  # the disk has room again
        expected = {1: first + bytes(SIZE - 1024), 2: first[:256] + second + first[768:] + bytes(SIZE - 1024)}
        assert [p.seq for p in applier.points(DISK)] == [1, 2]
        for seq, image in expected.items():
            out = tmp_path / f"p{seq}.img"
            await failover(applier, DISK, str(seq) if seq != 2 else "latest", out, test=True)
            assert out.read_bytes() == image, f"point {seq}"
    finally:
        await applier.close()


FIRST = b"a" * 1024  # what blob 1 writes at offset 0 (:func:`_applied_blob_1`)


@contextlib.asynccontextmanager
async def _applied_blob_1(tmp_path: Path) -> AsyncIterator[tuple[Applier, Path]]:
    """An applier on local directories that has applied blob 1 (``FIRST`` at offset 0); closed on exit."""
    store_dir = tmp_path / "cache"
    applier = _local_applier(store_dir, tmp_path / "seed")
    _store_blob(store_dir, 1, 0, FIRST)
    try:
        assert await applier.apply_available(force=True) == 1
        yield applier, store_dir
    finally:
        await applier.close()


class HeldCopy:
    """A failover's progress callback that holds the copy, once it has read the whole disk, until released."""

    def __init__(self) -> None:
        self.copied, self.resume = threading.Event(), threading.Event()

    def __call__(self, done: int, total: int) -> None:  # in the copying thread
        if done == total and not self.copied.is_set():
            self.copied.set()
            self.resume.wait(10)

    async def reached(self) -> None:
        assert await asyncio.to_thread(self.copied.wait, 10)


@pytest.mark.parametrize("test", [True, False], ids=["test-failover", "failover"])
async def test_a_disk_that_breaks_under_a_failover_copy_is_opened_again_only_once_the_copy_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, test: bool) -> None:
    """Group 2's writes land, and a failover copies the disk before the group's state save fails. Opening the
    disk again rolls group 2 back and deletes its undo entry, the one the copy needs to undo the writes it
    copied (and it closes the file the copy reads): under the copy, that would hand out point 1 with group
    2's writes in it. The applier waits for the copy instead. A failover (not a test) is then recorded in
    the disk opened again, not refused by the broken volume it copied."""
    second = b"b" * 512
    async with _applied_blob_1(tmp_path) as (applier, store_dir):
        _store_blob(store_dir, 2, 256, second)
        broken = applier.disks[DISK].volume
        landed, fail, held = threading.Event(), threading.Event(), HeldCopy()

        def full_disk_once_copied(state: object) -> None:  # in the apply thread, after the group's writes
            landed.set()
            fail.wait(10)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(broken, "_save_state", full_disk_once_copied)
        apply = asyncio.create_task(applier.apply_available(force=True))
        assert await asyncio.to_thread(landed.wait, 10)
        out = tmp_path / "p1.img"
        copying = asyncio.create_task(failover(applier, DISK, "latest-processed", out, test=test, progress=held))
        await held.reached()
        fail.set()
        while not apply.done() and "waiting for 1 failover(s) copying it" not in caplog.text:
            await asyncio.sleep(0.01)
        held.resume.set()
        result = await copying
        assert await apply == 0
        assert (result.seq, result.rolled_back_entries) == (1, 1)
        assert out.read_bytes() == FIRST + bytes(SIZE - 1024), "the copy was handed out with group 2 in it"
        assert applier.disks[DISK].volume is not broken
        assert applier.applied_seq(DISK) == 1
        assert applier.disks[DISK].state.failover_seq == (None if test else 1)
        assert await applier.apply_available(force=True) == 1
        await failover(applier, DISK, "latest", out, test=True)
        assert out.read_bytes() == FIRST[:256] + second + FIRST[768:] + bytes(SIZE - 1024)


async def test_a_commit_waits_for_a_failover_copy_that_needs_the_entries_it_releases(tmp_path: Path) -> None:
    """A commit deletes every undo entry. A test failover of point 1 copying meanwhile would find none newer
    than its point to roll back through, and hand out the latest image as point 1: the commit is refused
    until the copy is done."""
    async with _applied_blob_1(tmp_path) as (applier, store_dir):
        _store_blob(store_dir, 2, 0, b"b" * 1024)
        assert await applier.apply_available(force=True) == 1  # a group, a point, each
        await failover(applier, DISK, "latest", tmp_path / "latest.img", test=False)
        held = HeldCopy()
        point = next(p for p in applier.points(DISK) if p.seq == 1)
        out = tmp_path / "p1.img"
        copying = asyncio.create_task(failover(applier, DISK, point.id, out, test=True, progress=held))
        await held.reached()
        with pytest.raises(PointNotFound, match="being copied by another failover"):
            await commit(applier, DISK)
        held.resume.set()
        assert (await copying).seq == 1
        assert out.read_bytes() == FIRST + bytes(SIZE - 1024)
        assert await commit(applier, DISK) == 2
        with pytest.raises(PointNotFound, match="committed"):
            await failover(applier, DISK, "latest-processed", out, test=True)


async def test_a_latest_failover_copies_the_disk_its_catch_up_opened_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catching up applies group 2, whose state cannot be saved, so the disk is opened again as a new state:
    the failover copies that one, not the closed volume it looked up before catching up."""
    async with _applied_blob_1(tmp_path) as (applier, store_dir):
        _store_blob(store_dir, 2, 256, b"b" * 512)

        def full_disk(state: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(applier.disks[DISK].volume, "_save_state", full_disk)
        out = tmp_path / "latest.img"
        result = await failover(applier, DISK, "latest", out, test=True)
        assert (result.seq, out.read_bytes()) == (1, FIRST + bytes(SIZE - 1024))


async def test_a_seed_state_is_made_durable_before_the_applier_acts_on_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between the state file's rename and its directory's sync leaves the new state in the page cache
    only. The restarted applier deletes blobs the state says are applied (here one a crash left behind): the
    state file and its directory must be on disk before that."""
    store_dir, seed_dir = tmp_path / "cache", tmp_path / "seed"
    applier = _local_applier(store_dir, seed_dir, fsync=True)
    _store_blob(store_dir, 1, 0, b"a" * 1024)
    try:
        assert await applier.apply_available(force=True) == 1
    finally:
        await applier.close()
    _store_blob(store_dir, 1, 0, b"a" * 1024)  # applied, but the crash came before its deletion
    events: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def recording(real):  # type: ignore[no-untyped-def]
        def sync(fd: int) -> None:
            events.append("synced " + os.readlink(f"/proc/self/fd/{fd}"))
            real(fd)
        return sync

    monkeypatch.setattr(engine.fsutil.os, "fdatasync", recording(real_fdatasync))
    monkeypatch.setattr(engine.fsutil.os, "fsync", recording(real_fsync))
    store = LocalStore(store_dir, fsync=False)
    delete = store.delete

    async def recorded_delete(name: str) -> None:
        events.append("deleted " + name)
        await delete(name)

    store.delete = recorded_delete  # type: ignore[method-assign]
    applier = _local_applier(store, seed_dir, fsync=True)
    try:
        await applier.apply_available(force=True)
        deleted = events.index("deleted " + blob_name(DISK, 1, 1))
        assert f"synced {seed_dir / (DISK + '.state')}" in events[:deleted], events
        assert f"synced {seed_dir}" in events[:deleted], events
    finally:
        await applier.close()


async def test_a_failover_refused_by_its_volume_leaves_the_disk_as_it_was(tmp_path: Path) -> None:
    """A failover or commit whose state cannot be saved must not leave memory ahead of the disk: a disk
    committed in memory only has its blobs deleted unapplied, pass after pass."""
    store_dir, seed_dir = tmp_path / "cache", tmp_path / "seed"
    applier = _local_applier(store_dir, seed_dir)
    _store_blob(store_dir, 1, 0, b"a" * 1024)
    _store_blob(store_dir, 2, 0, b"b" * 1024)
    try:
        assert await applier.apply_available(force=True) == 2
        d = applier.disks[DISK]

        def full_disk(state: object) -> None:
            raise OSError(28, "No space left on device")

        d.volume._save_state = full_disk  # type: ignore[attr-defined]
        points = applier.points(DISK)
        with pytest.raises(OSError, match="No space left"):
            await failover(applier, DISK, points[0].id, tmp_path / "p.img", test=False)
        assert d.state.failover_seq is None
        d.state.failover_seq = points[0].seq  # as if the failover had been saved: its commit is refused too
        with pytest.raises(OSError, match="No space left"):
            await commit(applier, DISK)
        assert not d.state.committed_failover and applier.points(DISK) == points
    finally:
        await applier.close()


async def test_a_pass_ends_with_the_error_that_ends_the_applier_not_a_store_that_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every disk's apply finishes before a pass ends; of their errors, one the applier cannot retry (here
    the seed directory's) wins over a store error, which only means "try again at the next pass"."""
    store_dir, seed_dir = tmp_path / "cache", tmp_path / "seed"
    applier = _local_applier(store_dir, seed_dir)
    for disk in ("a", "b"):
        _store_blob(store_dir, 1, 0, b"x" * 512, disk=disk)
    get = applier.store.get

    async def store_down_for_a(name: str) -> bytes:
        if name.startswith("a/"):
            raise StoreError("the store is down")
        return await get(name)

    def no_seed(size: int) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(applier.store, "get", store_down_for_a)
    try:
        await applier.disk("b")
        monkeypatch.setattr(applier.disks["b"].volume, "_ensure_size", no_seed)
        with pytest.raises(OSError, match="Read-only"):
            await applier.apply_available(force=True)
    finally:
        await applier.close()
