"""The process server as an embeddable object: ``async with ProcessServer(config) as ps``.

Wires the parts together: keys, TLS, agent registry, disk registry, spool,
cache store, pipeline, the TLS listener and (embedded default) the applier.
First start of a fresh data directory generates what security needs — a
self-signed certificate, a sealing key and one agent token — so the secure
setup is also the zero-configuration one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from engine.applier import Applier, ServerLock
from engine.applier_process import ApplierProcess
from engine.applier_service import ApplierService
from engine.auth import AgentRegistry, ensure_default_agent
from engine.config import Config
from engine.control import ControlPlane
from engine.disks import DiskRegistry
from engine.filepool import FilePool
from engine.ingest import AgentConnection, IngestContext
from engine.keys import KeyRing
from engine.pipeline import Pipeline
from engine.recovery.state_file import LEGACY_SUFFIX, STATE_SUFFIX, read_state_record
from engine.recovery.volume import LocalVolumes
from engine.spool import Spool, UploadWatermarks, pool_dir
from engine.store import CacheStore, LocalStore
from engine.store.base import StoreError
from engine.tls import generate_self_signed, server_context
from protocol.logblob import KeyLookup, Sealer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectInfo:
    """What an agent needs to connect; printed by ``serve`` (the token file, never the token)."""

    host: str
    port: int
    cafile: Path
    token_file: Path | None


def open_store(config: Config, keys: KeyLookup | None = None) -> CacheStore:
    """``keys``: for the server's uploads, which a remote store authenticates before it sends them."""
    if config.store.kind == "azure":
        from engine.store.azure import AzureBlobStore  # the Azure SDK is only imported when it is used

        return AzureBlobStore(config.store.azure, keys=keys)
    return LocalStore(config.store_dir, fsync=config.spool.fsync, pool=FilePool(pool_dir(config.spool_dir)))


def load_keyring(config: Config, *, create: bool) -> KeyRing:
    return KeyRing.from_files(config.key_file, list(config.keys.old_key_files), create=create)


def build_applier(config: Config, store: CacheStore, keys: KeyRing) -> Applier:
    """The applier as configured (the caller holds the seed directory's ApplierLock).

    With ``applier.volume = "azure"`` the seed disks are page blobs; the applier also takes a lease on the seed
    container's lock blob on first use (refused with ApplierLocked while another applier, from any machine, holds
    it) and releases it when closed.
    """
    options = {"poll_s": config.applier.poll_ms / 1000, "group_max_bytes": int(config.applier.group_max_bytes),
               "prune_interval_s": config.applier.prune_interval_s}
    if config.applier.volume == "azure":
        from engine.recovery.azure_volume import AzureVolumes  # the Azure SDK only when used

        return Applier(store, keys, AzureVolumes.from_config(config), config.policy_for, **options)
    return Applier(store, keys, LocalVolumes(config.seed_dir, fsync=config.applier.fsync), config.policy_for,
                   **options)


class ProcessServer:
    def __init__(self, config: Config, *, run_applier: bool | None = None, control_plane: bool = True) -> None:
        """``control_plane=False`` leaves monitoring, alerts and HTTP to an embedding program.

        The applier runs as its own process by default (``applier.process``): then ``applier`` is None and
        ``applier_process`` reports what it applied; with ``applier.process = false`` it runs on this loop.
        """
        self.config = config
        self.run_applier = config.applier.enabled if run_applier is None else run_applier
        self._lock = ServerLock(config.server.data_dir)
        self.applier_process: ApplierProcess | None = None
        self.run_control_plane = control_plane
        self.pipeline: Pipeline | None = None
        self.applier: Applier | None = None
        self.store: CacheStore | None = None
        self.connect_info: ConnectInfo | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ctx: IngestContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._applier_service: ApplierService | None = None  # the applier on this loop (applier.process = false)
        self.control: ControlPlane | None = None

    @property
    def token_file(self) -> Path:
        return self.config.server.data_dir / "agent-1.token"

    def _tls_paths(self) -> tuple[Path, Path]:
        cfg = self.config.server
        if cfg.tls_cert and cfg.tls_key:
            return cfg.tls_cert, cfg.tls_key
        tls_dir = cfg.data_dir / "tls"
        cert, key = tls_dir / "server.crt", tls_dir / "server.key"
        if not cert.exists() or not key.exists():
            generate_self_signed(cert, key)
            log.info("generated a self-signed TLS certificate: %s", cert)
        return cert, key

    async def start(self) -> ConnectInfo:
        try:
            return await self._start()
        except BaseException:  # an embedding program's `async with` does not close what never finished starting
            await self.close()
            raise

    async def _start(self) -> ConnectInfo:
        cfg = self.config
        self._lock.acquire(f"pid {os.getpid()} (blockferry serve)")
        keys = load_keyring(cfg, create=cfg.keys.key_file is None)
        cert, tls_key = self._tls_paths()
        generated_token = cfg.server.agents_file is None and not cfg.agents_file.exists()
        if cfg.server.agents_file is None:
            ensure_default_agent(cfg.agents_file, self.token_file)
        agents = AgentRegistry.load(cfg.agents_file)
        disks = DiskRegistry(cfg.state_dir / "disks")
        spool = Spool(cfg.spool_dir, int(cfg.spool.max_bytes), fsync=cfg.spool.fsync)
        self.store = open_store(cfg, keys.lookup)
        watermarks = UploadWatermarks(cfg.state_dir / "uploaded.json")
        self.pipeline = Pipeline(cfg, Sealer(keys.current), spool, self.store, watermarks, keys=keys.lookup)
        # The applier opens its seeds first, for what they hold is where the disks resume at the least
        # (Pipeline.start), and applies nothing until the pipeline has started: applied and deleted meanwhile,
        # a blob would be in neither the seed's sequence read before nor the store's listing read after.
        if self.run_applier and cfg.applier.process:
            self.pipeline.track_applied = True  # so this server's monitor knows the whole recoverable lag
            self.applier_process = ApplierProcess(cfg, on_applied=self.pipeline.note_applied,
                                                  on_failed=self.pipeline.note_apply_failure)
            await self.applier_process.start()
        elif self.run_applier:
            self._applier_service = ApplierService(cfg, "blockferry serve", store=self.store, control_plane=False)
            await self._applier_service.start(run=False)
            self.applier = self._applier_service.applier
        await self.pipeline.start(list(disks), self._seed_seqs)
        if self.applier_process is not None:
            self.pipeline.stored_listeners.append(self.applier_process.notify)
            self.applier_process.release()
        elif self._applier_service is not None and self.applier is not None:
            self.pipeline.stored_listeners.append(self.applier.notify)
            self._applier_service.run()
        self._ctx = IngestContext(self.pipeline, agents, disks, self._is_committed, server_name=cfg.server.name,
                                  max_frame=int(cfg.server.max_frame_bytes),
                                  read_buffer=int(cfg.server.read_buffer_bytes),
                                  read_buffers_total=int(cfg.server.read_buffers_total_bytes))
        loop = asyncio.get_running_loop()
        ctx = self._ctx
        self._server = await loop.create_server(lambda: AgentConnection(ctx), cfg.server.listen, cfg.server.port,
                                                ssl=server_context(cert, tls_key), reuse_address=True)
        port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._keepalive(), name="keepalive"))
        if self.run_control_plane:
            lock = self._applier_service.lock if self._applier_service is not None else None
            self.control = ControlPlane(cfg, self.pipeline, self.applier, lock, "blockferry serve")
            await self.control.start()
        self.connect_info = ConnectInfo(cfg.server.listen, port, cert,
                                        self.token_file if self.token_file.exists() else None)
        log.info("process server listening on %s:%d (TLS)%s", cfg.server.listen, port,
                 "; generated agent token in " + str(self.token_file) if generated_token else "")
        return self.connect_info

    def _is_committed(self, disk: str) -> bool:
        """A disk whose failover was committed no longer accepts writes."""
        if self.applier is not None and disk in self.applier.disks:
            return self.applier.disks[disk].state.committed_failover
        if self.applier_process is not None and disk in self.applier_process.committed:
            return True
        state = read_state_record(self.config.seed_dir, disk)
        return state is not None and state.get("committed_failover", False)

    async def _keepalive(self) -> None:
        """Heartbeats to every agent; close connections that went silent (half-open TCP)."""
        cfg = self.config.server
        while True:
            await asyncio.sleep(cfg.heartbeat_s)
            now = time.monotonic()
            assert self._ctx is not None
            for conn in list(self._ctx.connections):
                if conn.silent_s(now) > cfg.idle_timeout_s:
                    log.warning("agent %s: silent for %.1fs, closing", conn.peer, conn.silent_s(now))
                    conn.close()
                else:
                    conn.heartbeat()

    def applied_seq(self, disk: str) -> int:
        """The disk's applied sequence as this server's applier (in-process or child) last reported it."""
        if self.applier is not None:
            return self.applier.applied_seq(disk)
        if self.applier_process is not None and self.pipeline is not None:  # the pipeline hears the child's reports
            return self.pipeline.applied_seqs.get(disk, 0)
        return 0

    def _seed_seqs(self) -> dict[str, int] | None:
        """What each seed holds (applied), from the applier this server runs (held back until the pipeline
        has started) or, run apart (``blockferry apply``), from the local seeds' state files, read after the
        store was listed. None: not known (an Azure seed's applier run apart)."""
        if self.applier is not None:
            return {disk: d.state.applied_seq for disk, d in self.applier.disks.items()}
        if self.applier_process is not None:
            assert self.pipeline is not None  # called by its start
            return dict(self.pipeline.applied_seqs)
        if self.config.applier.volume != "local":
            return None
        names = {path.name.removesuffix(LEGACY_SUFFIX).removesuffix(STATE_SUFFIX)
                 for pattern in ("*" + STATE_SUFFIX, "*" + LEGACY_SUFFIX) for path in self.config.seed_dir.glob(pattern)}
        return {disk: int(state.get("applied_seq", 0)) for disk in names
                if (state := read_state_record(self.config.seed_dir, disk)) is not None}

    async def drain(self) -> None:
        """Wait until everything accepted is durable and uploaded (and applied, if embedded)."""
        assert self.pipeline is not None
        await self.pipeline.drain()
        if self.applier_process is not None:
            while not all((s.applied_seq or 0) >= s.durable_seq or s.apply_failure or s.log_failure
                          for s in self.pipeline.streams.values()):
                await asyncio.sleep(0.02)
        if self.applier is not None:
            while True:
                try:
                    await self.applier.apply_available(force=True)
                except StoreError as exc:  # transient: the store will answer again
                    log.warning("drain: cache store unavailable (%s); retrying", exc)
                if all(self.applier.applied_seq(d) >= s.durable_seq or d in self.applier.failures or s.log_failure
                       for d, s in self.pipeline.streams.items()):
                    return
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        try:
            if self.control is not None:
                await self.control.close()
            if self._server is not None:
                self._server.close()
                for conn in list(self._ctx.connections if self._ctx else []):
                    conn.close()
                await self._server.wait_closed()
            if self.applier is not None:
                self.applier.stop()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.pipeline is not None:
                await self.pipeline.close()
            if self.applier_process is not None:
                await self.applier_process.close()
            if self._applier_service is not None:
                await self._applier_service.close()
            if self.store is not None:
                await self.store.close()
        finally:  # whatever failed above, another server may start on this data directory
            self._lock.release()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
