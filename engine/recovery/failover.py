"""Failover, test failover and commit: materialise a recovery point as a disk image.

Materialising point P copies the seed disk and rolls the copy back through the
undo entries newer than P, newest first. The applier keeps running: the copy may
be torn by groups applied meanwhile, but every such group's undo entry was
stored before its writes, so the same roll-back repairs the copy (each byte ends
at the before-image of the oldest group after P that touched it, or untouched,
which is its value at P). The point is pinned so pruning cannot remove entries
the roll-back still needs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from engine.applier import Applier
from engine.fsutil import write_at
from engine.recovery.points import Point, PointNotFound, select_point
from protocol.journal import EntryName, UndoEntry

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FailoverResult:
    disk: str
    seq: int
    point: Point | None  # None when the point is the applied state with no entry of its own
    out: Path
    size: int
    test: bool
    rolled_back_entries: int

    def as_dict(self) -> dict[str, object]:
        return {"disk": self.disk, "seq": self.seq, "point": self.point.as_dict() if self.point else None,
                "out": str(self.out), "size": self.size, "test": self.test,
                "rolled_back_entries": self.rolled_back_entries}


async def failover(applier: Applier, disk: str, spec: str, out: Path, *, test: bool,
                   progress: Progress | None = None) -> FailoverResult:
    """Materialise the point ``spec`` names into ``out``; without ``test``, record the failover."""
    if disk not in applier.disks and disk not in await applier.known_disks():
        raise PointNotFound(f"disk {disk!r} has no seed disk here")
    if (await applier.disk(disk)).state.committed_failover:
        raise PointNotFound(f"disk {disk!r} was failed over and committed; its points were released")
    if spec == "latest":  # lowest RPO: process everything already uploaded first
        await applier.catch_up(disk)
    d = await applier.disk(disk)  # after catch_up: a volume that broke meanwhile was opened again, as a new state
    seq = select_point(applier.points(disk), spec, latest_seq=d.state.applied_seq)
    with d.pinned(seq):  # taken in the same step as d: no reopening comes between
        size = await d.volume.copy_image_to(out, progress)
        newer = sorted((e for n in await d.volume.list_entries() if (e := EntryName.parse(n)) and e.seq_to > seq),
                       key=lambda e: e.seq_to, reverse=True)
        if newer and newer[-1].seq_from != seq:
            raise PointNotFound(f"point {seq} of disk {disk!r} is no longer retained")
        _check_chain(disk, seq, newer)
        await asyncio.to_thread(_roll_back_copy, out, [await _entry(d.volume, e) for e in newer])
    if not test:
        async with applier.locked(disk) as d:  # an apply pass saves the same state file: two writers could tear it
            state = replace(d.state, failover_seq=seq)
            await d.volume.save_state(state)
            d.state = state  # only once saved: a refused save must not leave memory ahead of the disk
    point = next((p for p in applier.points(disk) if p.seq == seq), None)
    return FailoverResult(disk, seq, point, out, size, test, len(newer))


def _check_chain(disk: str, seq: int, newer: list[EntryName]) -> None:
    """Each entry must roll back to the state the next older one starts from: rolled back across a gap (an
    entry lost since the disk was opened, which checks the whole chain), the copy would be handed out as
    point ``seq`` with the gap's writes still in it."""
    for later, earlier in itertools.pairwise(newer):
        if later.seq_from != earlier.seq_to:
            raise PointNotFound(f"point {seq} of disk {disk!r} cannot be materialised: its undo entries do not "
                                f"chain (one ends at sequence {earlier.seq_to}, the next newer rolls back to "
                                f"{later.seq_from}: an entry damaged or lost)")


async def _entry(volume: object, name: EntryName) -> UndoEntry:
    return UndoEntry.decode(await volume.get_entry(str(name)), name)  # type: ignore[attr-defined]


def _roll_back_copy(out: Path, entries: list[UndoEntry]) -> None:
    fd = os.open(out, os.O_RDWR)
    try:
        for entry in entries:  # newest first
            for (offset, _), before in zip(entry.ranges, entry.before):
                write_at(fd, before, offset)  # pwrite may write less than asked
        os.fsync(fd)
    finally:
        os.close(fd)


async def commit(applier: Applier, disk: str) -> int:
    """Commit a failover: replication of the disk stops and its other points are released (as in ASR)."""
    async with applier.locked(disk) as d:
        if d.state.failover_seq is None:
            raise PointNotFound(f"disk {disk!r} has no failover to commit (run failover without --test first)")
        if d.pins:  # its roll-back needs the entries a commit deletes: it would hand out the latest image instead
            raise PointNotFound(f"disk {disk!r} is being copied by another failover; commit once that is done")
        d.committing = True  # in the same step as the check: no failover pins a point from here on
        try:
            # memory follows the disk: a committed disk's blobs are deleted unapplied, so a refused save must
            # not leave it committed in memory only
            state = replace(d.state, committed_failover=True)
            await d.volume.save_state(state)
            d.state = state
            for name in list(d.entries):
                await d.volume.delete_entry(str(name))
            released = len(d.entries)
            d.entries.clear()
        finally:
            d.committing = False
    for listener in applier.committed_listeners:
        listener(disk)
    return released
