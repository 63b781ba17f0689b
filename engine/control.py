"""The control plane of a running `serve` or `apply`: monitor, alerts, /metrics, /healthz, /api.

Both commands run the same thing, seeing what their process holds (the pipeline,
the applier, or both), and advertise the admin URL in the applier lock so the
CLI finds the process that owns the seed directory.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from engine.admin import admin_routes
from engine.applier import Applier, ApplierLock
from engine.config import Config
from engine.http import monitoring_routes, start_http
from engine.monitor import Monitor
from engine.pipeline import Pipeline
from engine.recovery.service import LocalRecovery, admin_token


class ControlPlane:
    def __init__(self, config: Config, pipeline: Pipeline | None, applier: Applier | None,
                 lock: ApplierLock | None, role: str, *, alerts: bool = True) -> None:
        self.config = config
        self.monitor = Monitor(config, pipeline, applier, alerts=alerts)
        self.applier = applier
        self.lock = lock
        self.role = role
        self.http_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.monitor.run(), name="monitor")
        if not self.config.http.enabled:
            return
        recovery = LocalRecovery(self.applier, self.config) if self.applier is not None else None
        routes = monitoring_routes(self.monitor) + admin_routes(recovery, self.monitor, admin_token(self.config))
        self._runner, self.http_port = await start_http(routes, self.config.http.listen, self.config.http.port)
        if self.lock is not None:
            host = self.config.http.listen if self.config.http.listen not in ("0.0.0.0", "::") else "127.0.0.1"
            self.lock.advertise(f"pid {os.getpid()} ({self.role}) admin=http://{host}:{self.http_port}")

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
