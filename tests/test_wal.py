"""The spool's write-ahead log: acks follow it, restarts replay it, uploads let it go."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import make_config, running_pipeline, wait_for
from test_spool_recovery import FullSpool

import engine.wal
from engine.pipeline import Pipeline
from protocol import LogBlobError, Write
from protocol.logblob import (
    GCM_TAG_SIZE,
    RECORD_HEADER,
    WriteRecord,
    iter_records,
    key_id_of,
    open_blob,
    write_record_header,
)
from protocol.wal import CHUNK_HEADER, SECTION_HEADER, STREAM_BUFFER, WalSealer, read_chunk, section_header

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def keys(key_id: bytes) -> bytes | None:
    return KEY if key_id == key_id_of(KEY) else None


def sealed_chunk(number: int, pieces: list[bytes | memoryview], key: bytes = KEY) -> bytes:
    return b"".join(bytes(view) for view in WalSealer(key).seal(number, pieces, os.urandom(12)))


def segments(pipeline: Pipeline) -> list[Path]:
    return sorted(pipeline.wal.directory.glob("*.wal"))


async def write_and_wait_for_ack(pipeline: Pipeline, seqs: range, size: int = 4096) -> list[int]:
    stream = pipeline.streams["d"]
    acked: list[int] = []
    stream.listeners[object()] = lambda disk, seq: acked.append(seq)
    for seq in seqs:
        assert pipeline.accept_write(stream, Write.make(1, seq, size * (seq - 1), bytes([seq % 256]) * size, seq))
    await wait_for(lambda: acked and acked[-1] == seqs[-1], f"the ack of sequence {seqs[-1]}")
    return acked


async def stored_writes(pipeline: Pipeline) -> dict[int, bytes]:
    """Every write record in the cache store, by sequence."""
    found: dict[int, bytes] = {}
    for name in await pipeline.store.list_blobs():
        header, records = open_blob(await pipeline.store.get(name), keys, name=name)
        for record in iter_records(records, header, name=name):
            assert isinstance(record, WriteRecord)
            assert record.seq not in found, f"sequence {record.seq} stored twice"
            found[record.seq] = bytes(record.data)
    return found


# ---------------------------------------------------------------- the format


@given(st.lists(st.tuples(st.sampled_from(["a", "disk-2", "ü"]), st.lists(st.binary(max_size=300), min_size=1,
                                                                              max_size=5)), min_size=1, max_size=4),
       st.integers(min_value=0, max_value=2000))
def test_a_chunk_reads_back_whole_or_not_at_all(sections: list[tuple[str, list[bytes]]], cut: int) -> None:
    pieces: list[bytes | memoryview] = []
    expected = []
    for i, (disk, bodies) in enumerate(sections):
        first = 100 * i + 1
        records = b"".join(write_record_header(first + j, j, 512 * j, len(body)) + body for j, body in enumerate(bodies))
        pieces += [section_header(disk, 1 << 20, first, first + len(bodies) - 1, len(bodies), len(records)), records]
        expected.append((disk, first, first + len(bodies) - 1, records))
    chunk = sealed_chunk(7, pieces)
    read = read_chunk(b"junk" + chunk, 4, keys)
    assert read is not None and read.number == 7 and read.size == len(chunk)
    assert [(s.disk, s.first_seq, s.last_seq, bytes(s.records)) for s in read.sections] == expected
    torn = chunk[:cut % len(chunk)]  # a write cut short by a crash: the log ends there
    assert read_chunk(torn, 0, keys) is None


def section(bodies: list[bytes]) -> list[bytes | memoryview]:
    """Disk "d"'s section of write records 1.. with ``bodies``, as the pipeline hands it to the log."""
    records = [write_record_header(1 + i, 0, 0, len(body)) for i, body in enumerate(bodies)]
    size = sum(map(len, bodies)) + sum(map(len, records))
    return [section_header("d", 1 << 30, 1, len(bodies), len(bodies), size),
            *(piece for pair in zip(records, bodies) for piece in pair)]


def test_a_chunk_larger_than_the_stream_buffer_reads_back() -> None:
    """Pieces that straddle the sealer's buffer, one larger than it, and a buffer filled exactly."""
    straddling = section([os.urandom(700 * 1024), os.urandom(STREAM_BUFFER * 5 // 2), os.urandom(1000)])
    exact_fill = STREAM_BUFFER - SECTION_HEADER.size - len("d") - RECORD_HEADER.size
    for pieces in (straddling, section([os.urandom(exact_fill)])):
        chunk = sealed_chunk(3, pieces)
        read = read_chunk(chunk, 0, keys)
        assert read is not None and read.size == len(chunk)
        assert bytes(read.sections[0].records) == b"".join(pieces[1:])


def test_an_altered_chunk_ends_the_log_and_a_foreign_key_is_named() -> None:
    chunk = bytearray(sealed_chunk(1, [section_header("d", 4096, 1, 1, 1, 0)]))
    chunk[CHUNK_HEADER.size + 3] ^= 1
    assert read_chunk(chunk, 0, keys) is None, "a chunk failing its tag was never acknowledged"
    foreign = sealed_chunk(1, [b""], OTHER_KEY)
    with pytest.raises(LogBlobError, match=key_id_of(OTHER_KEY).hex()) as info:
        read_chunk(foreign, 0, keys)
    assert OTHER_KEY.hex() not in str(info.value) and KEY.hex() not in str(info.value)
    assert len(foreign) == CHUNK_HEADER.size + GCM_TAG_SIZE


# ---------------------------------------------------------------- acks and failures


async def test_the_ack_waits_for_the_log_not_for_the_blob(tmp_path: Path) -> None:
    """A spool that cannot write blobs at all still acknowledges: the writes are in the log."""
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=10**9), key=KEY) as pipeline:
        await write_and_wait_for_ack(pipeline, range(1, 11))
        assert pipeline.streams["d"].durable_seq == 10 and await pipeline.store.list_blobs() == []
        assert not list(config.spool_dir.glob("d/*.bflog")), "no blob was written"
        assert pipeline.spool.used_bytes == pipeline.wal.size_bytes > 10 * 4096


async def test_a_full_log_disk_delays_the_ack_until_the_chunk_is_written(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 50})
    async with running_pipeline(config, key=KEY) as pipeline:
        append = pipeline.wal.append
        failures = [OSError(errno.ENOSPC, "No space left on device")] * 2

        def full_then_free(pieces: list[bytes | memoryview], last_seqs: dict[str, int]) -> int:
            if failures:
                raise failures.pop()
            return append(pieces, last_seqs)

        pipeline.wal.append = full_then_free  # type: ignore[method-assign]
        stream = pipeline.streams["d"]
        acked: list[int] = []
        stream.listeners[object()] = lambda disk, seq: acked.append(seq)
        for seq in (1, 2):
            assert pipeline.accept_write(stream, Write.make(1, seq, 512 * seq, bytes([seq]) * 512, 0))
        await asyncio.sleep(0.03)
        assert acked == [] and stream.durable_seq == 0, "nothing may be acknowledged before it is logged"
        await wait_for(lambda: acked, "the ack after the disk has room again")
        assert acked == [2] and pipeline.stats.spool_errors == 2
        await pipeline.drain()


# ---------------------------------------------------------------- restarts


async def test_acknowledged_writes_never_sealed_are_replayed_after_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=10**9), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 41))
    # the first run stopped with everything acknowledged and nothing sealed (as a kill -9 would leave it)
    async with running_pipeline(config, key=KEY) as second:
        assert second.streams["d"].durable_seq == 40, "the agent resumes after what was acknowledged"
        await second.drain()
        assert await stored_writes(second) == {seq: bytes([seq]) * 4096 for seq in range(1, 41)}
        await wait_for(lambda: not segments(second), "the replayed log's release once stored")
        assert second.spool.used_bytes == 0


async def test_a_restart_replays_only_what_the_spool_and_store_do_not_hold(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 11))
        await first.drain()  # 1..10 stored
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=10**9), key=KEY) as second:
        await write_and_wait_for_ack(second, range(11, 21))  # logged only
    async with running_pipeline(config, key=KEY) as third:
        assert third.streams["d"].durable_seq == 20
        await third.drain()
        assert await stored_writes(third) == {seq: bytes([seq]) * 4096 for seq in range(1, 21)}


async def test_a_torn_chunk_at_the_end_of_the_log_is_cut_off(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=10**9), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 6))
        [segment] = segments(first)
    whole = segment.stat().st_size
    torn = sealed_chunk(99, [b"x" * 5000])[:3000]
    segment.write_bytes(segment.read_bytes() + torn)  # the crash came in the middle of the next chunk's write
    with caplog.at_level(logging.WARNING, logger="engine.wal"):
        async with running_pipeline(config, key=KEY) as second:
            assert second.streams["d"].durable_seq == 5
            assert segment.stat().st_size == whole, "the torn tail is cut off"
            await second.drain()
            assert sorted(await stored_writes(second)) == [1, 2, 3, 4, 5]
    assert "3000 bytes that are not a complete chunk" in caplog.text


async def test_a_log_sealed_under_an_unknown_key_stops_the_start_naming_the_key_id(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=FullSpool(config.spool_dir, 1 << 30, failures=10**9), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 3))
    with pytest.raises(LogBlobError, match=key_id_of(KEY).hex()) as info:
        async with running_pipeline(config, key=OTHER_KEY):
            pass
    assert KEY.hex() not in str(info.value)


async def test_segments_roll_and_go_once_their_writes_are_stored(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.wal, "SEGMENT_BYTES", 64 * 1024)
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY, disk_size=64 << 20) as pipeline:
        for start in range(1, 400, 40):  # 16 chunks of ~160 KiB: each closes its segment
            await write_and_wait_for_ack(pipeline, range(start, start + 40))
        await pipeline.drain()
        # a blob may be stored before the commit that closes its segment: the next upload releases that one
        await write_and_wait_for_ack(pipeline, range(401, 402))
        await pipeline.drain()
        await wait_for(lambda: len(segments(pipeline)) <= 1 and pipeline.spool.used_bytes == pipeline.wal.size_bytes,
                       "closed segments (and the sealed blobs) released once stored")
        assert pipeline.wal.size_bytes < 64 * 1024 + 200 * 1024, "at most the open segment is left"
        assert sorted(await stored_writes(pipeline)) == list(range(1, 402))
