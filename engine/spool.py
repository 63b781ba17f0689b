"""The process server's spool: sealed blobs waiting for upload.

The spool directory also holds the write-ahead log (``.wal``, engine/wal.py) that acknowledgements
follow; a blob here is the sealed form of records the log already holds, which is why a blob is not
fsynced: the log keeps its records until the cache store has them durably, so a blob that a crash
tore or lost costs a replay from the log, never data. Blobs are compressed and encrypted (nothing in
clear text), and kept until the cache store has them *and* the upload watermark recording that is
durable. After a crash the durable sequence of a disk starts as

    max(upload watermark, last sequence of the contiguous run of intact spooled blobs after it)

and the log's records after that extend it (Pipeline.start). A blob after a hole (spool writes
complete in any order, and a torn blob is removed) is dropped: its records are replayed from the log,
which is appended in order. That durable sequence is what the server tells a reconnecting agent to
resume from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.filepool import FilePool
from engine.fsutil import fsync_dir, sync_or_rewrite, write_durably, write_in_place
from protocol import LogBlobError
from protocol.logblob import (
    BLOB_SUFFIX,
    BlobHeader,
    KeyLookup,
    authenticate_blob,
    blob_name,
    check_named,
    open_blob,
)

log = logging.getLogger(__name__)


def pool_dir(spool_dir: Path) -> Path:
    """Where used blob files wait to be overwritten: the spool's, and the local cache store's once applied."""
    return spool_dir / ".recycle"


@dataclass(frozen=True)
class SpooledBlob:
    name: str
    path: Path
    size: int
    header: BlobHeader


class Spool:
    def __init__(self, directory: Path, max_bytes: int, *, fsync: bool = True) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.used_bytes = 0  # owned by the event loop
        directory.mkdir(parents=True, exist_ok=True)
        self.pool = FilePool(pool_dir(directory))  # blob files to overwrite instead of creating new ones
        self._directories: set[Path] = set()  # disk directories known to exist: no mkdir call per blob

    @property
    def full(self) -> bool:
        return self.used_bytes >= self.max_bytes

    def path_of(self, name: str) -> Path:
        return self.directory / name

    def make_directory(self, disk: str) -> None:
        """Blocking: the directory ``disk``'s blobs are written to (made by the first write otherwise)."""
        self._make_directory(self.path_of(blob_name(disk, 0, 0)).parent)

    def _make_directory(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self._directories.add(directory)

    def write(self, name: str, data: memoryview) -> Path:
        """Blocking: put one sealed blob in the spool (called from a spool worker thread).

        Not fsynced (the log holds its records): two flushes of the disk per blob were what bounded
        ingest at 1000 disks, whose blobs are small and many. A local cache store makes a blob's data
        durable before it links it (LocalStore.put_files); a remote one holds a copy once it acknowledges.
        Written under its final name, not renamed into place: :meth:`recover` authenticates every blob
        whole and checks its name against its header, so a torn one is never taken for a blob.
        """
        path = self.path_of(name)
        if path.parent not in self._directories:
            self._make_directory(path.parent)
        try:
            write_in_place(path, data, mode=0o600, reuse=self.pool.take)
        except FileNotFoundError:  # the directory was removed since: make it again, once
            self._make_directory(path.parent)
            write_in_place(path, data, mode=0o600, reuse=self.pool.take)
        return path

    def discard(self, paths: list[Path]) -> None:
        """Blocking: the spool is done with these blobs (the cache store has them)."""
        for path in paths:
            self.pool.give(path)

    def rewrite(self, path: Path, keys: KeyLookup) -> None:
        """Blocking: write a blob a store would not trust as it is (UntrustedBlobFiles) again, into a new file
        under its name: after a failed sync, synced again as it is, the file would report success without its
        data on disk (WritebackError).

        What the page cache still holds is the blob if it authenticates whole, and then goes to the new file.
        If it does not, the file is removed and LogBlobError raised: its records are in the write-ahead log
        (a blob leaves it only once stored), which the next start replays."""
        data = path.read_bytes()
        try:
            _named_header(path, data)
            authenticate_blob(data, keys, name=path.name)
        except LogBlobError:
            path.unlink(missing_ok=True)
            raise
        write_durably(path, data, fsync=self.fsync)

    def recover(self, keys: KeyLookup) -> list[SpooledBlob]:
        """Blocking, at start-up: the intact blobs left by the previous run, in order.

        Temporary files and blobs that do not authenticate completely (a crash tore or never wrote
        what was not fsynced) are removed: the write-ahead log replays their records. A blob sealed
        under a key no longer in the key ring stops the start instead (``keys`` is the ring).
        """
        found: list[SpooledBlob] = []
        # a disk id starts with a letter or digit: ".wal" (the write-ahead log) is not a disk's
        for disk_dir in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(disk_dir.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    path.unlink()
                    continue
                if not path.name.endswith(BLOB_SUFFIX):
                    continue
                data = path.read_bytes()
                try:
                    header = _named_header(path, data)
                except LogBlobError as exc:
                    _remove_torn(path, exc)
                    continue
                if keys(header.key_id) is None:  # not damage: the key ring lacks a key it needs
                    raise LogBlobError(f"sealed with key id {header.key_id.hex()}, which is not in the key ring "
                                       "(keys.old_key_files)", disk=header.disk, name=path.name)
                try:
                    open_blob(data, keys, name=path.name)
                except LogBlobError as exc:
                    _remove_torn(path, exc)
                    continue
                if self.fsync:  # read from the page cache after a kill -9: it counts once it is on disk
                    try:
                        if sync_or_rewrite(path, data):  # what was read authenticated: that copy is the blob
                            log.error("spool: %s could not be synced; written again into a new file", path)
                    except OSError as exc:  # the log holds its records (beyond the saved watermark)
                        log.error("spool: %s cannot be made durable (%s); the write-ahead log replays its "
                                  "records", path, exc)
                        path.unlink(missing_ok=True)
                        continue
                size = len(data)
                found.append(SpooledBlob(blob_name(header.disk, header.first_seq, header.last_seq), path, size,
                                         header))
                self.used_bytes += size
            if self.fsync:  # a name renamed into place just before a kill -9 may not be on disk yet
                fsync_dir(disk_dir)
        return found


def _named_header(path: Path, data: bytes) -> BlobHeader:
    """The header of the blob file at ``path``, which must name the blob the file is named after."""
    header = BlobHeader.unpack(data, name=path.name)
    check_named(header, f"{path.parent.name}/{path.name}")  # a reused file's old content (engine/filepool.py)
    return header


def _remove_torn(path: Path, exc: LogBlobError) -> None:
    log.warning("spool: %s: %s; the crash cut its write short, so it is removed and its records are replayed "
                "from the write-ahead log", path, exc)
    path.unlink()


class UploadWatermarks:
    """Highest sequence per disk whose blobs are all in the cache store (one small JSON file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.seqs: dict[str, int] = {}
        if path.exists():
            # what a start acts on must be on disk: a save cut off by a kill -9 between its rename and its
            # directory fsync is in the page cache only, and the spool and the log let go by it
            with open(path, "rb") as handle:
                self.seqs = json.loads(handle.read())
                os.fsync(handle.fileno())
            fsync_dir(path.parent)

    def save(self, snapshot: dict[str, int]) -> None:
        """Blocking: persist ``snapshot`` (a copy taken on the event loop) atomically; run in a thread."""
        write_durably(self.path, json.dumps(snapshot, sort_keys=True).encode(), mode=0o644)
