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

Errors: every failure leaves as :class:`StoreError`; ``transient`` tells a
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
import random
import re
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient, ContainerClient, ExponentialRetry

from engine.config import AzureCredentials, AzureStoreConfig
from engine.store.base import StoreError
from protocol import LogBlobError
from protocol.logblob import HEADER_FIXED, BlobHeader, parse_blob_name

log = logging.getLogger(__name__)

# The SDK logs every request and response at INFO (URL with the query redacted, headers with Authorization
# redacted): useful when debugging, noise in a server's log. Quiet it unless the operator chose a level.
_HTTP_LOGGER = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
if _HTTP_LOGGER.level == logging.NOTSET:
    _HTTP_LOGGER.setLevel(logging.WARNING)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_HEADER_PEEK = HEADER_FIXED.size + 64  # fixed header + the longest disk id


class _Backoff(ExponentialRetry):
    """The storage SDK's retry policy with a sensible schedule: ``initial * 2**n`` capped, full jitter.

    (The SDK's default waits 15 s, 18 s, 24 s: far too long for a pipeline that has its own retry on top.)
    """

    def __init__(self, *, initial_s: float, max_s: float, retries: int) -> None:
        super().__init__(initial_backoff=initial_s, increment_base=2, retry_total=retries, random_jitter_range=0,
                         retry_connect=retries, retry_read=retries, retry_status=retries)
        self._initial = initial_s
        self._max = max_s

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return min(self._max, self._initial * 2 ** settings["count"]) * random.uniform(0.5, 1.0)


class AzureBlobStore:
    """CacheStore on an Azure storage account (or Azurite)."""

    def __init__(self, settings: AzureStoreConfig, credentials: AzureCredentials | None = None) -> None:
        creds = credentials or settings.credentials()
        self.settings = settings
        self.container = settings.container
        self.prefix = settings.prefix
        self._secrets = _secret_strings(creds)
        client_options: dict[str, Any] = {
            "retry_policy": _Backoff(initial_s=settings.retry_initial_ms / 1000, max_s=settings.retry_max_ms / 1000,
                                     retries=settings.retry_total),
            "connection_timeout": min(settings.timeout_s, 20.0),
            "read_timeout": settings.timeout_s,
            "max_single_put_size": int(settings.single_put_max_bytes),
            "max_block_size": int(settings.block_bytes),
            "max_single_get_size": 32 * 1024 * 1024,
            "max_chunk_get_size": 4 * 1024 * 1024,
        }
        try:
            if creds.connection_string is not None:
                self._service = BlobServiceClient.from_connection_string(
                    creds.connection_string.get_secret_value(), **client_options)
            else:
                assert creds.account_url is not None and creds.credential is not None
                secret = creds.credential.get_secret_value()
                if creds.method == "sas_token":
                    credential: Any = secret.lstrip("?")
                else:
                    credential = {"account_name": _account_from_url(creds.account_url), "account_key": secret}
                self._service = BlobServiceClient(creds.account_url, credential=credential, **client_options)
        except (ValueError, TypeError) as exc:
            raise StoreError(f"azure store: cannot use the credentials from {creds.source}: "
                             f"{self._scrub(str(exc))}", transient=False) from None
        self.account = self._service.account_name or "?"
        self._container: ContainerClient = self._service.get_container_client(self.container)
        self._container_ready = False
        self._ready_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AzureBlobStore(account={self.account!r}, container={self.container!r}, prefix={self.prefix!r})"

    # ------------------------------------------------------------------ names

    def _blob(self, name: str) -> str:
        if parse_blob_name(name) is None:
            raise ValueError(f"not a log-blob name: {name!r}")
        return self.prefix + name

    # ------------------------------------------------------------------ CacheStore

    async def put_file(self, name: str, path: Path) -> None:
        blob = self._blob(name)
        data = await asyncio.to_thread(path.read_bytes)
        metadata = self._metadata(name, data)
        await self._ensure_container()
        try:
            await self._container.upload_blob(
                blob, data, overwrite=True, metadata=metadata, max_concurrency=self.settings.max_concurrency,
                content_settings=ContentSettings(content_type="application/octet-stream"),
            )
        except Exception as exc:  # noqa: BLE001 - every failure leaves as a StoreError
            if _is_container_missing(exc):
                self._container_ready = False  # deleted under us: create it again on the retry
            raise self._error("upload", name, exc) from None

    async def list_blobs(self) -> list[str]:
        names: list[str] = []
        try:
            async for blob in self._container.list_blob_names(name_starts_with=self.prefix or None):
                name = blob[len(self.prefix):]
                if parse_blob_name(name) is not None:
                    names.append(name)
        except ResourceNotFoundError:
            return []  # no container yet: nothing was stored
        except Exception as exc:  # noqa: BLE001
            raise self._error("list", None, exc) from None
        return sorted(names)  # the service lists in this order already; sorting makes it a guarantee

    async def get(self, name: str) -> bytes:
        blob = self._blob(name)
        try:
            downloader = await self._container.download_blob(blob, max_concurrency=self.settings.max_concurrency)
            return await downloader.readall()
        except Exception as exc:  # noqa: BLE001
            raise self._error("download", name, exc) from None

    async def delete(self, name: str) -> None:
        blob = self._blob(name)
        try:
            await self._container.delete_blob(blob)
        except ResourceNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001
            raise self._error("delete", name, exc) from None

    async def close(self) -> None:
        await self._container.close()
        await self._service.close()

    # ------------------------------------------------------------------ extras

    async def get_metadata(self, name: str) -> dict[str, str]:
        """The blob's metadata (its header fields); raises StoreError if it does not exist."""
        try:
            props = await self._container.get_blob_client(self._blob(name)).get_blob_properties()
        except Exception as exc:  # noqa: BLE001
            raise self._error("read the properties of", name, exc) from None
        return dict(props.metadata or {})

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _metadata(name: str, data: bytes) -> dict[str, str]:
        try:
            header = BlobHeader.unpack(memoryview(data)[:_HEADER_PEEK], name=name)
        except LogBlobError as exc:
            raise StoreError(f"azure store: {name} is not a log blob: {exc}", transient=False) from None
        if (header.disk, header.first_seq, header.last_seq) != parse_blob_name(name):
            raise StoreError(f"azure store: {name} holds disk {header.disk!r} sequences {header.first_seq}.."
                             f"{header.last_seq}, which does not match its name", transient=False)
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
            try:
                await self._container.create_container()
                log.info("azure store: created container %r in account %r", self.container, self.account)
            except ResourceExistsError:
                pass
            except HttpResponseError as exc:
                if exc.status_code == 403 and not isinstance(exc, ClientAuthenticationError):
                    # A container-scoped SAS may not create containers; the container may well exist.
                    log.debug("azure store: not allowed to create container %r; assuming it exists", self.container)
                else:
                    raise self._error("create", None, exc) from None
            except Exception as exc:  # noqa: BLE001
                raise self._error("create", None, exc) from None
            self._container_ready = True

    def _error(self, op: str, name: str | None, exc: BaseException) -> StoreError:
        """A StoreError naming account, container and blob, with a scrubbed cause and no secret.

        ``op`` is a verb: "upload <blob> in container 'c' of account 'a'" / "list container 'c' of account 'a'".
        """
        what = f"{op} {self.prefix}{name}" if name else f"{op} container {self.container!r}"
        where = f"in container {self.container!r} of account {self.account!r}" if name else \
            f"of account {self.account!r}"
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        code = getattr(code, "value", code)
        detail = self._scrub(_first_line(getattr(exc, "reason", None) or getattr(exc, "message", None)
                                         or str(exc)))
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403) or _is_signing_error(exc):
            return StoreError(
                f"azure store: not authorized to {what} {where} (HTTP {status or '-'} {code or type(exc).__name__}): "
                "check the account key / SAS token / connection string in store.azure or the environment, and "
                "the SAS permissions and expiry", transient=False)
        if isinstance(exc, ResourceNotFoundError):  # a missing container is re-created on the next attempt
            return StoreError(f"azure store: cannot {what} {where}: not found (HTTP {status} {code})",
                              transient=_is_container_missing(exc) or not name)
        if isinstance(exc, HttpResponseError) and status is not None:
            transient = status in TRANSIENT_STATUS or status >= 500
            return StoreError(f"azure store: cannot {what} {where}: HTTP {status} {code or ''} {detail}".rstrip(),
                              transient=transient)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError, aiohttp.ClientError, asyncio.TimeoutError,
                            TimeoutError, ConnectionError, OSError)):
            return StoreError(f"azure store: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=True)
        if isinstance(exc, AzureError):
            return StoreError(f"azure store: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=True)
        # Not a network or service error: a bug or a misuse; retrying will not help but the pipeline will log it.
        return StoreError(f"azure store: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=False)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _SIG.sub(r"\1***", text)
        return _ACCOUNT_KEY.sub(r"\1***", text)


_SIG = re.compile(r"((?:^|[?&;\s'\"])sig=)[^&\s'\";]+", re.I)
_ACCOUNT_KEY = re.compile(r"(AccountKey=|SharedAccessSignature=)[^;\s'\"]+", re.I)


def _secret_strings(creds: AzureCredentials) -> list[str]:
    """Every string that must never be printed: the secrets, and their distinctive parts."""
    out = []
    for secret in (creds.connection_string, creds.credential):
        if secret is None:
            continue
        value = secret.get_secret_value()
        out.append(value)
        for part in re.split(r"[;&?]", value):
            key, _, val = part.partition("=")
            if key.strip().lower() in {"accountkey", "sharedaccesssignature", "sig"} and len(val) >= 8:
                out += [val, urllib.parse.unquote(val), urllib.parse.quote(val, safe="")]
    return sorted({s for s in out if s}, key=len, reverse=True)


def _account_from_url(url: str) -> str:
    """``https://acct.blob.core.windows.net`` → acct; ``http://127.0.0.1:10000/devstoreaccount1`` → the path."""
    match = re.match(r"https?://([^/:]+)(?::\d+)?(?:/([^/?#]+))?", url)
    if not match:
        return "?"
    host, path = match.groups()
    if re.fullmatch(r"[\d.]+|localhost|\[.*\]", host) and path:
        return path
    return host.split(".")[0]


def _first_line(text: object) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line[:200]


def _is_container_missing(exc: BaseException) -> bool:
    return isinstance(exc, ResourceNotFoundError) and getattr(exc, "error_code", None) == "ContainerNotFound"


def _is_signing_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "AzureSigningError"
