"""Recovery operations (points, failover, commit) for the CLI and embedding programs.

Exactly one applier may own a seed directory. When one is running (``serve`` or
``apply``), operations go through its admin API so that its in-memory pins
protect a failover from pruning; when none runs, the caller becomes the applier
for the duration of the operation (taking the same lock).
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import aiohttp

from engine.applier import Applier, ApplierLock
from engine.config import Config
from engine.fsutil import write_durably
from engine.keys import check_private
from engine.recovery.failover import FailoverResult, commit, failover
from engine.recovery.points import Point, PointNotFound
from protocol import LogBlobError

Progress = Callable[[int, int], None]


class RecoveryError(Exception):
    """A recovery operation failed; the message says why (no point, no disk, API refused...)."""


class Recovery(Protocol):
    async def points(self, disk: str) -> list[Point]: ...

    async def failover(self, disk: str, spec: str, out: Path, *, test: bool,
                       progress: Progress | None = None) -> dict[str, object]: ...

    async def commit(self, disk: str) -> int: ...

    async def status(self) -> list[dict[str, object]]:
        """Per-disk health (engine.monitor.DiskHealth.as_dict)."""


class LocalRecovery:
    """Operations on an applier in this process."""

    def __init__(self, applier: Applier, config: Config) -> None:
        self.applier = applier
        self.config = config

    async def status(self) -> list[dict[str, object]]:
        from engine.monitor import Monitor  # the monitor module imports the applier's neighbours

        await self.applier.open_existing()  # an Azure seed takes its lease here
        await self.applier.pending()  # what waits in the cache store, for the apply lag
        return [h.as_dict() for h in Monitor(self.config, None, self.applier).snapshot()]

    async def points(self, disk: str) -> list[Point]:
        if disk not in self.applier.disks and disk not in await self.applier.known_disks():
            raise RecoveryError(f"disk {disk!r} has no seed disk here")
        await self.applier.disk(disk)
        return self.applier.points(disk)

    async def failover(self, disk: str, spec: str, out: Path, *, test: bool,
                       progress: Progress | None = None) -> dict[str, object]:
        try:
            result: FailoverResult = await failover(self.applier, disk, spec, out, test=test, progress=progress)
        except PointNotFound as exc:
            raise RecoveryError(str(exc)) from None
        except LogBlobError as exc:  # an undo entry the roll-back needs is damaged
            raise RecoveryError(f"point {spec} of disk {disk!r} cannot be materialised: {exc}") from None
        return result.as_dict()

    async def commit(self, disk: str) -> int:
        try:
            return await commit(self.applier, disk)
        except PointNotFound as exc:
            raise RecoveryError(str(exc)) from None


def admin_token(config: Config) -> str:
    """The admin API's bearer token (generated on first use, owner-only)."""
    path = config.server.data_dir / "admin.token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, secrets.token_urlsafe(32).encode(), mode=0o600)
    check_private(path, "admin token file")
    return path.read_text().strip()


class RemoteRecovery:
    """Operations through a running applier's admin API."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, **kwargs: object) -> AsyncIterator[dict[str, object]]:
        async with (aiohttp.ClientSession(headers=self._headers) as session,
                    session.request(method, self.url + path, **kwargs) as response):  # type: ignore[arg-type]
            if response.status != 200:
                raise RecoveryError(f"applier refused: {response.status} {await response.text()}")
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)

    async def _one(self, method: str, path: str, **kwargs: object) -> dict[str, object]:
        async for message in self._call(method, path, **kwargs):
            if "error" in message:
                raise RecoveryError(str(message["error"]))
            return message
        raise RecoveryError("applier sent no answer")

    async def points(self, disk: str) -> list[Point]:
        answer = await self._one("GET", "/api/points", params={"disk": disk})
        return [Point(p["disk"], p["seq"], p["kind"], p["source_us"], p["recorded_us"], p["tag_id"])  # type: ignore
                for p in answer["points"]]  # type: ignore[union-attr]

    async def failover(self, disk: str, spec: str, out: Path, *, test: bool,
                       progress: Progress | None = None) -> dict[str, object]:
        body = {"disk": disk, "point": spec, "out": str(out.resolve()), "test": test}
        async for message in self._call("POST", "/api/failover", json=body):
            if "error" in message:
                raise RecoveryError(str(message["error"]))
            if "progress" in message and progress:
                done, total = message["progress"]  # type: ignore[misc]
                progress(done, total)
            if "result" in message:
                return message["result"]  # type: ignore[return-value]
        raise RecoveryError("applier closed the stream before the failover finished")

    async def commit(self, disk: str) -> int:
        answer = await self._one("POST", "/api/failover/commit", json={"disk": disk})
        return int(answer["released"])  # type: ignore[call-overload]

    async def status(self) -> list[dict[str, object]]:
        return (await self._one("GET", "/api/status"))["disks"]  # type: ignore[return-value]


def running_admin_url(config: Config) -> str | None:
    """The admin URL the running applier advertised in its lock file, if one runs."""
    holder = ApplierLock(config.seed_dir).holder()
    if holder is None:
        return None
    for word in holder.split():
        if word.startswith("admin="):
            return word.removeprefix("admin=")
    raise RecoveryError(f"an applier is running ({holder}) without an admin API; enable [http] to reach it")


@contextlib.asynccontextmanager
async def open_recovery(config: Config) -> AsyncIterator[Recovery]:
    """The running applier's API if there is one, else a short-lived local applier."""
    from engine.server import build_applier, load_keyring, open_store  # the server module imports this one

    url = running_admin_url(config)
    if url is not None:
        yield RemoteRecovery(url, admin_token(config))
        return
    lock = ApplierLock(config.seed_dir)
    lock.acquire("blockferry recovery command")
    store = open_store(config)
    applier = build_applier(config, store, load_keyring(config, create=False))
    try:
        yield LocalRecovery(applier, config)
    finally:
        await applier.close()
        await store.close()
        lock.release()
