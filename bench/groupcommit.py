"""One apply group's commit on local seed volumes at many disks: machine CPU per group, whole and by part.

At 1000 disks an apply group is one ~400 KB blob, about 2500 groups per GB, so what a group costs the
kernel decides how much CPU the applier leaves to ingest on a small machine. Each group here writes
``writes`` random 64 KiB ranges of a sparse disk, the disks taken in turn, as the bench's random64k
profile does. CPU is the whole machine's (/proc/stat, after a sync on both sides), so the kernel's
writeback threads count too; the machine is shared, so compare parts measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from bench.serverproc import system_cpu_seconds
from engine.recovery.volume import GroupCommit, LocalVolume, SeedState
from protocol.journal import EntryName, UndoEntry, merge_ranges

WRITE_BYTES = 64 * 1024
DISK_BYTES = 256 * 1024 * 1024

Part = Callable[[LocalVolume, GroupCommit], None]


def _whole(volume: LocalVolume, group: GroupCommit) -> None:
    volume._commit_group(group)


def _undo_entry(volume: LocalVolume, group: GroupCommit) -> None:
    volume._put_entry(group.entry_name, group.encode_entry(volume._read_images(group.ranges)))


def _state(volume: LocalVolume, group: GroupCommit) -> None:
    volume._save_state(group.state)


def _image(volume: LocalVolume, group: GroupCommit) -> None:
    volume._write_ranges(group.writes)
    volume._flush()


PARTS: dict[str, Part] = {"whole commit": _whole, "undo entry (read, encode, append, sync)": _undo_entry,
                          "state (save in place, sync)": _state, "image (writes, fsync)": _image}


def _groups(disks: int, groups: int, writes: int, payload: memoryview) -> list[tuple[int, GroupCommit]]:
    """``groups`` apply groups over ``disks`` disks in turn, each continuing its disk's chain of entries."""
    rng = random.Random(1)
    states = [SeedState(f"d{i:04d}", DISK_BYTES) for i in range(disks)]
    planned = []
    for number in range(groups):
        index = number % disks
        before = states[index]
        chosen = [(rng.randrange(DISK_BYTES // WRITE_BYTES) * WRITE_BYTES,
                   payload[k * WRITE_BYTES:(k + 1) * WRITE_BYTES]) for k in range(writes)]
        ranges = merge_ranges([(offset, len(data)) for offset, data in chosen])
        name = EntryName(before.applied_seq, before.applied_seq + writes, False, number, number)
        states[index] = replace(before, applied_seq=before.applied_seq + writes)
        planned.append((index, GroupCommit(str(name), ranges, _encoder(name, ranges), chosen, states[index])))
    return planned


def _encoder(name: EntryName, ranges: list[tuple[int, int]]) -> Callable[[bytes | bytearray], bytes]:
    return lambda images: UndoEntry(name, ranges, images, []).encode()


def _machine_ms_per_group(root: Path, part: Part, planned: list[tuple[int, GroupCommit]], disks: int) -> float:
    volumes = [LocalVolume(root, f"d{i:04d}") for i in range(disks)]
    try:
        for volume in volumes:  # every disk has its state file and image before the clock starts
            volume._ensure_size(DISK_BYTES)
            volume._save_state(SeedState(volume.disk, DISK_BYTES))
        os.sync()
        started = system_cpu_seconds()
        for index, group in planned:
            part(volumes[index], group)
        os.sync()
        return 1000 * (system_cpu_seconds() - started) / len(planned)
    finally:
        asyncio.run(_close(volumes))


async def _close(volumes: list[LocalVolume]) -> None:
    for volume in volumes:
        await volume.close()


def measure_group_commit(disks: int, groups: int, writes: int, directory: Path | None = None) -> dict:
    """Machine CPU (ms) per apply group, for the whole commit and each of its parts alone, each on fresh
    volumes under ``directory`` (a temporary one by default)."""
    payload = memoryview(os.urandom(writes * WRITE_BYTES))
    planned = _groups(disks, groups, writes, payload)
    results: dict = {"disks": disks, "groups": groups, "writes_per_group": writes, "ms_per_group": {}}
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        for label, part in PARTS.items():
            root = Path(scratch) / str(len(results["ms_per_group"]))
            results["ms_per_group"][label] = round(_machine_ms_per_group(root, part, planned, disks), 3)
    return results
