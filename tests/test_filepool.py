"""Used blob files are overwritten by the next spool write instead of deleted and created anew."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from support import make_config, running_pipeline

import engine.fsutil
import engine.store.local
from engine.filepool import RESCAN_INTERVAL_S, FilePool
from engine.fsutil import write_in_place
from engine.server import open_store
from engine.spool import Spool, pool_dir
from engine.store import LocalStore
from protocol import Write
from protocol.logblob import BlobHeader, Sealer, blob_name, write_record_header


def test_a_given_file_is_overwritten_in_place_by_the_next_write(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool")
    used = tmp_path / "used.blob"
    used.write_bytes(b"x" * 8192)
    inode = used.stat().st_ino
    pool.give(used)
    assert not used.exists()

    target = tmp_path / "new.blob"
    write_in_place(target, b"fresh", reuse=pool.take)
    assert target.stat().st_ino == inode, "the pooled inode was reused, not a new one created"
    assert target.read_bytes() == b"fresh", "cut to the new length: nothing of the old content remains"
    assert list((tmp_path / "pool").iterdir()) == []


def test_with_an_empty_pool_the_write_creates_the_file(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool")
    target = tmp_path / "new.blob"
    write_in_place(target, b"data", reuse=pool.take)
    assert target.read_bytes() == b"data"
    assert target.stat().st_mode & 0o777 == 0o600


def test_a_file_with_another_name_is_deleted_not_pooled(tmp_path: Path) -> None:
    """A spool blob the local cache store also links is the store's blob: overwriting it would change it."""
    pool = FilePool(tmp_path / "pool")
    spooled = tmp_path / "spooled.blob"
    spooled.write_bytes(b"sealed blob")
    stored = tmp_path / "stored.blob"
    os.link(spooled, stored)
    pool.give(spooled)
    assert not spooled.exists()
    assert list((tmp_path / "pool").iterdir()) == []
    assert not pool.take(tmp_path / "taken")
    assert stored.read_bytes() == b"sealed blob"


def test_the_pool_is_bounded(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool", max_files=2)
    for index in range(5):
        path = tmp_path / f"{index}.blob"
        path.write_bytes(b"x")
        pool.give(path)
        assert not path.exists()
    assert len(list((tmp_path / "pool").iterdir())) == 2


def test_processes_share_the_pool_through_its_directory(tmp_path: Path) -> None:
    """The applier process gives, the server takes; a name another taker got first is skipped."""
    giver, taker, rival = FilePool(tmp_path / "pool"), FilePool(tmp_path / "pool"), FilePool(tmp_path / "pool")
    for index in range(2):
        path = tmp_path / f"{index}.blob"
        path.write_bytes(b"x")
        giver.give(path)
    assert rival.take(tmp_path / "rival")  # both takers scanned before the rival took one
    assert taker.take(tmp_path / "a")
    assert not taker.take(tmp_path / "b"), "one file each: the second take finds nothing left"
    assert (tmp_path / "rival").exists() and (tmp_path / "a").exists()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system (/dev/shm)")
def test_a_pool_on_another_file_system_deletes_instead(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        pool = FilePool(Path(other) / "pool")
        path = tmp_path / "used.blob"
        path.write_bytes(b"x")
        pool.give(path)
        assert not path.exists()
        assert list((Path(other) / "pool").iterdir()) == []


async def test_applied_blobs_come_back_as_spool_files(tmp_path: Path) -> None:
    """The local cache store hands applied blobs to the spool's pool; the spool's next blob reuses one."""
    config = make_config(tmp_path / "data")
    store = open_store(config)
    async with running_pipeline(config, store=store) as pipeline:
        stream = pipeline.streams["d"]
        assert pipeline.accept_write(stream, Write.make(1, 1, 0, bytes(4096), 0))
        await pipeline.drain()
        [name] = await store.list_blobs()
        inode = (config.store_dir / name).stat().st_ino
        await store.delete(name)  # what the applier does once it is applied
        assert [p.stat().st_ino for p in pool_dir(config.spool_dir).iterdir()] == [inode]
        await asyncio.sleep(RESCAN_INTERVAL_S)  # the spool looked at the empty pool for the first blob

        assert pipeline.accept_write(stream, Write.make(1, 2, 0, bytes(4096), 0))
        await pipeline.drain()
        [name] = await store.list_blobs()
        assert (config.store_dir / name).stat().st_ino == inode
        assert list(pool_dir(config.spool_dir).iterdir()) == []


def test_the_spool_pool_is_not_mistaken_for_a_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30)
    (pool_dir(spool.directory) / "abc.0").write_bytes(b"not a blob")
    assert spool.recover(lambda key_id: None) == []
    assert (pool_dir(spool.directory) / "abc.0").exists()


def test_a_removed_pool_directory_is_recreated_and_nothing_leaks(tmp_path: Path) -> None:
    """Deleting <spool>/.recycle by hand must not stop deletes (applied blobs) or spool writes."""
    pool = FilePool(tmp_path / "pool")
    shutil.rmtree(tmp_path / "pool")
    used = tmp_path / "used.blob"
    used.write_bytes(b"x")
    pool.give(used)
    assert not used.exists(), "the blob is deleted, not left behind"
    shutil.rmtree(tmp_path / "pool")
    assert not pool.take(tmp_path / "taken"), "nothing to take: the write creates its file"
    assert (tmp_path / "pool").is_dir()
    again = tmp_path / "again.blob"
    again.write_bytes(b"y")
    pool.give(again)
    assert [p.read_bytes() for p in (tmp_path / "pool").iterdir()] == [b"y"]


def test_old_content_under_a_new_spool_name_is_not_a_blob_of_that_name(tmp_path: Path) -> None:
    """A reused file overwritten in place, then a power loss: the new name may show the old blob whole,
    even one sealed under a key retired since. It is torn, not a reason to stop the start."""
    spool = Spool(tmp_path / "spool", 1 << 30)
    old_key = bytes(32)
    header = BlobHeader("d", 1 << 20, 1, 1, 1, 0, 0)
    sealed = Sealer(old_key).seal(write_record_header(1, 0, 0, 512) + bytes(512), header, os.urandom(12))
    path = spool.path_of(blob_name("d", 7, 9))
    path.parent.mkdir(parents=True)
    path.write_bytes(sealed)
    assert spool.recover(lambda key_id: None) == []
    assert not path.exists()


def test_storing_a_blob_again_leaves_one_name_whether_the_same_file_or_another(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "cache")
    source = tmp_path / "spool.blob"
    source.write_bytes(b"sealed")
    name = blob_name("d", 1, 2)
    asyncio.run(store.put_files([(name, source)]))
    stored = tmp_path / "cache" / name
    assert os.path.samefile(stored, source), "linked, not copied"
    asyncio.run(store.put_files([(name, source)]))  # a restart uploads the spooled blob again
    copy = tmp_path / "copy.blob"
    copy.write_bytes(b"sealed")
    asyncio.run(store.put_files([(name, copy)]))  # another file under the same name (a copy from elsewhere)
    assert os.path.samefile(stored, copy)
    assert sorted(p.name for p in (tmp_path / "cache" / "d").iterdir()) == [name.split("/")[1]]


def test_a_store_on_another_file_system_copies_every_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links: list[Path] = []

    def no_link_across(source: Path, target: Path) -> None:
        links.append(Path(target))
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(engine.store.local.os, "link", no_link_across)
    store = LocalStore(tmp_path / "cache")
    for first in (1, 3):
        source = tmp_path / f"spool-{first}.blob"
        source.write_bytes(b"sealed %d" % first)
        asyncio.run(store.put_files([(blob_name("d", first, first + 1), source)]))
        assert (tmp_path / "cache" / blob_name("d", first, first + 1)).read_bytes() == b"sealed %d" % first
    assert len(links) == 1, "after the first refusal the store copies without trying to link again"
    assert sorted(p.name for p in (tmp_path / "cache" / "d").iterdir()) == [
        blob_name("d", 1, 2).split("/")[1], blob_name("d", 3, 4).split("/")[1]]


def test_a_new_blob_never_overwrites_a_file_another_name_still_holds(tmp_path: Path) -> None:
    """With no pooled file, a spool write creates anew: a file already under the name may be the cache
    store's blob too (hard-linked), and truncating it would change the stored blob."""
    spooled = tmp_path / "blob"
    spooled.write_bytes(b"stored content")
    stored = tmp_path / "stored"
    os.link(spooled, stored)
    write_in_place(spooled, b"new", reuse=FilePool(tmp_path / "pool").take)
    assert spooled.read_bytes() == b"new"
    assert stored.read_bytes() == b"stored content"


def test_a_spool_directory_removed_under_the_spool_is_made_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30)
    name = blob_name("d", 1, 1)
    spool.write(name, memoryview(b"first"))
    shutil.rmtree(tmp_path / "spool" / "d")
    assert spool.write(blob_name("d", 2, 2), memoryview(b"second")).read_bytes() == b"second"


async def test_the_local_store_makes_a_disk_directory_but_never_its_missing_root(tmp_path: Path) -> None:
    """A root gone missing (an unmounted volume) must fail uploads, not be made again on another disk."""
    store = LocalStore(tmp_path / "cache")
    await store.make_directory("a..b")  # one safe path component: a valid disk id
    assert (tmp_path / "cache" / "a..b").is_dir()
    source = tmp_path / "blob"
    source.write_bytes(b"x" * 100)
    await store.put_file(blob_name("a..b", 1, 1), source)
    assert await store.list_blobs() == [blob_name("a..b", 1, 1)]
    with pytest.raises(ValueError, match="not a log-blob name"):
        await store.make_directory("..")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        await store.make_directory("d")
    assert not (tmp_path / "cache").exists()


def test_a_missing_target_directory_is_reported_and_the_pooled_file_kept(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool")
    for i in range(3):
        used = tmp_path / f"used-{i}"
        used.write_bytes(b"x")
        pool.give(used)
    with pytest.raises(FileNotFoundError):
        pool.take(tmp_path / "missing" / "blob")
    assert len(list((tmp_path / "pool").iterdir())) == 3
    assert pool.take(tmp_path / "blob"), "the names were not used up by the failed take"


def test_a_spool_write_into_a_removed_directory_still_reuses_a_pooled_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 30)
    pooled = set()
    for i in range(2):
        used = tmp_path / f"used-{i}"
        used.write_bytes(b"old")
        pooled.add(used.stat().st_ino)
        spool.pool.give(used)
    first = spool.write(blob_name("d", 1, 1), memoryview(b"first")).stat().st_ino
    shutil.rmtree(tmp_path / "spool" / "d")
    path = spool.write(blob_name("d", 2, 2), memoryview(b"second"))
    assert path.read_bytes() == b"second"
    assert path.stat().st_ino in pooled - {first}, "the second pooled file, not a new one"


def test_the_local_store_syncs_a_group_side_by_side_and_names_only_synced_blobs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The syncs of a group run at once (the block layer folds concurrent flushes into one): all three blobs'
    data syncs must be in flight together, and then the three directories' syncs. Every name comes after
    every data sync, every directory sync after every name."""
    calls: list[str] = []
    data_syncs, directory_syncs = threading.Barrier(3, timeout=10), threading.Barrier(3, timeout=10)
    real_fdatasync, real_fsync, real_link = os.fdatasync, os.fsync, os.link

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        data_syncs.wait()  # broken (an error) unless three syncs wait here at the same time
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        directory_syncs.wait()
        real_fsync(fd)

    monkeypatch.setattr(engine.fsutil.os, "fdatasync", fdatasync)
    monkeypatch.setattr(engine.fsutil.os, "fsync", fsync)
    monkeypatch.setattr(engine.store.local.os, "link",
                        lambda source, target: (calls.append("link"), real_link(source, target))[1])
    store = LocalStore(tmp_path / "cache")
    items = []
    for disk in ("d1", "d2", "d3"):
        source = tmp_path / f"{disk}.blob"
        source.write_bytes(b"sealed")
        asyncio.run(store.make_directory(disk))
        items.append((blob_name(disk, 1, 1), source))
    asyncio.run(store.put_files(items))
    assert calls == ["fdatasync"] * 3 + ["link"] * 3 + ["fsync"] * 3
    assert all(os.path.samefile(tmp_path / "cache" / name, source) for name, source in items)


async def test_upload_rounds_name_and_sync_directories_one_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After one round's directory sync fails, another round's sync of that directory passes without writing
    the names it linked before the failure (Linux reports a failed writeback once). So no round links while
    another is between its links and its directory syncs."""
    events: list[str] = []
    first_sync = threading.Event()
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        if not first_sync.is_set():
            first_sync.set()
            threading.Event().wait(0.3)  # round 2 is ready to link meanwhile
            real_fsync(fd)
            events.append("round 1 synced its directory")
            return
        real_fsync(fd)

    monkeypatch.setattr(engine.fsutil.os, "fsync", fsync)
    monkeypatch.setattr(engine.store.local.os, "link",
                        lambda source, target: (events.append(f"link {Path(target).name}"),
                                                real_link(source, target))[1])
    store = LocalStore(tmp_path / "cache")
    await store.make_directory("d")
    rounds = []
    for seq in (1, 2):
        source = tmp_path / f"{seq}.blob"
        source.write_bytes(b"sealed")
        rounds.append([(blob_name("d", seq, seq), source)])
    first = asyncio.create_task(store.put_files(rounds[0]))
    await asyncio.to_thread(first_sync.wait, 5)
    await asyncio.gather(first, store.put_files(rounds[1]))
    second = f"link {blob_name('d', 2, 2).split('/')[1]}"
    assert events.index(second) > events.index("round 1 synced its directory"), events


def test_uploads_fail_once_the_store_root_is_gone(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "cache")
    source = tmp_path / "spool.blob"
    source.write_bytes(b"sealed")
    asyncio.run(store.put_files([(blob_name("d", 1, 1), source)]))
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        asyncio.run(store.put_files([(blob_name("e", 1, 1), source)]))
    assert not (tmp_path / "cache").exists()


async def test_a_start_removes_temporary_names_an_earlier_run_left_in_the_store(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A hard link under a temporary name would hold its blocks for good and keep the file out of the pool."""
    config = make_config(tmp_path / "data")
    disk_dir = config.store_dir / "d"
    disk_dir.mkdir(parents=True)
    spooled = tmp_path / "spooled"
    spooled.write_bytes(b"blob")
    leftover = disk_dir / f".{blob_name('d', 1, 1).split('/')[1]}.tmp"
    os.link(spooled, leftover)
    (disk_dir / blob_name("d", 2, 2).split("/")[1]).write_bytes(b"a stored blob stays")
    async with running_pipeline(config):
        assert not leftover.exists()
        assert sorted(p.name for p in disk_dir.iterdir()) == [blob_name("d", 2, 2).split("/")[1]]
    assert "removed 1 temporary name(s)" in caplog.text
    assert spooled.stat().st_nlink == 1
