"""The HTTP endpoint of ``serve`` and ``apply``: /metrics (Prometheus), /healthz, and (added by the CLI) /api.

``monitoring_routes(monitor)`` gives the monitoring routes; ``start_http`` serves
any list of routes on one aiohttp ``AppRunner`` so the admin API can share the
port. Handlers run on the event loop that owns the pipeline and the applier, so
they read live state without locks; each scrape costs one pass over the disks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from engine.monitor import Monitor

log = logging.getLogger(__name__)


def monitoring_routes(monitor: Monitor) -> list[web.RouteDef]:
    async def metrics(request: web.Request) -> web.Response:
        # Prometheus' text format 0.0.4 by default; OpenMetrics if the scraper asks for it.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(monitor.registry), headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        try:
            ok, reasons = monitor.healthy()
        except Exception as exc:  # a broken health check is itself unhealthy, and says why
            log.exception("healthz: health check failed")
            return web.json_response({"status": "error", "reasons": [f"health check failed: {exc!r}"]}, status=500)
        if ok:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "unhealthy", "reasons": reasons}, status=503)

    return [web.get("/metrics", metrics), web.get("/healthz", healthz)]


async def start_http(app_routes: Iterable[web.AbstractRouteDef], listen: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve ``app_routes`` on ``listen:port`` (0 = a free port); returns the runner (``await runner.cleanup()``
    stops it) and the port actually bound."""
    app = web.Application()
    app.add_routes(list(app_routes))
    runner = web.AppRunner(app, access_log=None)  # a scrape every few seconds would flood the log
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen, port, reuse_address=True)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    actual = runner.addresses[0][1]
    log.info("http: /metrics and /healthz on %s:%d", listen, actual)
    return runner, actual
