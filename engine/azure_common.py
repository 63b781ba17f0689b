"""What every Azure Blob Storage user in the engine shares: the client, its retry policy, secret scrubbing and
the error → :class:`StoreError` mapping.

Used by the cache store (engine/store/azure.py) and the seed volume (engine/recovery/azure_volume.py), so both
authenticate the same way (connection string, or account URL with a SAS token or an account key), retry the
same way (the SDK's per-request retry with a short exponential schedule and full jitter), classify failures the
same way (``transient``: HTTP 408/429/5xx, timeouts, resets; not transient: 401/403, a bad key, an invalid
request) and never print a secret: messages carry a status, an error code and a scrubbed first line, and the
original exception is never chained (its text and its request URL could hold a SAS signature).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import urllib.parse
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
from azure.storage.blob.aio import BlobServiceClient, ContainerClient, ExponentialRetry

from engine.config import AzureCredentials, AzureStoreConfig
from engine.store.base import StoreError

# The SDK logs every request and response at INFO (URL with the query redacted, headers with Authorization
# redacted): useful when debugging, noise in a server's log. Quiet it unless the operator chose a level.
_HTTP_LOGGER = logging.getLogger("azure.core.pipeline.policies.http_logging_policy")
if _HTTP_LOGGER.level == logging.NOTSET:
    _HTTP_LOGGER.setLevel(logging.WARNING)

_log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class Backoff(ExponentialRetry):
    """The storage SDK's retry policy with a sensible schedule: ``initial * 2**n`` capped, full jitter.

    (The SDK's default waits 15 s, 18 s, 24 s: far too long for callers that have their own retry on top.)
    """

    def __init__(self, *, initial_s: float, max_s: float, retries: int) -> None:
        super().__init__(initial_backoff=initial_s, increment_base=2, retry_total=retries, random_jitter_range=0,
                         retry_connect=retries, retry_read=retries, retry_status=retries)
        self._initial = initial_s
        self._max = max_s

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        return backoff_delay(settings["count"], self._initial, self._max)


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """``initial * 2**attempt``, capped at ``max_s``, times a jitter in [0.5, 1)."""
    return min(max_s, initial_s * 2 ** min(attempt, 30)) * random.uniform(0.5, 1.0)


class Scrubber:
    """Removes every form of the credentials' secrets (and any SAS signature or account key) from a text."""

    def __init__(self, creds: AzureCredentials) -> None:
        self._secrets = secret_strings(creds)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _SIG.sub(r"\1***", text)
        return _ACCOUNT_KEY.sub(r"\1***", text)


def service_client(creds: AzureCredentials, scrub: Scrubber, *, label: str, timeout_s: float, retry_total: int,
                   retry_initial_ms: float, retry_max_ms: float, **options: Any) -> BlobServiceClient:
    """A ``BlobServiceClient`` for ``creds`` with our retry policy and timeouts; ``options`` go to the SDK.

    Raises StoreError (not transient, naming where the credentials came from, never their value) if the SDK
    cannot use them.
    """
    client_options: dict[str, Any] = {
        "retry_policy": Backoff(initial_s=retry_initial_ms / 1000, max_s=retry_max_ms / 1000, retries=retry_total),
        "connection_timeout": min(timeout_s, 20.0),
        "read_timeout": timeout_s,
        **options,
    }
    try:
        if creds.connection_string is not None:
            return BlobServiceClient.from_connection_string(creds.connection_string.get_secret_value(),
                                                            **client_options)
        assert creds.account_url is not None and creds.credential is not None
        secret = creds.credential.get_secret_value()
        if creds.method == "sas_token":
            credential: Any = secret.lstrip("?")
        else:
            credential = {"account_name": account_from_url(creds.account_url), "account_key": secret}
        return BlobServiceClient(creds.account_url, credential=credential, **client_options)
    except (ValueError, TypeError) as exc:
        raise StoreError(f"{label}: cannot use the credentials from {creds.source}: {scrub(str(exc))}",
                         transient=False) from None


class AzureContainer:
    """One container (and name prefix) in a storage account, as the cache store and the seed volumes use it:
    the client with our retry policy and timeouts, errors that name account, container and blob (never a
    secret), and creating the container on first use."""

    label = "azure"  # starts every message: which part of blockferry speaks
    auth_hint = "check the credentials"  # completes a not-authorized message: where they are configured

    def __init__(self, settings: AzureStoreConfig, creds: AzureCredentials, container: str, prefix: str,
                 **client_options: Any) -> None:
        self.settings = settings
        self.container = container
        self.prefix = prefix
        self._scrub = Scrubber(creds)
        self._service = service_client(
            creds, self._scrub, label=self.label, timeout_s=settings.timeout_s, retry_total=settings.retry_total,
            retry_initial_ms=settings.retry_initial_ms, retry_max_ms=settings.retry_max_ms,
            max_single_put_size=int(settings.single_put_max_bytes), max_block_size=int(settings.block_bytes),
            **client_options)
        self.account = self._service.account_name or "?"
        self.client: ContainerClient = self._service.get_container_client(container)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(account={self.account!r}, container={self.container!r}, prefix={self.prefix!r})"

    def missing_is_transient(self, exc: BaseException, name: str | None) -> bool:
        """Whether a "not found" answer is worth retrying (see :func:`store_error`)."""
        return False

    def error(self, op: str, name: str | None, exc: BaseException) -> StoreError:
        """A StoreError for ``exc``: "cannot <op> <prefix><name> in container 'c' of account 'a'", or for the
        container itself when ``name`` is None."""
        what = f"{op} {self.prefix}{name}" if name else f"{op} container {self.container!r}"
        where = f"in container {self.container!r} of account {self.account!r}" if name else \
            f"of account {self.account!r}"
        return store_error(exc, label=self.label, what=what, where=where, scrub=self._scrub, hint=self.auth_hint,
                           missing_is_transient=self.missing_is_transient(exc, name))

    async def create_container(self) -> None:
        """Create the container if it is missing."""
        try:
            await self.client.create_container()
            _log.info("%s: created container %r in account %r", self.label, self.container, self.account)
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:
            if exc.status_code == 403 and not isinstance(exc, ClientAuthenticationError):
                # A container-scoped SAS may not create containers; the container may well exist.
                _log.debug("%s: not allowed to create container %r; assuming it exists", self.label, self.container)
            else:
                raise self.error("create", None, exc) from None
        except Exception as exc:  # noqa: BLE001
            raise self.error("create", None, exc) from None

    async def close_clients(self) -> None:
        await self.client.close()
        await self._service.close()


def store_error(exc: BaseException, *, label: str, what: str, where: str, scrub: Scrubber, missing_is_transient: bool,
                hint: str) -> StoreError:
    """A StoreError for ``exc`` saying ``{label}: cannot {what} {where}: ...``, scrubbed, without the cause.

    ``missing_is_transient``: whether a "not found" is worth retrying (a container deleted under us is
    re-created by the next attempt; a missing blob stays missing). ``hint`` completes the not-authorized message
    (where the credentials are configured).
    """
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    detail = scrub(first_line(getattr(exc, "reason", None) or getattr(exc, "message", None) or str(exc)))
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403) or is_signing_error(exc):
        return StoreError(
            f"{label}: not authorized to {what} {where} (HTTP {status or '-'} {code or type(exc).__name__}): "
            f"{hint}", transient=False)
    if isinstance(exc, ResourceNotFoundError):
        return StoreError(f"{label}: cannot {what} {where}: not found (HTTP {status} {code})",
                          transient=missing_is_transient)
    if isinstance(exc, HttpResponseError) and status is not None:
        transient = status in TRANSIENT_STATUS or status >= 500
        return StoreError(f"{label}: cannot {what} {where}: HTTP {status} {code or ''} {detail}".rstrip(),
                          transient=transient)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError, aiohttp.ClientError, asyncio.TimeoutError,
                        TimeoutError, ConnectionError, OSError)):
        return StoreError(f"{label}: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=True)
    if isinstance(exc, AzureError):
        return StoreError(f"{label}: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=True)
    # Not a network or service error: a bug or a misuse; retrying will not help.
    return StoreError(f"{label}: cannot {what} {where}: {type(exc).__name__}: {detail}", transient=False)


_SIG = re.compile(r"((?:^|[?&;\s'\"])sig=)[^&\s'\";]+", re.IGNORECASE)
_ACCOUNT_KEY = re.compile(r"(AccountKey=|SharedAccessSignature=)[^;\s'\"]+", re.IGNORECASE)


def secret_strings(creds: AzureCredentials) -> list[str]:
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


def account_from_url(url: str) -> str:
    """``https://acct.blob.core.windows.net`` → acct; ``http://127.0.0.1:10000/devstoreaccount1`` → the path."""
    match = re.match(r"https?://([^/:]+)(?::\d+)?(?:/([^/?#]+))?", url)
    if not match:
        return "?"
    host, path = match.groups()
    if re.fullmatch(r"[\d.]+|localhost|\[.*\]", host) and path:
        return path
    return host.split(".")[0]


def first_line(text: object) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line[:200]


def is_container_missing(exc: BaseException) -> bool:
    return isinstance(exc, ResourceNotFoundError) and getattr(exc, "error_code", None) == "ContainerNotFound"


def is_signing_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "AzureSigningError"
