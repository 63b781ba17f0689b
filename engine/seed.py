"""Seed disks: one sparse file per protected disk, holding the latest applied state."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.fsutil import write_durably


@dataclass
class SeedState:
    """Progress of one seed disk, persisted only after the disk itself is fsynced."""

    disk: str
    disk_size: int
    applied_seq: int = 0
    last_source_us: int = 0
    applied_bytes: int = 0


class SeedDisk:
    """A sparse image file plus its state file. Blocking methods: call from a worker thread."""

    def __init__(self, directory: Path, disk: str, disk_size: int, *, fsync: bool = True) -> None:
        self.image_path = directory / f"{disk}.img"
        self.state_path = directory / f"{disk}.state.json"
        self.fsync = fsync
        directory.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            self.state = SeedState(**json.loads(self.state_path.read_text()))
        else:
            self.state = SeedState(disk, disk_size)
        self._fd = os.open(self.image_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.ensure_size(max(disk_size, self.state.disk_size))

    @staticmethod
    def load_state(directory: Path, disk: str) -> SeedState | None:
        path = directory / f"{disk}.state.json"
        return SeedState(**json.loads(path.read_text())) if path.exists() else None

    def ensure_size(self, size: int) -> None:
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)  # sparse: unwritten ranges cost no space
        self.state.disk_size = max(self.state.disk_size, size)

    def pwrite(self, offset: int, data: memoryview) -> None:
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def commit(self, applied_seq: int, last_source_us: int, applied_bytes: int) -> None:
        """Make the applied writes durable, then record how far they go."""
        if self.fsync:
            os.fsync(self._fd)
        self.state.applied_seq = applied_seq
        self.state.last_source_us = max(self.state.last_source_us, last_source_us)
        self.state.applied_bytes += applied_bytes
        write_durably(self.state_path, json.dumps(asdict(self.state)).encode(), fsync=self.fsync, mode=0o644)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
