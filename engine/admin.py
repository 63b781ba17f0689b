"""The applier's admin API (aiohttp): points, failover and commit for CLI and tools.

Bound to loopback by default and protected by a bearer token kept in an
owner-only file, because a failover writes files where it is told to.
Failover answers as NDJSON so the caller can show progress of a long copy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from pathlib import Path

from aiohttp import web

from engine.monitor import Monitor
from engine.recovery.service import LocalRecovery, RecoveryError

log = logging.getLogger(__name__)


def admin_routes(recovery: LocalRecovery | None, monitor: Monitor, token: str) -> list[web.RouteDef]:
    """``/api/status`` always; points, failover and commit where this process runs the applier."""
    def authorised(request: web.Request) -> None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise web.HTTPUnauthorized(text="missing or wrong admin token")

    async def status(request: web.Request) -> web.Response:
        authorised(request)
        return web.json_response({"disks": [h.as_dict() for h in monitor.snapshot()]})

    status_route = [web.get("/api/status", status)]
    if recovery is None:
        return status_route

    async def points(request: web.Request) -> web.Response:
        authorised(request)
        try:
            found = await recovery.points(request.query.get("disk", ""))
        except RecoveryError as exc:
            return web.json_response({"error": str(exc)})
        return web.json_response({"points": [p.as_dict() for p in found]})

    async def do_failover(request: web.Request) -> web.StreamResponse:
        authorised(request)
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()

        def progress(done: int, total: int) -> None:  # called from a worker thread
            loop.call_soon_threadsafe(queue.put_nowait, {"progress": [done, total]})

        async def run() -> None:  # its last message (result or error) ends the stream
            try:
                queue.put_nowait({"result": await recovery.failover(
                    str(body["disk"]), str(body["point"]), Path(str(body["out"])), test=bool(body.get("test")),
                    progress=progress)})
            except (RecoveryError, KeyError, OSError) as exc:
                queue.put_nowait({"error": str(exc)})
            except Exception as exc:  # the caller waits for a last message: never leave it without one
                log.exception("admin API: failover of %r failed", body.get("disk"))
                queue.put_nowait({"error": f"{type(exc).__name__}: {exc}"})

        loop = asyncio.get_running_loop()
        task = asyncio.create_task(run())
        while True:
            message = await queue.get()
            await response.write(json.dumps(message).encode() + b"\n")
            if "progress" not in message:
                break
        await task
        await response.write_eof()
        return response

    async def do_commit(request: web.Request) -> web.Response:
        authorised(request)
        body = await request.json()
        try:
            return web.json_response({"released": await recovery.commit(str(body["disk"]))})
        except (RecoveryError, OSError) as exc:  # OSError: e.g. a seed volume that refuses changes until restarted
            return web.json_response({"error": str(exc)})

    return status_route + [web.get("/api/points", points), web.post("/api/failover", do_failover),
                           web.post("/api/failover/commit", do_commit)]
