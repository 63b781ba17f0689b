"""An applier with everything it runs with: the seed lock, keys, cache store and control plane.

``blockferry apply`` runs one, so does the applier process that ``serve`` starts
(engine/applier_process.py), and so does ``serve`` itself with ``applier.process = false``
(sharing the server's cache store, and its control plane instead of one of its own); one class
keeps the start-up order (lock before the seed is touched, lease before the first write, admin
URL advertised last) and the reverse shutdown order in one place.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from engine.applier import Applier, ApplierLock, ApplierLocked
from engine.config import Config
from engine.control import ControlPlane
from engine.store import CacheStore

log = logging.getLogger(__name__)

LOCK_RETRY_S = 0.2


class ApplierService:
    def __init__(self, config: Config, role: str, *, alerts: bool = True, store: CacheStore | None = None,
                 control_plane: bool = True) -> None:
        """``store``: the caller's (kept open at close); else one of its own. ``control_plane=False``: the
        caller serves metrics and the admin API (and advertises them in ``lock``)."""
        self.config = config
        self.role = role
        self.alerts = alerts
        self.applier: Applier | None = None
        self.control: ControlPlane | None = None
        self.runner: asyncio.Task[None] | None = None
        self.lock = ApplierLock(config.seed_dir)
        self._own_store = store is None
        self._store: CacheStore | None = store
        self._control_plane = control_plane

    async def start(self, *, wait_while: Callable[[str], bool] | None = None, run: bool = True) -> None:
        """Raises KeyFileError (no usable key) or ApplierLocked (another applier owns the seed).

        ``wait_while(holder)``: keep waiting for the lock while it says yes of what the holder advertised —
        e.g. the applier process of a server that was killed, finishing its last group. ``run=False``: the
        disks are opened (their applied sequences known) but nothing is applied until :meth:`run`.
        """
        from engine.server import build_applier, load_keyring, open_store  # the server module imports this one

        keys = load_keyring(self.config, create=False)
        waiting = False
        while True:
            try:
                self.lock.acquire(f"pid {os.getpid()} ({self.role})")
                break
            except ApplierLocked as exc:
                holder = self.lock.holder()
                if holder is None:  # released since it refused us (an orphan finishing): not a holder to judge
                    await asyncio.sleep(0)
                    continue
                if wait_while is None or not wait_while(holder):
                    raise
                if not waiting:
                    log.warning("%s; waiting for it to stop", exc)
                    waiting = True
                await asyncio.sleep(LOCK_RETRY_S)
        try:
            if self._store is None:
                self._store = open_store(self.config)
            self.applier = build_applier(self.config, self._store, keys)
            await self.applier.open_existing()  # an Azure seed takes its lease here
            if self._control_plane:
                self.control = ControlPlane(self.config, None, self.applier, self.lock, self.role,
                                            alerts=self.alerts)
                await self.control.start()
        except BaseException:
            await self.close()
            raise
        if run:
            self.run()

    def run(self) -> None:
        """Start applying (serve holds this back until its pipeline knows where each disk resumes)."""
        assert self.applier is not None and self.runner is None
        self.runner = asyncio.create_task(self.applier.run(), name="applier")

    async def close(self) -> None:
        if self.applier is not None:
            self.applier.stop()
        if self.runner is not None:
            await self.runner
        if self.control is not None:
            await self.control.close()
        if self.applier is not None:
            await self.applier.close()
        if self._store is not None and self._own_store:
            await self._store.close()
        self.lock.release()
