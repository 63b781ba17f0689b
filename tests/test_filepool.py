"""Used blob files are overwritten by the next spool write instead of deleted and created anew."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from support import make_config, running_pipeline

from engine.filepool import RESCAN_INTERVAL_S, FilePool
from engine.fsutil import write_durably
from engine.server import open_store
from engine.spool import Spool, pool_dir
from protocol import Write


def test_a_given_file_is_overwritten_in_place_by_the_next_write(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool")
    used = tmp_path / "used.blob"
    used.write_bytes(b"x" * 8192)
    inode = used.stat().st_ino
    pool.give(used)
    assert not used.exists()

    target = tmp_path / "new.blob"
    write_durably(target, b"fresh", reuse=pool.take)
    assert target.stat().st_ino == inode, "the pooled inode was reused, not a new one created"
    assert target.read_bytes() == b"fresh", "cut to the new length: nothing of the old content remains"
    assert list((tmp_path / "pool").iterdir()) == []


def test_with_an_empty_pool_the_write_creates_the_file(tmp_path: Path) -> None:
    pool = FilePool(tmp_path / "pool")
    target = tmp_path / "new.blob"
    write_durably(target, b"data", reuse=pool.take)
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
