"""Reset a disk's seed to empty, for a resync: `blockferry disk reset`.

A disk whose acknowledged writes were lost on the server (its agent stops and says so) or whose store
blobs follow a lost gap (its applier waits at the gap for ever) can only be replicated anew. The seed
is emptied and its recovery points released, and its applied sequence set to the highest sequence the
seed, the cache store, the server's upload watermark, its spool and its write-ahead log hold of the
disk. Started again, the server resumes the disk after that (engine/pipeline.py, Pipeline.start), the
applier deletes every older blob as applied, and a restarted agent's resync, numbered from there, fills
the empty seed. Nothing may run meanwhile: the seed's applier lock and the server's lock are held.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from engine.applier import ApplierLock, ServerLock
from engine.config import Config
from engine.disks import DiskRegistry
from engine.keys import KeyRing
from engine.recovery.state_file import read_state_record
from engine.recovery.volume import LocalVolume, SeedState
from engine.spool import UploadWatermarks
from engine.store import CacheStore
from engine.wal import logged_seqs
from protocol.logblob import BLOB_SUFFIX, parse_blob_name


class ResetError(Exception):
    """The disk cannot be reset here; the message says why."""


@dataclass(frozen=True)
class ResetResult:
    disk: str
    applied_seq: int  # the emptied seed's: the server resumes the disk after it
    released_points: int


async def reset_disk(config: Config, store: CacheStore, keys: KeyRing, disk: str) -> ResetResult:
    """Empty ``disk``'s seed (see the module's docstring); raises ApplierLocked while an applier or a server
    runs on these directories, ResetError if the disk cannot be reset here (not a local seed, not known, or its
    failover committed)."""
    if config.applier.volume != "local":
        raise ResetError(f"disk {disk!r}: only a local seed can be reset here (applier.volume is "
                         f"{config.applier.volume!r})")
    server_lock, applier_lock = ServerLock(config.server.data_dir), ApplierLock(config.seed_dir)
    server_lock.acquire(f"pid {os.getpid()} (blockferry disk reset {disk})")
    try:
        applier_lock.acquire(f"pid {os.getpid()} (blockferry disk reset {disk})")
        try:
            return await _reset(config, store, keys, disk)
        finally:
            applier_lock.release()
    finally:
        server_lock.release()


async def _reset(config: Config, store: CacheStore, keys: KeyRing, disk: str) -> ResetResult:
    record = read_state_record(config.seed_dir, disk)
    if record is not None and record.get("committed_failover"):
        raise ResetError(f"disk {disk!r} was failed over and the failover committed: its replication stopped for "
                         "good, and a reset would start it again over the failed-over disk")
    registered = DiskRegistry(config.state_dir / "disks").get(disk)
    if record is None and registered is None:  # (a seed never applied to: the disk registry knows its size)
        raise ResetError(f"disk {disk!r} has neither a seed in {config.seed_dir} nor a registration on this server")
    volume = LocalVolume(config.seed_dir, disk, fsync=True)
    try:
        state = await volume.load_state() or SeedState(disk, registered.size if registered else 0)
        server_seq = await asyncio.to_thread(_server_seq, config, keys, disk)
        held = max(state.applied_seq, await _stored_seq(store, disk), server_seq)
        # points first: an entry left over an emptied image would roll a copy back into a wrong one; then the
        # state, so that a crash before the image is emptied leaves a resync to overwrite it (and a second
        # reset to finish the job)
        entries = await volume.list_entries()
        for name in entries:
            await volume.delete_entry(name)
        await volume.save_state(SeedState(disk, state.disk_size, applied_seq=held))
        await asyncio.to_thread(_empty_image, volume.image_path, state.disk_size)
        return ResetResult(disk, held, len(entries))
    finally:
        await volume.close()


async def _stored_seq(store: CacheStore, disk: str) -> int:
    lasts = [parsed[2] for name in await store.list_blobs() if (parsed := parse_blob_name(name)) and parsed[0] == disk]
    return max(lasts, default=0)


def _server_seq(config: Config, keys: KeyRing, disk: str) -> int:
    """The highest sequence of the disk the server holds: its upload watermark, spool blobs and log."""
    watermark = UploadWatermarks(config.state_dir / "uploaded.json").seqs.get(disk, 0)
    spooled = [parsed[2] for path in (config.spool_dir / disk).glob("*" + BLOB_SUFFIX)
               if (parsed := parse_blob_name(f"{disk}/{path.name}")) is not None]
    logged = logged_seqs(config.spool_dir / ".wal", keys.lookup).get(disk, 0)
    return max(watermark, logged, *spooled)


def _empty_image(path: Path, size: int) -> None:
    """Sparse zeros: the blocks go back to the file system."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
