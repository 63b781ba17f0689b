"""The process server's spool: sealed blobs, fsynced, waiting for upload.

The spool directory also holds the write-ahead log (``.wal``, engine/wal.py) that acknowledgements
follow; a blob here is the sealed form of records the log already holds. Blobs are compressed and
encrypted (nothing in clear text), and kept until the cache store has them *and* the upload
watermark recording that is durable. After a crash the durable sequence of a disk starts as

    max(upload watermark, last sequence of the contiguous run of spooled blobs after it)

and the log's records after that extend it (Pipeline.start). Spool writes complete in any order, so
a blob after a hole is dropped: its records are replayed from the log, which is appended in order.
That durable sequence is what the server tells a reconnecting agent to resume from.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.filepool import FilePool
from engine.fsutil import fsync_dir, write_durably
from protocol import LogBlobError
from protocol.logblob import BLOB_SUFFIX, GCM_TAG_SIZE, HEADER_FIXED, BlobHeader, blob_name

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

    @property
    def full(self) -> bool:
        return self.used_bytes >= self.max_bytes

    def path_of(self, name: str) -> Path:
        return self.directory / name

    def write(self, name: str, data: memoryview) -> Path:
        """Blocking: persist one sealed blob (called from a spool worker thread)."""
        path = self.path_of(name)
        path.parent.mkdir(exist_ok=True)
        write_durably(path, data, fsync=self.fsync, mode=0o600, reuse=self.pool.take)
        return path

    def discard(self, paths: list[Path]) -> None:
        """Blocking: the spool is done with these blobs (the cache store has them)."""
        for path in paths:
            self.pool.give(path)

    def recover(self) -> list[SpooledBlob]:
        """Blocking, at start-up: the blobs left by the previous run, in order.

        Temporary files are torn writes that were never acknowledged; they are
        removed. A complete-looking blob with a bad header is kept aside (renamed
        ``.bad``) and reported, never uploaded.
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
                try:
                    with open(path, "rb") as handle:
                        head = handle.read(HEADER_FIXED.size + 256)
                    header = BlobHeader.unpack(head, name=path.name)
                    size = path.stat().st_size
                    if size != header.size + header.payload_size + GCM_TAG_SIZE:
                        raise LogBlobError(f"size {size} does not match its header", name=path.name)
                except LogBlobError as exc:
                    log.error("spool: %s; kept aside as %s.bad", exc, path)
                    os.replace(path, path.with_name(path.name + ".bad"))
                    continue
                found.append(SpooledBlob(blob_name(header.disk, header.first_seq, header.last_seq), path, size,
                                         header))
                self.used_bytes += size
            if self.fsync:  # a name renamed into place just before a kill -9 may not be on disk yet
                fsync_dir(disk_dir)
        return found


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
