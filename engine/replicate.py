"""Replicate a file or block device: an initial copy, then the blocks that change.

Change detection polls: every ``interval`` the source is re-read and each
``hash_block`` is compared with its hash from the previous pass (BLAKE2b-128).
Changed blocks are sent as coalesced runs of up to ``max_write`` bytes. The
initial copy skips all-zero blocks only when the server has nothing of this disk
yet (a fresh seed disk is sparse, i.e. zero); when resuming a disk the server
already holds, every block is sent, because zeros may overwrite older data.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.agent import Agent, AgentDisk
from protocol import SECTOR_SIZE

HASH_BLOCK = 64 * 1024
MAX_WRITE = 1024 * 1024
_ZERO = bytes(HASH_BLOCK)

Progress = Callable[[int, int], None]  # (bytes scanned, total)


def source_size(path: Path) -> int:
    """Size of a regular file or a block device, rounded up to whole sectors."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return -(-size // SECTOR_SIZE) * SECTOR_SIZE


def _digest(block: bytes | memoryview) -> bytes:
    return hashlib.blake2b(block, digest_size=16).digest()


@dataclass
class PassResult:
    scanned: int = 0
    sent_bytes: int = 0
    writes: int = 0


class Replicator:
    def __init__(self, agent: Agent, path: Path, disk_id: str, *, hash_block: int = HASH_BLOCK,
                 max_write: int = MAX_WRITE) -> None:
        if hash_block % SECTOR_SIZE or max_write % hash_block:
            raise ValueError("hash_block must be a multiple of 512 and max_write a multiple of hash_block")
        self.agent = agent
        self.path = path
        self.disk_id = disk_id
        self.hash_block = hash_block
        self.max_write = max_write
        self.size = source_size(path)
        self.hashes: list[bytes | None] = [None] * (-(-self.size // hash_block))
        self.disk: AgentDisk | None = None

    async def open(self) -> AgentDisk:
        self.disk = await self.agent.open_disk(self.disk_id, self.size, self.hash_block)
        return self.disk

    async def initial_copy(self, progress: Progress | None = None) -> PassResult:
        disk = self.disk or await self.open()
        fresh = disk.acked_seq == 0
        return await self._pass(skip_zero=fresh, progress=progress)

    async def delta_pass(self) -> PassResult:
        return await self._pass(skip_zero=False, progress=None)

    async def run(self, interval: float, progress: Progress | None = None,
                  on_pass: Callable[[PassResult], None] | None = None) -> None:
        """Initial copy, then delta passes forever (cancel to stop)."""
        result = await self.initial_copy(progress)
        await self.agent.flush()
        if on_pass:
            on_pass(result)
        while True:
            await asyncio.sleep(interval)
            result = await self.delta_pass()
            await self.agent.flush()
            if on_pass:
                on_pass(result)

    async def _pass(self, *, skip_zero: bool, progress: Progress | None) -> PassResult:
        assert self.disk is not None
        result = PassResult()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            offset = 0
            while offset < self.size:
                chunk = await asyncio.to_thread(self._read, fd, offset, self.max_write)
                await self._send_changes(offset, chunk, skip_zero, result)
                offset += len(chunk)
                result.scanned = offset
                if progress:
                    progress(offset, self.size)
        finally:
            os.close(fd)
        return result

    def _read(self, fd: int, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        data = os.pread(fd, length, offset)
        if len(data) < length:  # the last partial sector of a file: pad with zeros
            data += bytes(length - len(data))
        return data

    async def _send_changes(self, offset: int, chunk: bytes, skip_zero: bool, result: PassResult) -> None:
        """Send each maximal run of changed blocks in ``chunk`` as one write."""
        view = memoryview(chunk)
        run_start: int | None = None
        for pos in range(0, len(chunk), self.hash_block):
            block = view[pos:pos + self.hash_block]
            index = (offset + pos) // self.hash_block
            digest = _digest(block)
            changed = digest != self.hashes[index]
            if changed and skip_zero and self.hashes[index] is None and block == _ZERO[:len(block)]:
                changed = False
            self.hashes[index] = digest
            if changed and run_start is None:
                run_start = pos
            elif not changed and run_start is not None:
                await self._write(offset + run_start, view[run_start:pos], result)
                run_start = None
        if run_start is not None:
            await self._write(offset + run_start, view[run_start:], result)

    async def _write(self, offset: int, data: memoryview, result: PassResult) -> None:
        assert self.disk is not None
        await self.disk.write(offset, data)
        result.sent_bytes += len(data)
        result.writes += 1
