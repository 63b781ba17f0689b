"""Which agent owns which disk, and the disk's geometry, persisted across restarts.

An agent may only touch disks it opened with its own credentials: the first
agent to open a disk id owns it from then on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.fsutil import write_durably
from protocol import ErrorCode, RemoteProtocolError


@dataclass(frozen=True)
class DiskInfo:
    disk: str
    owner: str
    size: int
    block_size: int


class DiskRegistry:
    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)
        self._disks: dict[str, DiskInfo] = {}
        for path in self._dir.glob("*.json"):
            info = DiskInfo(**json.loads(path.read_text(encoding="utf-8")))
            self._disks[info.disk] = info

    def get(self, disk: str) -> DiskInfo | None:
        return self._disks.get(disk)

    def __iter__(self) -> Iterator[DiskInfo]:
        return iter(self._disks.values())

    def claim(self, disk: str, agent: str, size: int, block_size: int) -> tuple[DiskInfo, bool]:
        """Return the disk's info, registering it for ``agent`` if new (second value: is new).

        Blocking (an fsync on first claim); rare, so called from the loop.
        """
        info = self._disks.get(disk)
        if info is None:
            info = DiskInfo(disk, agent, size, block_size)
            write_durably(self._dir / f"{disk}.json", json.dumps(asdict(info)).encode(), mode=0o644)
            self._disks[disk] = info
            return info, True
        if info.owner != agent:
            raise RemoteProtocolError(ErrorCode.DISK_NOT_ALLOWED, "disk belongs to another agent", disk=disk)
        if (info.size, info.block_size) != (size, block_size):
            raise RemoteProtocolError(
                ErrorCode.DISK_MISMATCH,
                f"disk was registered with size {info.size} and block size {info.block_size}, "
                f"not {size} and {block_size}",
                disk=disk,
            )
        return info, False
