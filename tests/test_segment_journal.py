"""A local disk's undo entries appended to segment files (engine/recovery/segment_journal.py).

What must hold: an opened journal lists exactly the entries that were whole when it was left, a crash while
appending loses only the record being appended, a roll-back and a prune take entries away for good where
they can, and entry files of earlier versions are still read. Real files throughout.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_writeback_errors import FailingWriteback

from engine.applier import Applier
from engine.config import PolicyConfig
from engine.keys import KeyRing
from engine.recovery import segment_journal
from engine.recovery.segment_journal import SegmentJournal
from engine.recovery.state_file import StateFile
from engine.recovery.volume import LocalVolumes, SeedState
from engine.store import LocalStore
from protocol.journal import DELETED_MAGIC, RECORD_HEADER, SEGMENT_SUFFIX, EntryName, UndoEntry


def entry(seq_from: int, seq_to: int, size: int = 3000) -> tuple[str, bytes]:
    name = EntryName(seq_from, seq_to, False, seq_to * 10, seq_to * 100)
    before = bytes([seq_to % 251]) * 512 + os.urandom(size)
    return str(name), UndoEntry(name, [(seq_from * 65536, len(before))], before).encode()


def chain(count: int, size: int = 3000) -> list[tuple[str, bytes]]:
    return [entry(seq, seq + 1, size) for seq in range(count)]


def write(directory: Path, entries: list[tuple[str, bytes]]) -> None:
    journal = SegmentJournal(directory)
    for name, data in entries:
        journal.append(name, data)
    journal.close()


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SEGMENT_SUFFIX}"))


def test_entries_read_back_after_a_restart_from_one_file(tmp_path: Path) -> None:
    entries = chain(5)
    write(tmp_path, entries)
    assert len(os.listdir(tmp_path)) == 1  # one segment, not a file per entry
    journal = SegmentJournal(tmp_path)
    assert journal.names() == [name for name, _ in entries]
    for name, data in entries:
        assert journal.read(name) == data
    journal.close()


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(1, 1 << 20))
def test_a_record_cut_short_at_any_byte_is_dropped_and_the_rest_kept(tmp_path_factory, cut: int) -> None:
    directory = tmp_path_factory.mktemp("j")
    entries = chain(3)
    write(directory, entries)
    [segment] = segments(directory)
    whole = segment.stat().st_size
    last_record = RECORD_HEADER.size + len(entries[2][0]) + len(entries[2][1])
    os.truncate(segment, whole - 1 - cut % last_record)  # the last record cut short by a crash, by 1 byte or more
    journal = SegmentJournal(directory)
    assert journal.names() == [name for name, _ in entries[:2]]
    assert segment.stat().st_size < whole
    name, data = entry(2, 3, 100)  # the group again, appended where the cut one started
    journal.append(name, data)
    journal.close()
    reopened = SegmentJournal(directory)
    assert reopened.names() == [n for n, _ in entries[:2]] + [name]
    assert reopened.read(name) == data
    reopened.close()


def test_a_last_record_with_damaged_bytes_is_dropped(tmp_path: Path) -> None:
    """A crash on a file system without a journal can leave the file's size but not its data."""
    entries = chain(3)
    write(tmp_path, entries)
    [segment] = segments(tmp_path)
    with open(segment, "r+b") as file:
        file.seek(-100, os.SEEK_END)
        file.write(bytes(100))
    journal = SegmentJournal(tmp_path)
    assert journal.names() == [name for name, _ in entries[:2]]
    journal.close()


def test_rolling_back_the_newest_entry_truncates_it_away(tmp_path: Path) -> None:
    entries = chain(3)
    write(tmp_path, entries)
    [segment] = segments(tmp_path)
    journal = SegmentJournal(tmp_path)
    size = segment.stat().st_size
    journal.delete(entries[2][0])
    name, data = entries[2]
    assert segment.stat().st_size == size - (RECORD_HEADER.size + len(name) + len(data))
    journal.close()
    assert SegmentJournal(tmp_path).names() == [name for name, _ in entries[:2]]


def test_pruning_removes_a_segment_once_all_its_entries_are_gone(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_journal, "SEGMENT_BYTES", 6000)  # two ~3.2 KB records per segment
    entries = chain(6)
    write(tmp_path, entries)
    first, second, third = segments(tmp_path)
    journal = SegmentJournal(tmp_path)
    journal.delete(entries[0][0])
    assert first.exists()  # its other entry is still retained
    journal.delete(entries[1][0])
    assert not first.exists() and second.exists()
    journal.delete(entries[2][0])  # pruned out of a segment that stays: marked, never listed again
    journal.close()
    assert second.exists()
    reopened = SegmentJournal(tmp_path)
    assert reopened.names() == [name for name, _ in entries[3:]]
    reopened.delete(entries[3][0])
    assert not second.exists() and third.exists()
    reopened.close()
    assert SegmentJournal(tmp_path).names() == [name for name, _ in entries[4:]]


def test_a_segment_whose_entries_were_all_pruned_before_a_crash_goes_at_the_opening(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch
                                                                                    ) -> None:
    monkeypatch.setattr(segment_journal, "SEGMENT_BYTES", 6000)
    entries = chain(4)
    write(tmp_path, entries)
    first = segments(tmp_path)[0]
    with open(first, "r+b") as file:  # both its records marked pruned, as the prune does before the unlink
        for start in (0, RECORD_HEADER.size + len(entries[0][0]) + len(entries[0][1])):
            file.seek(start)
            file.write(DELETED_MAGIC)
    assert SegmentJournal(tmp_path).names() == [name for name, _ in entries[2:]]
    assert not first.exists()


def record_starts(entries: list[tuple[str, bytes]]) -> list[int]:
    """Where each record starts in its segment, two records to a segment (SEGMENT_BYTES = 6000)."""
    starts = []
    for index in range(len(entries)):
        previous = entries[index - 1]
        starts.append(0 if index % 2 == 0 else RECORD_HEADER.size + len(previous[0]) + len(previous[1]))
    return starts


def test_damage_in_an_older_segment_is_reported_and_the_rest_still_read(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """An applier that cannot open a disk's journal would stop every disk's replication (the process restarts
    for good): the damage costs the points it cuts off, which the applier then drops (see below), no more."""
    monkeypatch.setattr(segment_journal, "SEGMENT_BYTES", 6000)
    entries = chain(4)
    write(tmp_path, entries)
    first = segments(tmp_path)[0]
    with open(first, "r+b") as file:
        file.seek(record_starts(entries)[1])  # the second record's header
        file.write(b"XXXX")
    assert SegmentJournal(tmp_path).names() == [entries[0][0], entries[2][0], entries[3][0]]
    assert f"journal segment {first}: no whole record at offset {record_starts(entries)[1]}" in caplog.text


def _damage_a_header(segment_files: list[Path], starts: list[int]) -> None:
    with open(segment_files[0], "r+b") as file:
        file.seek(starts[1])
        file.write(b"XXXX")


def _damage_the_newest_entry(segment_files: list[Path], starts: list[int]) -> None:
    with open(segment_files[-1], "r+b") as file:  # committed, so not a record a crash cut short
        file.seek(-10, os.SEEK_END)
        file.write(bytes(10))


def _lose_some_prune_marks(segment_files: list[Path], starts: list[int]) -> None:
    """A prune marked entries 0-3 deleted, and a power loss kept only the marks on 0 and 3."""
    for segment, start in ((segment_files[0], starts[0]), (segment_files[1], starts[3])):
        with open(segment, "r+b") as file:
            file.seek(start)
            file.write(DELETED_MAGIC)


@pytest.mark.parametrize(("damage", "kept_from"), [(_damage_a_header, 2), (_damage_the_newest_entry, 6),
                                                   (_lose_some_prune_marks, 4)],
                         ids=["a-damaged-header", "the-newest-entry-damaged", "prune-marks-partly-lost"])
async def test_points_a_journal_gap_cuts_off_are_dropped_not_materialised(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         damage, kept_from: int) -> None:
    """Rolling a copy back through a gap in the chain of entries would hand out a wrong image: the applier keeps
    only the entries that chain down from the applied sequence, and deletes the rest."""
    monkeypatch.setattr(segment_journal, "SEGMENT_BYTES", 6000)
    seed_dir = tmp_path / "seed"
    entries = chain(6)
    (seed_dir / "journal" / "d").mkdir(parents=True)
    write(seed_dir / "journal" / "d", entries)
    StateFile(seed_dir, "d").save(asdict(SeedState("d", 1 << 20, applied_seq=6)))
    damage(segments(seed_dir / "journal" / "d"), record_starts(entries))
    applier = Applier(LocalStore(tmp_path / "store"), KeyRing(bytes(32)), LocalVolumes(seed_dir),
                      lambda disk: PolicyConfig())
    try:
        await applier.open_existing()
        assert [p.seq for p in applier.points("d")] == list(range(kept_from + 1, 7))
    finally:
        await applier.close()
    assert SegmentJournal(seed_dir / "journal" / "d").names() == [name for name, _ in entries[kept_from:]]


def test_entry_files_of_an_earlier_version_are_read_in_order_and_deleted(tmp_path: Path) -> None:
    old = chain(2)
    for name, data in old:
        (tmp_path / name).write_bytes(data)
    new = entry(2, 3)
    journal = SegmentJournal(tmp_path)
    journal.append(*new)
    assert journal.names() == [old[0][0], old[1][0], new[0]]
    assert journal.read(old[1][0]) == old[1][1]
    journal.delete(old[0][0])
    assert not (tmp_path / old[0][0]).exists()
    journal.close()
    assert SegmentJournal(tmp_path).names() == [old[1][0], new[0]]


def test_an_append_whose_sync_fails_raises_and_is_found_again(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The failed record may be whole in the page cache only: the opening after it must list it, so that the
    applier rolls it back (and its roll-back truncates it away) rather than trust it."""
    entries = chain(2)
    write(tmp_path, entries[:1])
    monkeypatch.setattr(os, "fdatasync", FailingWriteback(tmp_path, suffix=SEGMENT_SUFFIX))
    journal = SegmentJournal(tmp_path)
    with pytest.raises(OSError, match="Input/output error"):
        journal.append(*entries[1])
    journal.close()
    monkeypatch.undo()
    assert SegmentJournal(tmp_path).names() == [name for name, _ in entries]


def test_a_closed_journal_takes_no_more_appends(tmp_path: Path) -> None:
    """A cancelled apply's thread may outlive its volume: its append must not start a segment the reopened
    volume's journal does not know."""
    entries = chain(2)
    journal = SegmentJournal(tmp_path)
    journal.append(*entries[0])
    journal.close()
    with pytest.raises(OSError, match="was closed"):
        journal.append(*entries[1])
    assert SegmentJournal(tmp_path).names() == [entries[0][0]]
