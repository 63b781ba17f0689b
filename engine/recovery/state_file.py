"""A local seed disk's applier state, saved in place: two checksummed slots, written in turn.

The applier saves a disk's state once per apply group. Writing a new file and
renaming it over the old one (create, write, sync, rename, sync the directory)
cost ~0.9 ms of CPU per save on ext4 at 1000 disks, a third of an apply group's
kernel work there; rewriting one 4 KiB slot of an open file and syncing its data
costs ~0.1 ms. The save stays atomic without the rename: a save writes the slot
the newest state is *not* in, so a torn write leaves the other slot, the state
before, whole, and a reader takes the valid slot of the highest generation.
Layout: docs/FORMAT.md, "Seed state file".

``<disk>.state.json``, the whole-file JSON of earlier versions, is still read;
the first save writes the new file and removes it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from engine.fsutil import sync_or_rewrite, write_at, write_durably
from protocol.checksum import crc32

log = logging.getLogger(__name__)

STATE_SUFFIX = ".state"
LEGACY_SUFFIX = ".state.json"
SLOT_BYTES = 4096
SLOT_MAGIC = b"BFSTATE\x01"
SLOT_HEADER = struct.Struct("<8sQII")  # magic, generation, body length, CRC-32 of generation, length and body


class StateFileDamaged(ValueError):
    """Neither slot of a state file holds a whole record: not a torn save (that leaves the other slot)."""


def encode_slot(generation: int, record: dict[str, Any]) -> bytes:
    body = json.dumps(record, separators=(",", ":")).encode()
    if SLOT_HEADER.size + len(body) > SLOT_BYTES:
        raise ValueError(f"a seed state record of {len(body)} bytes does not fit a {SLOT_BYTES}-byte slot")
    crc = crc32(body, crc32(struct.pack("<QI", generation, len(body))))
    return (SLOT_HEADER.pack(SLOT_MAGIC, generation, len(body), crc) + body).ljust(SLOT_BYTES, b"\0")


def decode_newest(data: bytes, *, name: str) -> tuple[int, dict[str, Any]]:
    """The (generation, record) of the newest whole slot in a state file's ``data``."""
    found: list[tuple[int, bytes]] = []
    for start in range(0, min(len(data), 2 * SLOT_BYTES), SLOT_BYTES):
        slot = data[start:start + SLOT_BYTES]
        if len(slot) < SLOT_HEADER.size:
            continue
        magic, generation, length, crc = SLOT_HEADER.unpack_from(slot)
        body = slot[SLOT_HEADER.size:SLOT_HEADER.size + length]
        if (magic == SLOT_MAGIC and len(body) == length
                and crc32(body, crc32(struct.pack("<QI", generation, length))) == crc):
            found.append((generation, body))
    if not found:
        raise StateFileDamaged(f"seed state file {name}: neither slot holds a whole record (damaged, not a torn "
                               "save); the disk's applied sequence is unknown")
    generation, body = max(found)
    return generation, json.loads(body)


def read_state_record(root: Path, disk: str) -> dict[str, Any] | None:
    """The saved state of ``disk`` under ``root`` as a dict (for readers outside the applier: the server, the bench),
    None if there is none yet."""
    try:
        return decode_newest((root / f"{disk}{STATE_SUFFIX}").read_bytes(), name=disk + STATE_SUFFIX)[1]
    except FileNotFoundError:
        pass
    try:
        return json.loads((root / f"{disk}{LEGACY_SUFFIX}").read_bytes())
    except FileNotFoundError:
        return None


class StateFile:
    """One disk's state file, kept open between saves. Blocking: call it from a worker thread."""

    def __init__(self, root: Path, disk: str, *, fsync: bool = True) -> None:
        self.path = root / f"{disk}{STATE_SUFFIX}"
        self.legacy_path = root / f"{disk}{LEGACY_SUFFIX}"
        self.fsync = fsync
        self._fd = -1
        self._generation = 0
        self._closed = False

    def load(self) -> dict[str, Any] | None:
        """The newest saved record, made durable first: a save's slot may sit in the page cache only (a kill
        right after it), and the applier deletes applied blobs on the state's word. A file whose sync fails is
        written again into a new file (its lost pages would pass the next sync)."""
        path = self.path if self.path.exists() else self.legacy_path
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if self.fsync and sync_or_rewrite(path, data, mode=0o644):
            log.error("seed state file %s could not be synced; written again into a new file", path)
        if path == self.legacy_path:
            return json.loads(data)
        self._generation, record = decode_newest(data, name=path.name)
        return record

    def save(self, record: dict[str, Any]) -> None:
        """Atomic and durable (with ``fsync``): after a crash, the record before or this one."""
        if self._closed:  # e.g. a cancelled apply's thread that outlived its volume: the reopened one saves now
            raise OSError(errno.EBADF, f"seed state file {self.path} was closed")
        if self._fd < 0 and self.path.exists():  # not loaded by this process: go on from the file's generation
            self._fd = os.open(self.path, os.O_RDWR)
            self._generation = decode_newest(os.pread(self._fd, 2 * SLOT_BYTES, 0), name=self.path.name)[0]
        if self._fd < 0:
            self._create(record)
            return
        generation = self._generation + 1
        slot = (generation % 2) * SLOT_BYTES
        write_at(self._fd, encode_slot(generation, record), slot)
        if self.fsync:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # the lost slot would pass the next sync of this file: never trust it again
                log.error("seed state file %s could not be synced (%s); writing it again into a new file",
                          self.path, exc.strerror)
                self._forget(slot)
                self._create(record)
                return
        self._generation = generation

    def _forget(self, slot: int) -> None:
        """Zero a slot whose sync failed, in the page cache at least, and let the file go: if writing a new file
        fails too, a reader of this one (the volume opened again) must find the record before, as the disk
        has it, not the one the cache still holds."""
        try:
            write_at(self._fd, bytes(SLOT_BYTES), slot)
        except OSError:
            pass  # the new file is tried all the same; its failure is the error the caller sees
        finally:
            os.close(self._fd)
            self._fd = -1

    def _create(self, record: dict[str, Any]) -> None:
        generation = self._generation + 1
        slots = bytearray(2 * SLOT_BYTES)  # the other slot zeroed: a stale record must never read as whole
        start = (generation % 2) * SLOT_BYTES
        slots[start:start + SLOT_BYTES] = encode_slot(generation, record)
        write_durably(self.path, slots, fsync=self.fsync, mode=0o644)
        self._generation = generation
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            os.unlink(self.legacy_path)  # if this unlink is lost, the new file is read first anyway
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """For good: a save after it is refused."""
        self._closed = True
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
