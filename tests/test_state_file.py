"""A local seed disk's state file, saved in place (engine/recovery/state_file.py): atomic without a rename.

The applier deletes applied blobs on the state's word, so a save must leave either the state before it or
itself after any crash, and a save whose sync failed must never be trusted to be on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_writeback_errors import FailingWriteback

from engine.recovery.state_file import (
    SLOT_BYTES,
    STATE_SUFFIX,
    StateFile,
    StateFileDamaged,
    decode_newest,
    encode_slot,
    read_state_record,
)
from engine.recovery.volume import LocalVolumes, SeedState


def record(seq: int) -> dict[str, object]:
    return {"disk": "d", "disk_size": 1 << 20, "applied_seq": seq}


def test_saves_alternate_slots_and_the_newest_is_read(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "d")
    for seq in range(1, 6):
        state.save(record(seq))
        assert read_state_record(tmp_path, "d") == record(seq)
    inode = (tmp_path / "d.state").stat().st_ino
    state.close()
    assert (tmp_path / "d.state").stat().st_size == 2 * SLOT_BYTES
    assert (tmp_path / "d.state").stat().st_ino == inode  # saved in place, not renamed over
    assert StateFile(tmp_path, "d").load() == record(5)


def test_a_torn_save_leaves_the_state_before_it(tmp_path: Path) -> None:
    state = StateFile(tmp_path, "d")
    state.save(record(1))
    state.save(record(2))
    state.close()
    path = tmp_path / "d.state"
    generation, _ = decode_newest(path.read_bytes(), name="d.state")
    with open(path, "r+b") as file:  # the newest slot's body torn half-way
        file.seek((generation % 2) * SLOT_BYTES + 30)
        file.write(b"\0" * 8)
    assert StateFile(tmp_path, "d").load() == record(1)


@given(torn_at=st.integers(0, SLOT_BYTES))
def test_a_save_torn_at_any_byte_reads_as_before_or_after(torn_at: int) -> None:
    """However much of the slot reached the disk, the file reads as one of the two records, never damaged."""
    older, before, after = encode_slot(1, record(1)), encode_slot(2, record(2)), encode_slot(3, record(3))
    torn = after[:torn_at] + older[torn_at:]  # generation 3 overwrites generation 1's slot (slot 1)
    generation, got = decode_newest(before + torn, name="d.state")
    assert (generation, got) in ((2, record(2)), (3, record(3)))
    if torn_at >= len(after.rstrip(b"\0")):  # all of it reached the disk
        assert got == record(3)


def test_a_file_with_no_whole_slot_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "d.state").write_bytes(os.urandom(2 * SLOT_BYTES))
    with pytest.raises(StateFileDamaged, match="d.state: neither slot"):
        StateFile(tmp_path, "d").load()


def test_a_save_by_a_process_that_did_not_load_goes_on_from_the_file(tmp_path: Path) -> None:
    first = StateFile(tmp_path, "d")
    for seq in (1, 2, 3):
        first.save(record(seq))
    first.close()
    second = StateFile(tmp_path, "d")
    second.save(record(4))  # generation 4, not 1: a 1 would lose against the 3 in the other slot
    second.close()
    assert read_state_record(tmp_path, "d") == record(4)


def test_a_save_whose_sync_fails_is_written_again_into_a_new_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux reports a failed writeback once: the same file's next sync passes with the slot lost. The save
    goes to a new file instead, so the state on disk is the one the applier goes on from."""
    state = StateFile(tmp_path, "d")
    state.save(record(1))
    inode = (tmp_path / "d.state").stat().st_ino
    failing = FailingWriteback(tmp_path, suffix=STATE_SUFFIX)
    monkeypatch.setattr(os, "fdatasync", failing)
    state.save(record(2))
    assert list(failing.failed) == [inode]
    assert (tmp_path / "d.state").stat().st_ino != inode
    state.save(record(3))  # and the saves after it go to the new file
    monkeypatch.undo()
    state.close()
    assert StateFile(tmp_path, "d").load() == record(3)
    assert (tmp_path / "d.state").stat().st_ino != inode


def test_when_the_new_file_fails_too_the_file_reads_as_before_the_save(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or failing disk fails both the slot's sync and the new file. The slot must not stay readable in the
    page cache: the volume, opened again, would believe a state the disk does not have and delete its blobs."""
    state = StateFile(tmp_path, "d")
    state.save(record(1))
    monkeypatch.setattr(os, "fdatasync", FailingWriteback(tmp_path, suffix=STATE_SUFFIX))
    monkeypatch.setattr(os, "fsync", FailingWriteback(tmp_path, suffix=".tmp", real=os.fsync))
    with pytest.raises(OSError, match="Input/output error"):
        state.save(record(2))
    monkeypatch.undo()
    assert StateFile(tmp_path, "d").load() == record(1)


def test_a_closed_state_file_takes_no_more_saves(tmp_path: Path) -> None:
    """A cancelled apply's thread may outlive its volume: its save must not race the reopened volume's."""
    state = StateFile(tmp_path, "d")
    state.save(record(1))
    state.close()
    with pytest.raises(OSError, match="was closed"):
        state.save(record(2))
    assert read_state_record(tmp_path, "d") == record(1)


async def test_a_volume_opened_again_syncs_the_directory_its_state_file_may_have_been_renamed_into(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed sync the state goes to a new file renamed over the old one; if the directory's sync then
    fails too, the volume is opened again in the same process and must not believe a rename a power loss
    would undo (the directory is otherwise synced once, when the process starts)."""
    volumes = LocalVolumes(tmp_path)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    first = volumes("d")
    assert str(tmp_path) not in synced
    second = volumes("d")
    assert str(tmp_path) in synced
    await first.close()
    await second.close()


def test_too_big_a_record_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_slot(1, {"disk": "x" * SLOT_BYTES})


async def test_the_state_file_of_an_earlier_version_is_read_then_replaced(tmp_path: Path) -> None:
    legacy = SeedState("vm-1", 1 << 20, applied_seq=7, applied_bytes=4096)
    (tmp_path / "vm-1.state.json").write_text(json.dumps(legacy.__dict__))
    volumes = LocalVolumes(tmp_path)
    assert await volumes.list_disks() == ["vm-1"]
    volume = volumes("vm-1")
    try:
        assert await volume.load_state() == legacy
        assert read_state_record(tmp_path, "vm-1") == legacy.__dict__
        await volume.save_state(SeedState("vm-1", 1 << 20, applied_seq=8))
    finally:
        await volume.close()
    assert not (tmp_path / "vm-1.state.json").exists()
    assert await volumes.list_disks() == ["vm-1"]
    reopened = volumes("vm-1")
    try:
        assert await reopened.load_state() == SeedState("vm-1", 1 << 20, applied_seq=8)
    finally:
        await reopened.close()
