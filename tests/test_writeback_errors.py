"""A failed data sync of a blob file ("fsyncgate"): nothing acknowledged may be lost because of it.

After a failed writeback Linux marks the file's pages clean and reports the error once, so a second sync
succeeds without writing them. Such a file must never be stored as it is: it is written again into a new
file from a copy that authenticates, or its records come back from the write-ahead log.

No file system here fails a sync on demand, so ``os.fdatasync`` is replaced by one that fails the first
sync of each spool blob the way the kernel does (EIO once, then success), and can also leave the file as a
lost page cache would (changed bytes). Everything else is real: files, syncs, spool, log and store.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from support import make_config, running_pipeline, wait_for
from test_wal import StoreDown

import engine.fsutil
from engine.config import Config
from engine.monitor import Monitor
from engine.pipeline import READ_BACK_ATTEMPTS
from engine.spool import Spool
from engine.store import LocalStore
from protocol import Write
from protocol.logblob import BLOB_SUFFIX, blob_name, iter_records, open_blob

KEY = bytes(range(32))


def keys(key_id: bytes) -> bytes:
    return KEY


class FailingWriteback:
    """``os.fdatasync`` (or ``real``) that fails the first sync of each spool blob name with EIO, as the kernel reports a
    failed writeback once (a sync of the same file after it succeeds); ``damage`` also changes the file, as
    if its pages were evicted and read back from a disk that never got them. Records the inodes it failed."""

    def __init__(self, spool_dir: Path, *, damage: bool = False, suffix: str = BLOB_SUFFIX,
                 real: Callable[[int], None] = os.fdatasync) -> None:
        self.spool_dir, self.damage, self.suffix = spool_dir, damage, suffix
        self.failed: dict[int, Path] = {}
        self._real = real

    def __call__(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        inode = os.fstat(fd).st_ino
        if path.name.endswith(self.suffix) and path.is_relative_to(self.spool_dir) and path not in self.failed.values():
            self.failed[inode] = path
            if self.damage:
                with open(path, "r+b") as file:
                    file.seek(-40, os.SEEK_END)
                    file.write(bytes(8))
            raise OSError(errno.EIO, "Input/output error")
        self._real(fd)


def stored_writes(store_dir: Path, name: str) -> dict[int, bytes]:
    header, records = open_blob((store_dir / name).read_bytes(), keys, name=name)
    return {record.seq: bytes(record.data) for record in iter_records(records, header)}


async def write_and_wait_for_acks(pipeline, writes: list[Write]) -> list[int]:
    stream = pipeline.streams["d"]
    acked: list[int] = []
    stream.listeners[object()] = lambda disk, seq: acked.append(seq)
    for write in writes:
        assert pipeline.accept_write(stream, write)
    await wait_for(lambda: acked and acked[-1] == writes[-1].seq, "the acks")
    return acked


WRITES = [Write.make(1, seq, 4096 * seq, bytes([seq]) * 4096, 0) for seq in (1, 2, 3)]


def local_store(config: Config, mode: str) -> LocalStore:
    """The local store, hard-linking spool files (same file system) or copying them (another one)."""
    store = LocalStore(config.store_dir)
    store._copy = mode == "copy"
    return store


@pytest.mark.parametrize("mode", ["link", "copy"])
async def test_a_blob_whose_data_sync_failed_is_stored_from_a_new_file(
        mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    failing = FailingWriteback(config.spool_dir)
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", failing)
    async with running_pipeline(config, key=KEY, store=local_store(config, mode)) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        await pipeline.drain()
        name = blob_name("d", 1, 3)
        assert await pipeline.store.list_blobs() == [name]
        assert list(failing.failed.values()) == [config.spool_dir / name], "the store synced it, and that failed"
        assert mode == "copy" or (config.store_dir / name).stat().st_ino not in failing.failed, (
            "the file whose sync failed was stored as it was: its data may never have reached the disk")
        assert stored_writes(config.store_dir, name) == {w.seq: w.data for w in WRITES}
        assert pipeline.stats.upload_errors == 1 and pipeline.streams["d"].log_failure is None
    assert f"blob {name} written again into a new file" in caplog.text


@pytest.mark.parametrize("mode", ["link", "copy"])
async def test_a_blob_lost_with_its_failed_sync_stops_its_disk_and_the_log_brings_it_back(
        mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The page cache no longer holds the blob: only the log has its writes. The disk stops (its agent
    is refused, not acknowledged into a hole) and the blob never goes to the store; a restart replays it."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", FailingWriteback(config.spool_dir, damage=True))
    name = blob_name("d", 1, 3)
    async with running_pipeline(config, key=KEY, store=local_store(config, mode)) as pipeline:
        monitor = Monitor(config, pipeline, None, upload_failing_s=0.1, interval_s=0.02)
        observing = asyncio.create_task(monitor.run())  # watching while the uploads fail
        await write_and_wait_for_acks(pipeline, WRITES)
        stream = pipeline.streams["d"]
        failure = await wait_for(lambda: stream.log_failure, "the disk to stop")
        assert name in failure and "could not be trusted" in failure and "authentication failed" in failure
        await asyncio.sleep(0.3)
        reasons = monitor.healthy()[1]
        observing.cancel()
        assert reasons and not [r for r in reasons if "uploads" in r], "the store is fine: only the disk stopped"
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == []
        assert not (config.spool_dir / name).exists()
        assert pipeline.watermarks.seqs.get("d", 0) == 0, "the log must keep what was never stored"
        assert pipeline.spool.used_bytes == pipeline.wal.size_bytes, "the removed blob counts no more"
        with pytest.raises(Exception, match="replication of this disk stopped"):
            pipeline.accept_write(stream, Write.make(1, 4, 0, bytes(4096), 0))
    assert "restart the server, which replays it, then the agent" in caplog.text
    monkeypatch.undo()
    async with running_pipeline(config, key=KEY) as pipeline:
        assert pipeline.streams["d"].durable_seq == 3, "the log replayed every acknowledged write"
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [name]
        assert stored_writes(config.store_dir, name) == {w.seq: w.data for w in WRITES}


async def test_a_start_writes_a_spool_blob_whose_sync_fails_into_a_new_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start syncs what it finds in the spool (it may come from the page cache after a kill -9)."""
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY, store=StoreDown(config.store_dir)) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        name = blob_name("d", 1, 3)
        await wait_for(lambda: (config.spool_dir / name).exists(), "the spooled blob")
    failing = FailingWriteback(config.spool_dir)
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", failing)
    recovered = Spool(config.spool_dir, 1 << 30).recover(keys)
    assert [blob.name for blob in recovered] == [name]
    assert list(failing.failed.values()) == [config.spool_dir / name]
    assert (config.spool_dir / name).stat().st_ino not in failing.failed, "synced again as it was"
    assert open_blob((config.spool_dir / name).read_bytes(), keys, name=name)


class BrokenStore(StoreDown):
    async def put_files(self, items: list[tuple[str, Path]]) -> None:
        raise RuntimeError("a store bug")


async def test_an_upload_worker_that_fails_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Not a store that is down (retried): an error no upload expects ends the worker, loudly."""
    config = make_config(tmp_path / "data", upload={"concurrency": 1})
    async with running_pipeline(config, key=KEY, store=BrokenStore(config.store_dir)) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        await wait_for(lambda: "upload-0 ended: RuntimeError('a store bug')" in caplog.text, "the critical log")
        assert [r.levelname for r in caplog.records if "upload-0 ended" in r.message] == ["CRITICAL"]
        healthy, reasons = Monitor(config, pipeline, None).healthy()
        assert not healthy and [r for r in reasons if r.startswith("upload-0 ended: RuntimeError('a store bug')")]


async def test_a_store_directory_whose_sync_failed_gets_its_names_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synced again as it is, a directory whose writeback failed passes without the names linked into it."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    failed: list[str] = []
    links: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path == str(config.store_dir / "d") and not failed:
            failed.append(path)
            links.append("the failed directory sync")
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(engine.fsutil.os, "fsync", fsync)
    monkeypatch.setattr(engine.store.local.os, "link", lambda source, target: (real_link(source, target),
                                                                                links.append(str(target)))[0])
    async with running_pipeline(config, key=KEY) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        await pipeline.drain()
        name = blob_name("d", 1, 3)
        assert failed and await pipeline.store.list_blobs() == [name]
        assert links[-2:] == ["the failed directory sync", str(config.store_dir / name)], "no name made again"
        assert stored_writes(config.store_dir, name) == {w.seq: w.data for w in WRITES}


async def test_a_start_writes_a_log_segment_whose_sync_fails_into_a_new_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A start syncs the log it replays (it may come from the page cache after a kill -9); failing the
    start instead would let the next one's sync pass without the chunks."""
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY, store=StoreDown(config.store_dir)) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
    segments = sorted((config.spool_dir / ".wal").iterdir())
    inodes = {path.stat().st_ino for path in segments}
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", FailingWriteback(config.spool_dir / ".wal", suffix=".wal"))
    async with running_pipeline(config, key=KEY) as pipeline:
        assert pipeline.streams["d"].durable_seq == 3
        await pipeline.drain()
        assert stored_writes(config.store_dir, blob_name("d", 1, 3)) == {w.seq: w.data for w in WRITES}
    assert "could not be synced; written again into a new file" in caplog.text
    assert not inodes & {path.stat().st_ino for path in segments if path.exists()}


async def test_a_start_leaves_a_spool_blob_it_cannot_make_durable_to_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY, store=StoreDown(config.store_dir)) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        name = blob_name("d", 1, 3)
        await wait_for(lambda: (config.spool_dir / name).exists(), "the spooled blob")
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", FailingWriteback(config.spool_dir))
    monkeypatch.setattr(engine.fsutil.os, "fsync", FailingWriteback(config.spool_dir, suffix=".tmp", real=os.fsync))
    async with running_pipeline(config, key=KEY) as pipeline:
        assert pipeline.streams["d"].durable_seq == 3, "the log replays what the spool could not keep"
        monkeypatch.undo()
        await pipeline.drain()
        assert stored_writes(config.store_dir, name) == {w.seq: w.data for w in WRITES}
    assert "cannot be made durable" in caplog.text


async def test_a_blob_that_cannot_be_written_again_is_given_up_to_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewrite that keeps failing (the disk still failing, or full) must not hold its group's other blobs,
    and their spool space, for good: after a few attempts the blob is given up and its disk stopped."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    monkeypatch.setattr(engine.fsutil.os, "fdatasync", FailingWriteback(config.spool_dir))
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # every new copy's sync fails
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(engine.fsutil.os, "fsync", fsync)
    name = blob_name("d", 1, 3)
    async with running_pipeline(config, key=KEY) as pipeline:
        await write_and_wait_for_acks(pipeline, WRITES)
        failure = await wait_for(lambda: pipeline.streams["d"].log_failure, "the disk to stop")
        assert name in failure and "Input/output error" in failure
        assert await pipeline.store.list_blobs() == [] and not (config.spool_dir / name).exists()
        assert pipeline.stats.upload_errors == READ_BACK_ATTEMPTS
    monkeypatch.undo()
    async with running_pipeline(config, key=KEY) as pipeline:
        await pipeline.drain()
        assert stored_writes(config.store_dir, name) == {w.seq: w.data for w in WRITES}
