"""The cache store on Azure Blob Storage (``azure.storage.blob.aio``): ASR's "cache storage account".

Log blobs are block blobs named ``<prefix><disk>/<first:020d>-<last:020d>.bflog``.
A blob of up to ``single_put_max_bytes`` is written with one Put Blob request
(one transaction, atomic); a larger one as blocks of ``block_bytes`` committed
with Put Block List, which is just as atomic. Either way an upload of the same
sequence range overwrites identical content under the same name, so retries
and restarts are idempotent. The header fields ride along as blob metadata, so
an operator (or a tool) can see what a blob holds without the key.

Listing returns names in lexicographic order, which for these zero-padded
names is sequence order per disk.

Errors (mapped by engine/azure_common.py, shared with the Azure seed volume):
every failure leaves as :class:`StoreError`; ``transient`` tells a
throttled or unreachable account (HTTP 408/429/5xx, timeouts, resets) from one
that refuses us (401/403, a bad key, an invalid request). The SDK retries each
request a few times (exponential backoff, full jitter, capped) before the
error reaches the pipeline, which then retries the upload forever. No message
this module produces contains a secret: exception text is reduced to status,
error code and a scrubbed first line, and the original exception is not
chained (its text and its request URL could hold a SAS signature).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.blob import ContentSettings

from engine.azure_common import AzureContainer, is_container_missing
from engine.config import AzureCredentials, AzureStoreConfig
from engine.store.base import StoreError, UntrustedBlobFiles
from protocol import LogBlobError
from protocol.logblob import HEADER_FIXED, BlobHeader, KeyLookup, authenticate_blob, check_named, parse_blob_name

log = logging.getLogger(__name__)

_HEADER_PEEK = HEADER_FIXED.size + 64  # fixed header + the longest disk id


class AzureBlobStore(AzureContainer):
    """CacheStore on an Azure storage account (or Azurite)."""

    label = "azure store"
    auth_hint = ("check the account key / SAS token / connection string in store.azure or the environment, and the "
                 "SAS permissions and expiry")

    def __init__(self, settings: AzureStoreConfig, credentials: AzureCredentials | None = None, *,
                 keys: KeyLookup | None = None) -> None:
        """``keys``: authenticate every blob file before it is uploaded (the server's uploads)."""
        self.keys = keys
        super().__init__(settings, credentials or settings.credentials(), settings.container, settings.prefix,
                         max_single_get_size=32 * 1024 * 1024, max_chunk_get_size=4 * 1024 * 1024)
        self._container_ready = False
        self._ready_lock = asyncio.Lock()

    def missing_is_transient(self, exc: BaseException, name: str | None) -> bool:
        return is_container_missing(exc) or not name  # a missing container is re-created on the next attempt

    # ------------------------------------------------------------------ names

    def _blob(self, name: str) -> str:
        if parse_blob_name(name) is None:
            raise ValueError(f"not a log-blob name: {name!r}")
        return self.prefix + name

    # ------------------------------------------------------------------ CacheStore

    async def make_directory(self, disk: str) -> None:
        """Nothing: a container has no directories (names carry the disk)."""

    async def remove_temporaries(self) -> int:
        return 0  # a Put Blob is atomic: no temporary names

    async def put_file(self, name: str, path: Path) -> None:
        blob = self._blob(name)
        data = await asyncio.to_thread(self._read, path, name)
        metadata = self._metadata(name, data)
        await self._ensure_container()
        try:
            await self.client.upload_blob(
                blob, data, overwrite=True, metadata=metadata, max_concurrency=self.settings.max_concurrency,
                content_settings=ContentSettings(content_type="application/octet-stream"),
            )
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a StoreError
            if is_container_missing(exc):
                self._container_ready = False  # deleted under us: create it again on the retry
            raise self.error("upload", name, exc) from None

    def _read(self, path: Path, name: str) -> bytes:
        """A spool file is not synced (the write-ahead log holds its records until the store has them): after
        a failed writeback whose pages were evicted, reading it returns what the disk holds. Uploaded
        unchecked, that would count as stored and the log let go of the writes."""
        data = path.read_bytes()
        if self.keys is not None:
            try:
                header, _ = authenticate_blob(data, self.keys, name=name)
                check_named(header, name)  # a reused spool file (engine/filepool.py) read back as its old blob
            except LogBlobError as exc:
                raise UntrustedBlobFiles({path: exc}) from None
        return data

    async def list_blobs(self) -> list[str]:
        names: list[str] = []
        try:
            async for blob in self.client.list_blob_names(name_starts_with=self.prefix or None):
                name = blob[len(self.prefix):]
                if parse_blob_name(name) is not None:
                    names.append(name)
        except ResourceNotFoundError:
            return []  # no container yet: nothing was stored
        except Exception as exc:  # noqa: BLE001
            raise self.error("list", None, exc) from None
        return sorted(names)  # the service lists in this order already; sorting makes it a guarantee

    async def get(self, name: str) -> bytes:
        blob = self._blob(name)
        try:
            downloader = await self.client.download_blob(blob, max_concurrency=self.settings.max_concurrency)
            return await downloader.readall()
        except Exception as exc:  # noqa: BLE001
            raise self.error("download", name, exc) from None

    async def delete(self, name: str) -> None:
        blob = self._blob(name)
        try:
            await self.client.delete_blob(blob)
        except ResourceNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self.error("delete", name, exc) from None

    async def close(self) -> None:
        await self.close_clients()

    # ------------------------------------------------------------------ extras

    async def get_metadata(self, name: str) -> dict[str, str]:
        """The blob's metadata (its header fields); raises StoreError if it does not exist."""
        try:
            props = await self.client.get_blob_client(self._blob(name)).get_blob_properties()
        except Exception as exc:  # noqa: BLE001
            raise self.error("read the properties of", name, exc) from None
        return dict(props.metadata or {})

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _metadata(name: str, data: bytes) -> dict[str, str]:
        try:
            header = BlobHeader.unpack(memoryview(data)[:_HEADER_PEEK], name=name)
        except LogBlobError as exc:
            raise StoreError(f"azure store: {name} is not a log blob: {exc}", transient=False) from None
        try:
            check_named(header, name)
        except LogBlobError as exc:
            raise StoreError(f"azure store: {exc}", transient=False) from None
        return {
            "disk": header.disk,
            "disk_size": str(header.disk_size),
            "first_seq": str(header.first_seq),
            "last_seq": str(header.last_seq),
            "record_count": str(header.record_count),
            "key_id": header.key_id.hex(),
            "last_source_us": str(header.last_source_us),
            "created_us": str(header.created_us),
            "format_version": str(header.version),
        }

    async def _ensure_container(self) -> None:
        if self._container_ready:
            return
        async with self._ready_lock:
            if self._container_ready:
                return
            await self.create_container()
            self._container_ready = True
