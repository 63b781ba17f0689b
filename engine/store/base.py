"""The cache-store contract shared by the local directory and Azure Blob Storage."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Protocol


class StoreError(Exception):
    """A store operation failed; ``transient`` says whether retrying can help."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class UntrustedBlobFiles(OSError):
    """Blob files a store would not take as they are, and stored none of: a local store failed to sync their
    data (syncing again would report success without writing it: engine.fsutil.WritebackError), or what a
    remote store read of them does not authenticate. Each must be written again into a new file, from a copy
    that authenticates, before it is put again."""

    def __init__(self, failures: dict[Path, Exception]) -> None:
        path, first = next(iter(failures.items()))
        super().__init__(errno.EIO, f"{len(failures)} blob file(s) cannot be trusted as they are, e.g. {path}: "
                                    f"{first}")
        self.paths = frozenset(failures)


class CacheStore(Protocol):
    """Blob names come from ``protocol.logblob.blob_name``: the same sequence range
    always has the same name, so every put is idempotent and a retry or a restart
    can never duplicate data."""

    async def put_file(self, name: str, path: Path) -> None:
        """Store the file at ``path`` under ``name``, durably. UntrustedBlobFiles if the store cannot trust what
        the file holds (its sync failed, or what was read does not authenticate)."""

    async def make_directory(self, disk: str) -> None:
        """Prepare whatever ``disk``'s blobs need before the first one arrives (nothing in a container
        store); ``put_file`` must work without it."""

    async def remove_temporaries(self) -> int:
        """At the uploader's start: remove what a crash in the middle of storing a blob left under a
        temporary name (none in a container store); returns how many."""

    async def list_blobs(self) -> list[str]:
        """All log-blob names, sorted (per disk, by first sequence)."""

    async def get(self, name: str) -> bytes: ...

    async def delete(self, name: str) -> None:
        """Remove ``name``; removing a missing blob is not an error."""

    async def close(self) -> None: ...
