"""Spool recovery after a crash: only the contiguous, acknowledged prefix counts as durable."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from support import make_config, running_pipeline, wait_for

from engine.pipeline import WATERMARK_SAVE_INTERVAL_S
from engine.spool import Spool, UploadWatermarks
from protocol import LogBlobError, Write
from protocol.logblob import BlobHeader, Sealer, blob_name, key_id_of, write_record_header

KEY = bytes(range(32))


def spool_blob(spool: Spool, first: int, last: int) -> Path:
    records = b"".join(write_record_header(seq, 0, 0, 512) + bytes(512) for seq in range(first, last + 1))
    header = BlobHeader("d", 1 << 20, first, last, last - first + 1, 0, 0)
    return spool.write(blob_name("d", first, last), Sealer(KEY).seal(records, header, os.urandom(12)))


async def test_a_blob_after_a_hole_was_never_acknowledged(tmp_path: Path) -> None:
    """Spool writes finish in any order; if 3-4 never reached the disk, 5-6 was never acked either."""
    config = make_config(tmp_path / "data")
    spool = Spool(config.spool_dir, 1 << 30)
    first = spool_blob(spool, 1, 2)
    after_hole = spool_blob(spool, 5, 6)
    async with running_pipeline(config, key=KEY) as pipeline:
        stream = pipeline.streams["d"]
        assert stream.durable_seq == 2, "resume after the contiguous prefix, so the agent resends 3.."
        assert not after_hole.exists()
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 2)]
        assert not first.exists(), "uploaded blobs leave the spool"
        assert pipeline.watermarks.seqs == {"d": 2}


async def test_uploaded_blobs_left_in_the_spool_are_not_uploaded_again(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    spool = Spool(config.spool_dir, 1 << 30)
    old = spool_blob(spool, 1, 2)
    spool_blob(spool, 3, 4)
    watermarks = UploadWatermarks(config.state_dir / "uploaded.json")
    watermarks.save({"d": 2})  # the crash came after the watermark, before the spool removal
    async with running_pipeline(config, key=KEY) as pipeline:
        assert pipeline.streams["d"].durable_seq == 4
        assert not old.exists()
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 3, 4)]


async def test_a_torn_spool_blob_is_removed_not_uploaded(tmp_path: Path) -> None:
    """Spool blobs are not fsynced: after a power loss one may hold anything. Not this test's
    business where its records come from (the log: tests/test_wal.py); only that it never leaves."""
    config = make_config(tmp_path / "data")
    spool = Spool(config.spool_dir, 1 << 30)
    spool_blob(spool, 1, 2)
    bad_header = spool_blob(spool, 3, 4)
    bad_header.write_bytes(b"not a blob" + bad_header.read_bytes()[10:])
    bad_payload = spool_blob(spool, 5, 6)
    data = bytearray(bad_payload.read_bytes())
    data[-40] ^= 0xFF  # header and size intact: only authentication can tell
    bad_payload.write_bytes(data)
    async with running_pipeline(config, key=KEY) as pipeline:
        assert pipeline.streams["d"].durable_seq == 2
        assert sorted(p.name for p in (config.spool_dir / "d").iterdir()) == [blob_name("d", 1, 2).split("/")[1]]
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 2)]


async def test_a_spool_blob_under_a_key_not_in_the_ring_stops_the_start(tmp_path: Path) -> None:
    """Not damage: the key ring lacks an old key. Removing the blob would leave its records to a log
    sealed under the same missing key, so the start stops, naming the key id (never the key)."""
    config = make_config(tmp_path / "data")
    blob = spool_blob(Spool(config.spool_dir, 1 << 30), 1, 2)
    with pytest.raises(LogBlobError, match=key_id_of(KEY).hex()) as info:
        async with running_pipeline(config, key=bytes(32)):
            pass
    assert KEY.hex() not in str(info.value)
    assert blob.exists()


class FullSpool(Spool):
    """A spool whose disk is full for its first ``failures`` writes (ENOSPC, as a real full disk answers)."""

    def __init__(self, *args: object, failures: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.failures = failures

    def write(self, name: str, data: memoryview) -> Path:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path_of(name)))
        return super().write(name, data)


async def test_a_full_spool_delays_the_blob_but_not_the_logged_ack(tmp_path: Path) -> None:
    """The ack follows the write-ahead log; a blob the full disk refused is retried until it is written."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 50})
    acked: list[int] = []
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=2)) as pipeline:
        stream = pipeline.streams["d"]
        stream.listeners[object()] = lambda disk, seq: acked.append(seq)
        for seq in (1, 2):
            assert pipeline.accept_write(stream, Write.make(1, seq, 512 * seq, bytes([seq]) * 512, 0))
        await wait_for(lambda: acked, "the ack of the logged writes")
        assert acked == [2] and await pipeline.store.list_blobs() == []
        await pipeline.drain()
        assert pipeline.stats.spool_errors == 2 and stream.durable_seq == 2
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 2)]


class CountingWatermarks(UploadWatermarks):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.saves = 0

    def save(self, snapshot: dict[str, int]) -> None:
        self.saves += 1
        super().save(snapshot)


async def test_watermark_saves_are_coalesced_but_nothing_waits_for_them(tmp_path: Path) -> None:
    """One blob per write (linger 1 ms, writes 5 ms apart): the store and its listeners see every blob at
    once, while the watermark file is rewritten at most every WATERMARK_SAVE_INTERVAL_S."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 1, "min_bytes": 0})
    watermarks = CountingWatermarks(config.state_dir / "uploaded.json")
    stored: list[int] = []
    async with running_pipeline(config, watermarks=watermarks) as pipeline:
        pipeline.stored_listeners.append(lambda: stored.append(pipeline.streams["d"].uploaded_seq))
        stream = pipeline.streams["d"]
        started = asyncio.get_running_loop().time()
        for seq in range(1, 101):
            assert pipeline.accept_write(stream, Write.make(1, seq, 512 * seq, bytes([seq]) * 512, 0))
            await asyncio.sleep(0.005)
        await pipeline.drain()
        elapsed = asyncio.get_running_loop().time() - started
        assert len(await pipeline.store.list_blobs()) > 30, "expected (nearly) one blob per write"
        assert stored[-1] == 100, "the store's listeners heard of the last upload without waiting for a save"
        assert watermarks.saves <= elapsed / WATERMARK_SAVE_INTERVAL_S + 2, (watermarks.saves, elapsed)
        await asyncio.sleep(2 * WATERMARK_SAVE_INTERVAL_S)  # the last save lands
        assert UploadWatermarks(config.state_dir / "uploaded.json").seqs == {"d": 100}

