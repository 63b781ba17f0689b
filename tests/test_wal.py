"""The spool's write-ahead log: acks follow it, restarts replay it, uploads let it go."""

from __future__ import annotations

import asyncio
import errno
import gc
import itertools
import logging
import os
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import make_config, running_pipeline, wait_for
from test_spool_recovery import FullSpool

import engine.pipeline
import engine.spool
import engine.wal
from engine.config import Config
from engine.disks import DiskInfo
from engine.monitor import Monitor
from engine.pipeline import Batch, DiskStream, LoggedRecords, Pipeline
from engine.spool import Spool
from engine.store import LocalStore
from engine.store.base import StoreError
from engine.wal import ChunkPlace, LogRange, WriteAheadLog
from protocol import LogBlobError, RemoteProtocolError, Tag, TagKind, Write
from protocol.logblob import (
    GCM_TAG_SIZE,
    RECORD_HEADER,
    BlobHeader,
    Sealer,
    WriteRecord,
    blob_name,
    iter_records,
    key_id_of,
    open_blob,
    parse_blob_name,
    write_record_header,
)
from protocol.wal import (
    CHUNK_HEADER,
    SECTION_HEADER,
    STREAM_BUFFER,
    WalSealer,
    check_read_back,
    headers_crc,
    read_chunk,
    section_header,
)

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


@given(st.lists(st.binary(max_size=5000), min_size=1, max_size=6), st.data())
def test_records_read_back_from_any_offset_of_a_chunk(bodies: list[bytes], data: st.DataObject) -> None:
    """What the pipeline reads back for a sealed batch: any run of a chunk's records, by offset."""
    pieces = section(bodies)
    plain = b"".join(pieces)
    nonce = os.urandom(12)
    sealer = WalSealer(KEY)
    chunk = b"".join(bytes(view) for view in sealer.seal(3, pieces, nonce))
    start = data.draw(st.integers(0, len(plain)))
    end = data.draw(st.integers(start, len(plain)))
    ciphertext = chunk[CHUNK_HEADER.size + start:CHUNK_HEADER.size + end]
    out = bytearray(len(ciphertext))
    sealer.open_range_into(nonce, start, ciphertext, memoryview(out))
    assert out == plain[start:end]


def test_records_read_back_are_checked_and_a_bad_one_is_named() -> None:
    bodies = [bytes([i]) * 600 for i in range(1, 4)]
    records = b"".join(write_record_header(5 + i, 0, 0, len(body)) + body for i, body in enumerate(bodies))
    crcs = [zlib.crc32(body) for body in bodies]
    headers = headers_crc(write_record_header(5 + i, 0, 0, len(body)) for i, body in enumerate(bodies))
    check_read_back(records, "d", 5, crcs, headers)
    damaged = bytearray(records)
    damaged[-1] ^= 1
    with pytest.raises(LogBlobError, match="sequence 7 read back from the write-ahead log fails its CRC-32") as info:
        check_read_back(damaged, "d", 5, crcs, headers)
    assert info.value.disk == "d"
    damaged = bytearray(records)
    damaged[RECORD_HEADER.size - 5] ^= 1  # write 5's offset
    with pytest.raises(LogBlobError, match="sequences 5-7 .* record headers fail their CRC-32"):
        check_read_back(damaged, "d", 5, crcs, headers)
    with pytest.raises(LogBlobError, match="3 records ending at sequence 7"):
        check_read_back(records, "d", 5, crcs[:2], headers)
    with pytest.raises(LogBlobError, match="out of bounds or out of order"):
        check_read_back(records, "d", 4, [None, *crcs], headers)


def section(bodies: list[bytes]) -> list[bytes | memoryview]:
    """Disk "d"'s section of write records 1.. with ``bodies``, as the pipeline hands it to the log."""
    records = [write_record_header(1 + i, 0, 0, len(body)) for i, body in enumerate(bodies)]
    size = sum(map(len, bodies)) + sum(map(len, records))
    return [section_header("d", 1 << 30, 1, len(bodies), len(bodies), size),
            *(piece for pair in zip(records, bodies) for piece in pair)]


def record_log_io(monkeypatch: pytest.MonkeyPatch, *, refuse_synced_writes: bool = False) -> list[str]:
    """The log's pwritev and fdatasync calls, in order ("pwritev+dsync": a write synced in the same call);
    with ``refuse_synced_writes`` the flag fails as on a kernel before 4.7 (nothing written)."""
    calls: list[str] = []
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync

    def pwritev(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags and refuse_synced_writes:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        calls.append("pwritev+dsync" if flags & os.RWF_DSYNC else "pwritev")
        return real_pwritev(fd, buffers, offset, flags)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(engine.wal.os, "pwritev", pwritev)
    monkeypatch.setattr(engine.wal.os, "fdatasync", fdatasync)
    return calls


def assert_replays(directory: Path, appended: list[list[bytes | memoryview]]) -> None:
    """A new log over ``directory`` replays exactly the records of the ``appended`` sections, in order."""
    replayed = WriteAheadLog(directory, WalSealer(KEY)).replay(keys, {})
    assert [bytes(s.records) for s in replayed] == [b"".join(pieces[1:]) for pieces in appended]


class StalledLog(WriteAheadLog):
    """A real log whose first append waits for the test: what is logged meanwhile queues for the next commit."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, WalSealer(KEY))
        self.release = threading.Event()
        self.appends = 0

    def append(self, pieces: list[bytes | memoryview], last_seqs: dict[str, int]) -> tuple[int, ChunkPlace]:
        self.appends += 1
        if self.appends == 1:
            self.release.wait(10)
        return super().append(pieces, last_seqs)


async def test_the_committer_commits_every_record_once_and_in_order_behind_a_stalled_commit(tmp_path: Path) -> None:
    """The event loop logs records while the commit thread is busy: each must reach exactly one chunk, each
    disk's in sequence order, and a commit must hold a disk's records first to last."""
    wal = StalledLog(tmp_path / "wal")
    commits: list[list[tuple[str, int, int, int]]] = []
    committer = engine.wal.GroupCommitter(
        wal, asyncio.get_running_loop(),
        lambda logged, *_: commits.append([(e.disk, e.first_seq, e.last_seq, e.records) for e in logged]),
        lambda exc, retry_s: None, retry_delays=lambda: itertools.repeat(0.01))

    def log(disk: str, seq: int) -> None:
        pieces = [write_record_header(seq, 0, 0, 512), bytes([seq % 256]) * 512]
        committer.log(disk, 1 << 20, seq, pieces, 512)

    log("a", 1)
    await wait_for(lambda: wal.appends == 1, "the first commit's append")
    for seq in range(2, 301):  # all while that commit is stalled, in bursts the commit thread may cut anywhere
        log("a", seq)
        log("b", seq - 1)
        if seq % 50 == 0:
            wal.release.set()
            await asyncio.sleep(0.001)
    await wait_for(lambda: sum(records for commit in commits for *_, records in commit) == 300 + 299,
                   "every record committed")
    await asyncio.to_thread(committer.close)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for commit in commits:
        assert len({disk for disk, *_ in commit}) == len(commit), "one entry per disk in a commit"
        for disk, first, last, records in commit:
            assert records == last - first + 1
            seen[disk] += range(first, last + 1)
    assert seen == {"a": list(range(1, 301)), "b": list(range(1, 300))}
    replayed: dict[str, list[int]] = {"a": [], "b": []}
    for sec in WriteAheadLog(tmp_path / "wal", WalSealer(KEY)).replay(keys, {}):
        replayed[sec.disk] += range(sec.first_seq, sec.last_seq + 1)
    assert replayed == seen


def test_a_chunk_larger_than_the_stream_buffer_reads_back() -> None:
    """Pieces that straddle the sealer's buffer, one larger than it, and a buffer filled exactly."""
    straddling = section([os.urandom(700 * 1024), os.urandom(STREAM_BUFFER * 5 // 2), os.urandom(1000)])
    exact_fill = STREAM_BUFFER - SECTION_HEADER.size - len("d") - RECORD_HEADER.size
    for pieces in (straddling, section([os.urandom(exact_fill)])):
        chunk = sealed_chunk(3, pieces)
        read = read_chunk(chunk, 0, keys)
        assert read is not None and read.size == len(chunk)
        assert bytes(read.sections[0].records) == b"".join(pieces[1:])


def test_a_chunk_up_to_the_stream_buffer_is_one_view_header_included() -> None:
    """One view is one write call for the committer, and each call costs it a GIL hand-over."""
    exact_fill = STREAM_BUFFER - SECTION_HEADER.size - len("d") - RECORD_HEADER.size
    sealer = WalSealer(KEY)
    assert len(list(sealer.seal(1, section([os.urandom(exact_fill)]), os.urandom(12)))) == 1
    assert len(list(sealer.seal(2, section([os.urandom(exact_fill + 1)]), os.urandom(12)))) == 2


def test_a_small_commit_is_one_synced_write_and_a_large_one_ends_with_an_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_log_io(monkeypatch)
    wal = WriteAheadLog(tmp_path / "wal", WalSealer(KEY))
    small, large = section([os.urandom(64 * 1024)]), section([os.urandom(STREAM_BUFFER * 2)])
    wal.append(small, {"d": 1})
    assert calls == ["pwritev+dsync"]
    calls.clear()
    wal.append(large, {"d": 1})
    assert calls == ["pwritev"] * 3 + ["fdatasync"]
    wal.close()
    assert_replays(tmp_path / "wal", [small, large])


@pytest.mark.parametrize("failing", ["pwritev", "fdatasync"])
def test_a_failed_append_cuts_its_segment_back_and_the_next_one_starts_a_new_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """EIO after the bytes reached the file, from the one-call synced write (a small chunk) or from the
    fdatasync that ends a large one: the torn chunk must not stay in the segment, and the retry goes to
    a new one."""
    real = getattr(os, failing)
    failures = [OSError(errno.EIO, "Input/output error")]

    def failing_once(*args: object) -> object:
        result = real(*args)
        if failures and (failing == "fdatasync" or args[-1] & os.RWF_DSYNC):
            raise failures.pop()
        return result

    wal = WriteAheadLog(tmp_path / "wal", WalSealer(KEY))
    kept = section([os.urandom(1000)])
    wal.append(kept, {"d": 1})
    [first] = sorted((tmp_path / "wal").glob("*.wal"))
    size_before = first.stat().st_size
    monkeypatch.setattr(engine.wal.os, failing, failing_once)
    retried = section([os.urandom(64 * 1024 if failing == "pwritev" else STREAM_BUFFER * 2)])
    with pytest.raises(OSError, match="Input/output error"):
        wal.append(retried, {"d": 2})
    assert first.stat().st_size == size_before, "the torn chunk was cut off"
    wal.append(retried, {"d": 2})
    wal.close()
    assert len(list((tmp_path / "wal").glob("*.wal"))) == 2
    assert_replays(tmp_path / "wal", [kept, retried])


def test_a_kernel_without_synced_writes_gets_a_write_and_an_fdatasync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = record_log_io(monkeypatch, refuse_synced_writes=True)
    wal = WriteAheadLog(tmp_path / "wal", WalSealer(KEY))
    chunks = [section([os.urandom(4096)]), section([os.urandom(5000)])]
    with caplog.at_level(logging.WARNING, logger="engine.wal"):
        for seq, pieces in enumerate(chunks, 1):
            wal.append(pieces, {"d": seq})
    assert calls == ["pwritev", "fdatasync"] * 2
    assert caplog.text.count("RWF_DSYNC") == 1, "said once"
    wal.close()
    assert_replays(tmp_path / "wal", chunks)


def filled_and_released(directory: Path) -> tuple[WriteAheadLog, int]:
    """A log whose first segment (256 KiB) was filled by three chunks, closed and released: the file
    is kept for recycling. Returns the log and the file's inode."""
    wal = WriteAheadLog(directory, WalSealer(KEY), segment_bytes=256 * 1024)
    for _ in range(3):
        wal.append(section([os.urandom(100 * 1024)]), {"d": 1})
    [segment] = directory.glob("*.wal")
    inode = segment.stat().st_ino
    assert wal.release({"d": 1}) > 256 * 1024
    assert not list(directory.glob("*.wal")) and len(list(directory.glob("*.free"))) == 1
    return wal, inode


def test_a_released_segment_is_written_over_and_only_its_new_chunks_replay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Writing over a released segment allocates no blocks; the chunks it held before (valid, sealed
    with the same key) lie beyond the new ones and must not come back, nor alarm anyone."""
    wal, inode = filled_and_released(tmp_path / "wal")
    new = section([os.urandom(1000)])
    wal.append(new, {"d": 2})
    wal.close()
    [segment] = (tmp_path / "wal").glob("*.wal")
    assert segment.stat().st_ino == inode, "the released file was reused"
    assert segment.stat().st_size > 300 * 1024, "its old chunks are still there, beyond the new one"
    with caplog.at_level(logging.DEBUG, logger="engine.wal"):
        assert_replays(tmp_path / "wal", [new])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_at_most_two_released_segments_are_kept_and_only_full_ones(tmp_path: Path) -> None:
    """Kept files lie outside the spool's budget (docs/operations.md says two at most); a short segment
    (closed by a failed append or a stop) is not worth keeping."""
    wal = WriteAheadLog(tmp_path / "wal", WalSealer(KEY), segment_bytes=256 * 1024)
    for seq in range(1, 10):  # three full segments of three chunks each
        wal.append(section([os.urandom(100 * 1024)]), {"d": seq})
    wal.append(section([os.urandom(1000)]), {"d": 10})
    wal.close()  # the fourth segment closes short
    assert len(list((tmp_path / "wal").glob("*.wal"))) == 4
    wal.release({"d": 10})
    kept = list((tmp_path / "wal").glob("*.free"))
    assert len(kept) == 2 and all(path.stat().st_size > 256 * 1024 for path in kept)
    assert not list((tmp_path / "wal").glob("*.wal"))


class Killed(BaseException):
    """What a kill -9 leaves: nothing after this point runs, not even the append's clean-up."""


def test_a_recycled_segment_a_kill_left_unwritten_holds_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between renaming a released file into the log and its first write, the segment holds
    only old chunks, and no segment before it says how old: its name does."""
    wal, _ = filled_and_released(tmp_path / "wal")

    def killed(*args: object) -> int:
        raise Killed

    monkeypatch.setattr(engine.wal.os, "pwritev", killed)
    with pytest.raises(Killed):
        wal.append(section([os.urandom(1000)]), {"d": 2})
    monkeypatch.undo()
    assert len(list((tmp_path / "wal").glob("*.wal"))) == 1
    assert_replays(tmp_path / "wal", [])


def test_a_previous_runs_recycled_files_are_deleted_at_start(tmp_path: Path) -> None:
    """What a run kept to write over is known to that run only (after a restart chunk numbers continue
    from what the segments hold, not from a kept file's): the next start deletes it, or it would take
    disk space beside the spool's budget for ever."""
    wal, _ = filled_and_released(tmp_path / "wal")
    wal.close()
    restarted = WriteAheadLog(tmp_path / "wal", WalSealer(KEY), segment_bytes=256 * 1024)
    assert restarted.replay(keys, {}) == []
    assert not list((tmp_path / "wal").glob("*.free"))


def test_old_chunks_under_a_retired_key_end_a_recycled_segment_without_an_error(tmp_path: Path) -> None:
    """A segment sealed under the previous key, replayed after a key rotation, released and written
    over: once that key is retired its old chunks beyond the new ones cannot be opened, and need not
    be — their numbers say they are old. Reading them stopped the start."""
    directory = tmp_path / "wal"
    before_rotation = WriteAheadLog(directory, WalSealer(OTHER_KEY), segment_bytes=256 * 1024)
    for _ in range(3):
        before_rotation.append(section([os.urandom(100 * 1024)]), {"d": 1})
    before_rotation.close()

    def both(key_id: bytes) -> bytes | None:
        return {key_id_of(KEY): KEY, key_id_of(OTHER_KEY): OTHER_KEY}.get(key_id)

    after_rotation = WriteAheadLog(directory, WalSealer(KEY), segment_bytes=256 * 1024)
    assert len(after_rotation.replay(both, {})) == 3
    after_rotation.release({"d": 1})
    new = section([os.urandom(1000)])
    after_rotation.append(new, {"d": 2})
    after_rotation.close()
    assert_replays(directory, [new])  # the old key retired: not in the ring any more


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
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as pipeline:
        await write_and_wait_for_ack(pipeline, range(1, 11))
        assert pipeline.streams["d"].durable_seq == 10 and await pipeline.store.list_blobs() == []
        assert not list(config.spool_dir.glob("d/*.bflog")), "no blob was written"
        assert pipeline.spool.used_bytes == pipeline.wal.size_bytes > 10 * 4096


async def test_a_full_log_disk_delays_the_ack_until_the_chunk_is_written(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 50})
    async with running_pipeline(config, key=KEY) as pipeline:
        append = pipeline.wal.append
        failures = [OSError(errno.ENOSPC, "No space left on device")] * 2

        def full_then_free(pieces: list[bytes | memoryview], last_seqs: dict[str, int]) -> tuple[int, ChunkPlace]:
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


def hold_log_commits(pipeline: Pipeline) -> threading.Event:
    """Log commits wait (in the committer thread) until the returned event is set."""
    append = pipeline.wal.append
    release = threading.Event()

    def held(pieces: list[bytes | memoryview], last_seqs: dict[str, int]) -> tuple[int, ChunkPlace]:
        release.wait(10)
        return append(pieces, last_seqs)

    pipeline.wal.append = held  # type: ignore[method-assign]
    return release


async def first_blob_waiting_for_the_log(pipeline: Pipeline) -> tuple[DiskStream, threading.Event]:
    """Write 1 of disk "d" sealed and spooled while its log commit is held; set the event to let it go."""
    release = hold_log_commits(pipeline)
    stream = pipeline.streams["d"]
    assert pipeline.accept_write(stream, Write.make(1, 1, 0, bytes(4096), 0))
    await wait_for(lambda: stream.sealing and stream.sealing[0].sealed, "the first blob sealed and spooled")
    return stream, release


async def test_a_blob_goes_to_the_store_only_once_the_log_holds_its_records(tmp_path: Path) -> None:
    """Spool blobs are not fsynced: a blob in the store ahead of the log could, after a power loss, hold
    writes never acknowledged under sequence numbers the agent then reuses for other writes."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 1})
    async with running_pipeline(config, key=KEY) as pipeline:
        stream, release = await first_blob_waiting_for_the_log(pipeline)
        await asyncio.sleep(0.1)
        assert await pipeline.store.list_blobs() == [] and stream.durable_seq == 0
        release.set()
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 1)]


async def test_a_linger_expiring_while_a_blob_waits_for_the_log_still_cuts_the_batch(tmp_path: Path) -> None:
    """A sealed blob waiting for its log commit is not a seal in flight: the next batch's linger must
    cut it, or it would wait (acknowledged, never stored, and holding the log) for the next write."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 20})
    async with running_pipeline(config, key=KEY) as pipeline:
        stream, release = await first_blob_waiting_for_the_log(pipeline)
        assert pipeline.accept_write(stream, Write.make(1, 2, 4096, bytes(4096), 0))
        await asyncio.sleep(0.1)  # the second batch's linger expires while the first waits for the log
        release.set()
        await wait_for(lambda: stream.uploaded_seq == 2, "both writes stored without another write or a drain")


async def test_a_batch_below_min_bytes_waits_past_its_linger_and_goes_once_it_reaches_them(tmp_path: Path) -> None:
    """1000 slow disks (~0.2 MB/s each) cut at the linger made blobs of 80-180 KB, each a file, a sync and
    an apply group: a small batch waits for more, and goes as soon as it has enough."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 200, "min_bytes": 64 * 1024,
                                                   "min_bytes_wait_ms": 800})
    async with running_pipeline(config, key=KEY) as pipeline:
        stream = pipeline.streams["d"]
        await write_and_wait_for_ack(pipeline, range(1, 3), size=8192)
        await asyncio.sleep(0.3)  # past its linger, well before its wait
        assert stream.open_batch is not None and stream.open_batch.overdue
        assert not stream.sealing and not stream.uploading
        await write_and_wait_for_ack(pipeline, range(3, 9), size=8192)  # 64 KiB in all: cut at once
        assert stream.open_batch is None
        await wait_for(lambda: stream.uploaded_seq == 8, "the batch stored")
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 8)]


@pytest.mark.parametrize(("linger_ms", "wait_ms", "cut_after_s"),
                         [(100, 400, (0.35, 2.0)), (100, 50, (0.08, 0.35)), (0, 400, (0.0, 0.3))],
                         ids=["waits-min_bytes_wait_ms", "a-wait-below-the-linger-waits-the-linger",
                              "linger-0-cuts-at-once"])
async def test_a_batch_that_stays_below_min_bytes_is_cut_after_min_bytes_wait_ms(
        tmp_path: Path, linger_ms: int, wait_ms: int, cut_after_s: tuple[float, float]) -> None:
    config = make_config(tmp_path / "data", batch={"linger_ms": linger_ms, "min_bytes": 64 * 1024,
                                                   "min_bytes_wait_ms": wait_ms})
    async with running_pipeline(config, key=KEY) as pipeline:
        stream = pipeline.streams["d"]
        started = time.monotonic()
        await write_and_wait_for_ack(pipeline, range(1, 3), size=8192)
        await wait_for(lambda: stream.sealing or stream.uploading or stream.uploaded_seq, "the batch cut")
        low, high = cut_after_s
        assert low <= time.monotonic() - started < high
        await wait_for(lambda: stream.uploaded_seq == 2, "the batch stored")


@pytest.fixture
def log_backed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch refers to the log, however little memory the pipeline holds."""
    monkeypatch.setattr(engine.pipeline, "LOG_BACKED_SHARE", 0)


async def test_an_open_batch_keeps_its_records_while_memory_is_plentiful(tmp_path: Path) -> None:
    """Reading back costs CPU and ack latency (at 10 agents and 150 MB/s, 12 % more CPU per GB): only
    a batch opened under memory pressure refers to the log."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000})
    async with running_pipeline(config, key=KEY) as pipeline:
        await write_and_wait_for_ack(pipeline, range(1, 21))
        batch = pipeline.streams["d"].open_batch
        assert batch is not None and not batch.log_backed and not batch.logged
        assert len(batch.records) == 20 and pipeline.inflight_bytes == batch.memory_bytes == 20 * 4096


async def test_an_open_batch_leaves_what_the_log_holds_to_the_log(log_backed: None, tmp_path: Path) -> None:
    """Once committed, an open batch's records are read back from the log when it is sealed, not held:
    with 1000 disks lingering, held payload filled the in-flight budget and cut every batch small."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000})
    async with running_pipeline(config, key=KEY) as pipeline:
        await write_and_wait_for_ack(pipeline, range(1, 21))
        await write_and_wait_for_ack(pipeline, range(21, 41))
        batch = pipeline.streams["d"].open_batch
        assert batch is not None and not batch.records and batch.payload_bytes == 40 * 4096
        assert pipeline.inflight_bytes == 0 and batch.memory_bytes == 0, "the payload is no longer in memory"
        runs = [(part.first_seq, part.last_seq) for part in batch.logged]  # one per commit
        assert runs[0][0] == 1 and runs[-1][1] == 40 and all(a[1] + 1 == b[0] for a, b in itertools.pairwise(runs))
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 40)]
        assert await stored_writes(pipeline) == {seq: bytes([seq % 256]) * 4096 for seq in range(1, 41)}


async def test_a_seal_thread_gathers_each_batch_afresh_in_the_buffer_it_reuses(log_backed: None, tmp_path: Path) -> None:
    """One seal thread gathers every batch into the same buffer: a small batch after a large one that did
    not compress (stored as gathered) must hold its own records only, not the large one's tail."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000}, pipeline={"seal_threads": 1})
    written = {seq: os.urandom(4096) for seq in range(1, 17)} | {seq: bytes([seq]) * 4096 for seq in (17, 18)}
    async with running_pipeline(config, key=KEY) as pipeline:
        stream = pipeline.streams.get("d") or pipeline.stream(DiskInfo("d", "agent-1", 1 << 20, 4096))
        for first, last in ((1, 16), (17, 18)):
            for seq in range(first, last + 1):
                assert pipeline.accept_write(stream, Write.make(1, seq, 4096 * (seq - 1), written[seq], seq))
            await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("d", 1, 16), blob_name("d", 17, 18)]
        assert await stored_writes(pipeline) == written


def flip(path: Path, at: int, mask: int = 0x40) -> None:
    """Flip bits of one byte of a file in place (the page cache: what a read-back sees)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ mask]), at)
    finally:
        os.close(fd)


async def logged_run(pipeline: Pipeline, seqs: range) -> LoggedRecords:
    """Write ``seqs`` of disk "d" (4 KiB each, committed in one go) and return their place in the log."""
    release = hold_log_commits(pipeline)  # one commit for all of them
    stream = pipeline.streams["d"]
    for seq in seqs:
        assert pipeline.accept_write(stream, Write.make(1, seq, 4096 * (seq - 1), bytes([seq % 256]) * 4096, seq))
    release.set()
    await wait_for(lambda: stream.durable_seq == seqs[-1], "the commit")
    assert stream.open_batch is not None and len(stream.open_batch.logged) == 1
    return stream.open_batch.logged[0]


async def test_a_record_read_back_damaged_once_is_not_sealed_and_the_seal_is_retried(
        log_backed: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The read-back is not authenticated (the chunk's tag covers other disks' records too), so each write
    is checked against the agent's CRC-32: damage is named, never sealed into a blob, and the seal retried."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000}, upload={"retry_initial_ms": 500})
    async with running_pipeline(config, key=KEY) as pipeline:
        place = (await logged_run(pipeline, range(1, 4))).place
        at = place.file_offset + place.length - 1  # the last byte of write 3
        flip(place.path, at)
        drained = asyncio.create_task(pipeline.drain())
        await wait_for(lambda: pipeline.stats.spool_errors, "the seal failing")
        assert await pipeline.store.list_blobs() == [] and not drained.done()
        flip(place.path, at)  # the next attempt reads it as it was logged
        await asyncio.wait_for(drained, 10)
        assert pipeline.stats.spool_errors == 1 and pipeline.streams["d"].log_failure is None
        assert "cannot seal blob d/" in caplog.text
        assert "sequence 3 read back from the write-ahead log fails its CRC-32" in caplog.text
        assert f"(sequences 1-3, {place.length} bytes at offset {place.file_offset} of {place.path})" in caplog.text
        assert await stored_writes(pipeline) == {seq: bytes([seq % 256]) * 4096 for seq in range(1, 4)}


async def test_a_damaged_record_header_is_caught_too(log_backed: None, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Counter mode passes a damaged bit through as exactly that bit: a write's offset must not change
    unnoticed (it would be applied elsewhere on the replica)."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000}, upload={"retry_initial_ms": 500})
    async with running_pipeline(config, key=KEY) as pipeline:
        place = (await logged_run(pipeline, range(1, 4))).place
        offset_field = place.file_offset + RECORD_HEADER.size + 4096 + 20  # write 2's offset
        flip(place.path, offset_field, 0x10)
        drained = asyncio.create_task(pipeline.drain())
        await wait_for(lambda: pipeline.stats.spool_errors, "the seal failing")
        flip(place.path, offset_field, 0x10)
        await asyncio.wait_for(drained, 10)
        assert "sequences 1-3 read back from the write-ahead log: their record headers fail their CRC-32" in caplog.text
        header, records = open_blob(await pipeline.store.get(blob_name("d", 1, 3)), keys)
        assert [r.offset for r in iter_records(records, header) if isinstance(r, WriteRecord)] == [0, 4096, 8192]


async def test_a_read_back_that_fails_for_a_while_is_retried_without_stopping_the_disk(
        log_backed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (1000 agents' sockets count too) or a passing I/O error is not damage: retried
    like a spool write, for as long as it takes."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000}, upload={"retry_initial_ms": 1})
    async with running_pipeline(config, key=KEY) as pipeline:
        await logged_run(pipeline, range(1, 4))
        read_into = pipeline.wal.read_into
        failures = [OSError(errno.EMFILE, "Too many open files")] * (2 * engine.pipeline.READ_BACK_ATTEMPTS)

        def failing_for_a_while(logged: LogRange, out: memoryview) -> None:
            if failures:
                raise failures.pop()
            read_into(logged, out)

        monkeypatch.setattr(pipeline.wal, "read_into", failing_for_a_while)
        await asyncio.wait_for(pipeline.drain(), 10)
        assert pipeline.streams["d"].log_failure is None
        assert pipeline.stats.spool_errors == 2 * engine.pipeline.READ_BACK_ATTEMPTS
        assert sorted(await stored_writes(pipeline)) == [1, 2, 3]


async def test_a_log_that_stays_damaged_stops_its_disk_only(log_backed: None, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Retrying for good would keep the disk's later blobs and log segments until the spool filled and
    ingest paused for every disk: the disk is stopped, named in /healthz, and the others go on."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000}, upload={"retry_initial_ms": 20})
    async with running_pipeline(config, key=KEY) as pipeline:
        place = (await logged_run(pipeline, range(1, 4))).place
        flip(place.path, place.file_offset + 10)  # inside write 1's header
        other = pipeline.stream(DiskInfo("e", "agent-1", 1 << 20, 4096))
        await pipeline.drain()  # d's batch gives up; nothing of it is stored
        stream = pipeline.streams["d"]
        assert stream.log_failure is not None and "from sequence 1" in stream.log_failure
        assert pipeline.stats.spool_errors == engine.pipeline.READ_BACK_ATTEMPTS
        assert "disk 'd': its write-ahead log cannot be read back from sequence 1" in caplog.text
        with pytest.raises(RemoteProtocolError, match="replication of this disk stopped") as refused:
            pipeline.accept_write(stream, Write.make(1, 4, 0, bytes(4096), 4))
        assert (refused.value.disk, refused.value.seq) == ("d", 4)
        assert pipeline.accept_write(other, Write.make(1, 1, 0, bytes(4096), 1))
        await pipeline.drain()
        assert await pipeline.store.list_blobs() == [blob_name("e", 1, 1)]
        healthy, reasons = Monitor(config, pipeline, None).healthy()
        assert not healthy and reasons[0].startswith("disk 'd': the server stopped the disk (its write-ahead log")


async def test_a_spooled_blob_a_kill_left_in_the_page_cache_is_synced_before_it_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sealed and spooled before its log commit finished, then kill -9: the restart finds it whole in the
    page cache and tells the agent it is durable, so it must be on disk first."""
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 3))
        await first.drain()  # 1-2 stored: the blob below continues them
    blob = Spool(config.spool_dir, 1 << 30).path_of(blob_name("d", 3, 4))
    blob.parent.mkdir(parents=True, exist_ok=True)
    records = b"".join(write_record_header(seq, 0, 4096 * (seq - 1), 4096) + bytes([seq]) * 4096 for seq in (3, 4))
    blob.write_bytes(Sealer(KEY).seal(records, BlobHeader("d", 1 << 20, 3, 4, 2, 0, 0), os.urandom(12)))
    synced: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(engine.spool.os, "fdatasync", recording)
    async with running_pipeline(config, key=KEY) as second:
        assert second.streams["d"].durable_seq == 4
        assert str(blob) in synced


# ---------------------------------------------------------------- restarts


def never_spooled(config: Config) -> FullSpool:
    """A spool that never manages to write a blob: everything acknowledged stays in the log only."""
    return FullSpool(config.spool_dir, 1 << 30, failures=10**9)


async def test_acknowledged_writes_never_sealed_are_replayed_after_restarts(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 41))
    # the first run stopped with everything acknowledged and nothing sealed (as a kill -9 would leave it);
    # the second replays it, takes more, and stops again before anything is stored
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as second:
        assert second.streams["d"].durable_seq == 40, "the agent resumes after what was acknowledged"
        await write_and_wait_for_ack(second, range(41, 61))
    async with running_pipeline(config, key=KEY) as third:
        assert third.streams["d"].durable_seq == 60
        await third.drain()
        assert await stored_writes(third) == {seq: bytes([seq]) * 4096 for seq in range(1, 61)}
        await wait_for(lambda: not segments(third), "the replayed log's release once stored")
        assert third.spool.used_bytes == 0


async def test_a_restart_replays_only_what_the_spool_and_store_do_not_hold(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 11))
        await first.drain()  # 1..10 stored
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as second:
        await write_and_wait_for_ack(second, range(11, 21))  # logged only
    async with running_pipeline(config, key=KEY) as third:
        assert third.streams["d"].durable_seq == 20
        await third.drain()
        assert await stored_writes(third) == {seq: bytes([seq]) * 4096 for seq in range(1, 21)}


async def test_an_opened_disk_gets_its_directories_before_its_first_blob(tmp_path: Path) -> None:
    """Made at open, not by the first blob's spool write and upload (slow on a journal-less ext4)."""
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY) as pipeline:
        pipeline.stream(DiskInfo("e", "agent-1", 1 << 20, 4096))
        await wait_for(lambda: (config.spool_dir / "e").is_dir() and (config.store_dir / "e").is_dir(),
                       "disk e's spool and store directories")
        assert not pipeline.streams["e"].sealing and pipeline.streams["e"].open_batch is None


class StoreWithoutDirectories(LocalStore):
    async def make_directory(self, disk: str) -> None:
        raise ValueError(f"no directory for {disk}")


async def test_a_disk_whose_directories_cannot_be_made_is_reported_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, key=KEY, store=StoreWithoutDirectories(config.store_dir)) as pipeline:
        with caplog.at_level(logging.WARNING, logger="engine.pipeline"):
            pipeline.stream(DiskInfo("e", "agent-1", 1 << 20, 4096))
            await wait_for(lambda: "disk 'e': cannot prepare its directories yet: no directory for e" in caplog.text,
                           "the warning")


class StoreDown(LocalStore):
    async def put_files(self, items: list[tuple[str, Path]]) -> None:
        raise StoreError("cache store unreachable")


class HeldStore(LocalStore):
    """Holds its first group until released, and records the size of every group it is given."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.groups: list[int] = []
        self.release = asyncio.Event()

    async def put_files(self, items: list[tuple[str, Path]]) -> None:
        self.groups.append(len(items))
        await self.release.wait()
        await super().put_files(items)


async def test_a_store_that_takes_groups_gets_everything_queued_in_one_round(tmp_path: Path) -> None:
    """At 1000 disks blobs are small and many: the local store syncs a group side by side, so a round of a
    few dozen blobs per upload worker kept it at a third of the ingest."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 1}, upload={"concurrency": 1})
    disks = 300
    store = HeldStore(config.store_dir)
    async with running_pipeline(config, key=KEY, store=store) as pipeline:
        streams = [pipeline.stream(DiskInfo(f"d{i}", "agent-1", 1 << 20, 4096)) for i in range(disks)]
        for stream in streams:
            pipeline.accept_write(stream, Write.make(1, 1, 0, b"x" * 4096, 1))
        await wait_for(lambda: store.groups and store.groups[0] + pipeline._upload_queue.qsize() == disks,
                       "every blob but the held round queued")
        assert disks - store.groups[0] > engine.pipeline.UPLOAD_GROUP
        store.release.set()
        await wait_for(lambda: all(stream.uploaded_seq == 1 for stream in streams), "every blob stored")
        assert len(store.groups) == 2, f"rounds of {store.groups} blobs"
        assert len(await store.list_blobs()) == disks


async def test_a_spool_blob_torn_by_a_crash_is_replayed_from_the_log(tmp_path: Path) -> None:
    """Spool blobs are not fsynced; what a power loss does to one is what this damage does, and the log
    still holds its records because nothing of it reached the store."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 1})
    async with running_pipeline(config, key=KEY, store=StoreDown(config.store_dir)) as first:
        await write_and_wait_for_ack(first, range(1, 21))
        stream = first.streams["d"]
        await wait_for(lambda: stream.open_batch is None and not stream.sealing, "every write in a spooled blob")
    [torn, *_] = sorted((config.spool_dir / "d").glob("*.bflog"))
    data = bytearray(torn.read_bytes())
    data[len(data) // 2] ^= 0xFF
    torn.write_bytes(data)
    async with running_pipeline(config, key=KEY) as second:
        assert second.streams["d"].durable_seq == 20
        await second.drain()
        assert await stored_writes(second) == {seq: bytes([seq]) * 4096 for seq in range(1, 21)}


async def test_tags_and_a_disk_known_only_from_the_log_replay_from_a_shared_chunk(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", batch={"linger_ms": 60_000})  # only tags and drain cut batches
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        d, e = first.streams["d"], first.stream(DiskInfo("e", "agent-1", 1 << 20, 4096))
        acked: list[tuple[str, int]] = []
        for stream in (d, e):
            stream.listeners[object()] = lambda disk, seq: acked.append((disk, seq))
        # in one loop iteration: one commit, one chunk with a section per disk
        first.accept_write(d, Write.make(1, 1, 0, b"d" * 4096, 1))
        first.accept_tag(d, Tag(1, 2, TagKind.APP, "app-1", 2))
        first.accept_write(d, Write.make(1, 3, 4096, b"D" * 4096, 3))
        first.accept_write(e, Write.make(2, 1, 8192, b"e" * 4096, 4))
        await wait_for(lambda: len(acked) == 2, "the acks of both disks")
        assert sorted(acked) == [("d", 3), ("e", 1)], "one commit acknowledged both"
    async with running_pipeline(config, key=KEY) as second:  # registers "d" only
        assert second.streams["d"].durable_seq == 3 and second.streams["e"].durable_seq == 1
        assert second.streams["e"].info.size == 1 << 20, "the log knows the size of a disk it holds"
        await second.drain()
        names = await second.store.list_blobs()
        assert names == [blob_name("d", 1, 2), blob_name("d", 3, 3), blob_name("e", 1, 1)], "a tag ends its blob"
        header, records = open_blob(await second.store.get(names[0]), keys)
        assert [type(r).__name__ for r in iter_records(records, header)] == ["WriteRecord", "TagRecord"]


async def test_a_failed_append_moves_to_a_new_segment_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The synced write fails once after its bytes reached the file (EIO from the flush, as a failing disk
    answers): the chunk is written again to a new segment, the ack waits for that, and a restart reads
    both segments without complaint."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 20})
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        real_pwritev = os.pwritev
        failures = [OSError(errno.EIO, "Input/output error")]

        def failing_once(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
            written = real_pwritev(fd, buffers, offset, flags)
            if failures and flags & os.RWF_DSYNC:
                raise failures.pop()
            return written

        monkeypatch.setattr(engine.wal.os, "pwritev", failing_once)
        await write_and_wait_for_ack(first, range(1, 21))
        assert first.stats.spool_errors == 1
        assert [path.name for path in segments(first)] == [f"{2:020d}.wal"], "the first one, cut back empty, went"
        monkeypatch.setattr(engine.wal.os, "pwritev", real_pwritev)
    assert f"Input/output error: '{config.spool_dir / '.wal' / f'{1:020d}.wal'}'" in caplog.text, "names the segment"
    async with running_pipeline(config, key=KEY) as second:
        assert second.streams["d"].durable_seq == 20
        await second.drain()
        assert sorted(await stored_writes(second)) == list(range(1, 21))


async def test_a_torn_chunk_at_the_end_of_the_log_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 6))
        [segment] = segments(first)
    whole = segment.stat().st_size
    torn = sealed_chunk(99, [b"x" * 5000])[:3000]
    segment.write_bytes(segment.read_bytes() + torn)  # the crash came in the middle of the next chunk's write
    with caplog.at_level(logging.WARNING, logger="engine.wal"):
        async with running_pipeline(config, key=KEY) as second:
            assert second.streams["d"].durable_seq == 5
            await second.drain()
            assert sorted(await stored_writes(second)) == [1, 2, 3, 4, 5]
    assert f"3000 bytes at offset {whole} that are not a complete chunk" in caplog.text


async def test_damage_inside_the_log_is_skipped_to_the_next_chunk_and_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        ends = []
        for start in (1, 4, 7):  # three commits, three chunks
            await write_and_wait_for_ack(first, range(start, start + 3))
            ends.append(first.wal.size_bytes)
        [segment] = segments(first)
    data = bytearray(segment.read_bytes())
    data[ends[0] + 100] ^= 0xFF  # inside the second chunk
    segment.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        async with running_pipeline(config, key=KEY) as second:
            assert second.streams["d"].durable_seq == 3, "nothing after the hole counts"
    assert f"{ends[1] - ends[0]} damaged bytes at offset {ends[0]}" in caplog.text
    assert "continues at sequence 7 after 3" in caplog.text, "the third chunk was found and its gap reported"


async def test_segments_are_kept_until_the_saved_watermark_covers_them(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.pipeline, "SEGMENT_BYTES", 64 * 1024)
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=never_spooled(config), key=KEY, disk_size=64 << 20) as first:
        for start in range(1, 200, 40):  # closes segments, none stored: a release after each must keep them
            await write_and_wait_for_ack(first, range(start, start + 40))
        await asyncio.sleep(0.1)
        assert len(segments(first)) >= 5
    async with running_pipeline(config, key=KEY, disk_size=64 << 20) as second:
        assert second.streams["d"].durable_seq == 200
        await second.drain()
        assert sorted(await stored_writes(second)) == list(range(1, 201))


async def test_a_spool_smaller_than_a_segment_does_not_stall_ingest(tmp_path: Path) -> None:
    """Segments are at most an eighth of the spool, and one closed after its writes were stored is
    released at once: otherwise a full spool would pause ingest with nothing left to free it."""
    config = make_config(tmp_path / "data", batch={"max_bytes": 256 * 1024, "linger_ms": 5},
                         pipeline={"max_inflight_bytes": 1 << 20})
    async with running_pipeline(config, spool=Spool(config.spool_dir, 4 << 20), key=KEY,
                                disk_size=64 << 20) as pipeline:
        stream = pipeline.streams["d"]
        for seq in range(1, 513):  # 32 MiB through a 4 MiB spool
            await wait_for(lambda: not pipeline.paused, f"ingest to resume before sequence {seq}")
            pipeline.accept_write(stream, Write.make(1, seq, (seq - 1) * 65536, bytes([seq % 256]) * 65536, 0))
        await pipeline.drain()
        assert stream.durable_seq == 512 and pipeline.stats.pauses > 0


async def test_a_log_sealed_under_an_unknown_key_stops_the_start_naming_the_key_id(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data")
    async with running_pipeline(config, spool=never_spooled(config), key=KEY) as first:
        await write_and_wait_for_ack(first, range(1, 3))
    with pytest.raises(LogBlobError, match=key_id_of(KEY).hex()) as info:
        async with running_pipeline(config, key=OTHER_KEY):
            pass
    assert KEY.hex() not in str(info.value)


async def test_segments_roll_and_go_once_their_writes_are_stored(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.pipeline, "SEGMENT_BYTES", 64 * 1024)
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


async def test_close_leaves_nothing_running_behind_it(tmp_path: Path) -> None:
    """A batch waiting for its linger when the pipeline closes must not be sealed on a shut-down pool
    after close() (that surfaced as 'Task exception was never retrieved' in serve's log)."""
    config = make_config(tmp_path / "data", batch={"linger_ms": 100})
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        async with running_pipeline(config, key=KEY) as pipeline:
            await write_and_wait_for_ack(pipeline, range(1, 3))
        await asyncio.sleep(0.3)  # past the linger
        gc.collect()  # an unretrieved task exception is reported when the task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert errors == []
    async with running_pipeline(config, key=KEY) as again:  # and the log brought the two writes back
        assert again.streams["d"].durable_seq == 2


class SlowSecondWrite(Spool):
    """Refuses the first blob once (ENOSPC), then takes half a second over its retry: a struggling disk."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    def write(self, name: str, data: memoryview) -> Path:
        self.calls += 1
        if self.calls == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        if self.calls == 2:
            time.sleep(0.5)
        return super().write(name, data)


async def test_a_seal_cancelled_at_close_does_not_lend_out_the_buffer_being_written(tmp_path: Path) -> None:
    """close() cancels a seal whose blob is still being written by a spool thread; its buffer must not go
    back to the pool, or the next seal overwrites the blob under the first one's name."""
    config = make_config(tmp_path / "data", upload={"retry_initial_ms": 50}, pipeline={"seal_threads": 1},
                         batch={"linger_ms": 60_000})
    async with running_pipeline(config, spool=SlowSecondWrite(config.spool_dir, 1 << 30), key=KEY) as pipeline:
        seal = pipeline._seal_blocking

        def seal_3_late(batch: Batch) -> memoryview:  # its seal starts once close() has cancelled 1-2's task
            if batch.first_seq == 3:
                time.sleep(0.2)
            return seal(batch)

        pipeline._seal_blocking = seal_3_late  # type: ignore[method-assign]
        stream = pipeline.streams["d"]
        pipeline.accept_write(stream, Write.make(1, 1, 0, os.urandom(4096), 1))
        pipeline.accept_tag(stream, Tag(1, 2, TagKind.APP, "t1", 2))  # cuts 1-2: refused, then retried slowly
        await asyncio.sleep(0.25)
        pipeline.accept_write(stream, Write.make(1, 3, 8192, os.urandom(1024), 3))
        pipeline.accept_tag(stream, Tag(1, 4, TagKind.APP, "t2", 4))  # cuts 3-4 while 1-2 is being written
        await asyncio.sleep(0.02)
    blobs = sorted(config.spool_dir.glob("d/*.bflog"))
    assert blobs, "the slow write finished during close"
    for path in blobs:
        header = BlobHeader.unpack(path.read_bytes(), name=path.name)
        assert f"d/{path.name}" == blob_name("d", header.first_seq, header.last_seq), "a blob's name is its content"


async def test_a_disk_resumed_past_a_lost_gap_keeps_its_blobs_from_spanning_it_and_its_log_from_dropping_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The store holds blob 1 and, past a gap, blob 4 (write 3 is nowhere: a spool restored from an older
    copy); the log holds write 2, still in an open batch. The start resumes the disk after 4 and says what
    is lost. Write 5 must not join write 2's batch (a blob across the gap, which the applier refuses), and a
    restart before anything more is stored (the watermark still below the gap) must take write 5 from the log
    after the gap, not drop it as following a hole."""
    held_open = {"batch": {"linger_ms": 60_000, "min_bytes_wait_ms": 60_000}}
    elsewhere = make_config(tmp_path / "elsewhere", **held_open)
    async with running_pipeline(elsewhere) as pipeline:
        for seq in range(1, 5):
            assert pipeline.accept_write(pipeline.streams["d"], Write.make(1, seq, 0, bytes([seq]) * 4096, 0))
            await pipeline.drain()
        [blob_4] = [name for name in await pipeline.store.list_blobs() if parse_blob_name(name)[1] == 4]
    config = make_config(tmp_path / "data", **held_open)
    async with running_pipeline(config) as pipeline:
        stream = pipeline.streams["d"]
        assert pipeline.accept_write(stream, Write.make(1, 1, 0, b"\x01" * 4096, 0))
        await pipeline.drain()
        assert pipeline.accept_write(stream, Write.make(1, 2, 0, b"\x02" * 4096, 0))
        await wait_for(lambda: pipeline.unlogged_records == 0, "write 2 logged (acknowledged)")
    (config.store_dir / blob_4).write_bytes((elsewhere.store_dir / blob_4).read_bytes())
    with caplog.at_level(logging.ERROR, logger="engine.pipeline"):  # and nothing stored: the watermark stays at 1
        async with running_pipeline(config, store=StoreDown(config.store_dir)) as pipeline:
            stream = pipeline.streams["d"]
            assert stream.durable_seq == 4
            assert pipeline.accept_write(stream, Write.make(1, 5, 0, b"\x05" * 4096, 0))
            await wait_for(lambda: pipeline.unlogged_records == 0, "write 5 logged (acknowledged)")
    assert "disk 'd': sequences 3-3 are in neither the cache store, the spool nor the write-ahead log (lost)" \
        in caplog.text
    async with running_pipeline(config) as pipeline:
        assert pipeline.streams["d"].durable_seq == 5
        await pipeline.drain()
        stored = [parse_blob_name(name)[1:] for name in await pipeline.store.list_blobs()]
    assert not [(first, last) for first, last in stored if first <= 3 <= last], stored
    assert max(last for _, last in stored) == 5
