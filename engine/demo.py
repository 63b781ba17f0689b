"""`blockferry demo`: the whole data path in one process, on the embedded default.

A process server (with its applier) and an agent replicating synthetic disks
under random churn, with live progress; then it waits for the applier to catch
up and proves each seed disk is byte-identical to its source.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from engine.agent import Agent, AgentDisk
from engine.auth import DEFAULT_AGENT, read_token
from engine.config import Config
from engine.server import ProcessServer
from engine.tls import client_context
from engine.workload import ContentPool, random_writes
from protocol import TagKind

MB = 1e6


@dataclass
class DiskResult:
    disk: str
    source_sha256: str
    seed_sha256: str
    acked_seq: int
    applied_seq: int

    @property
    def identical(self) -> bool:
        return self.source_sha256 == self.seed_sha256


@dataclass
class DemoResult:
    seconds: float
    acked_bytes: int
    received_bytes: int
    sealed_bytes: int
    catch_up_seconds: float
    disks: list[DiskResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.identical for d in self.disks)


async def _churn(disk: AgentDisk, source: bytearray, pool: ContentPool, stop: asyncio.Event, seed: int) -> None:
    last_tag = time.monotonic()
    for write in random_writes(pool, disk.size, seed=seed):
        if stop.is_set():
            return
        source[write.offset:write.offset + len(write.data)] = write.data
        await disk.write(write.offset, write.data)
        if time.monotonic() - last_tag >= 2.0:
            await disk.tag(TagKind.APP, f"app-{int(time.time())}")
            last_tag = time.monotonic()


def _progress_table(server: ProcessServer, agent: Agent, started: float) -> Table:
    assert server.pipeline is not None
    elapsed = max(time.monotonic() - started, 1e-6)
    stats = server.pipeline.stats
    acked = sum(d.acked_bytes for d in agent.disks.values())
    table = Table(title=f"blockferry demo — {elapsed:5.1f}s")
    for column in ("disk", "acked seq", "applied seq", "acked MB", "ack MB/s"):
        table.add_column(column, justify="right")
    for name, disk in agent.disks.items():
        table.add_row(name, str(disk.acked_seq), str(server.applied_seq(name)), f"{disk.acked_bytes / MB:8.1f}",
                      f"{disk.acked_bytes / MB / elapsed:7.1f}")
    ratio = stats.received_bytes / stats.sealed_bytes if stats.sealed_bytes else 0
    table.caption = (f"total acked {acked / MB:.0f} MB at {acked / MB / elapsed:.0f} MB/s · "
                     f"stored {stats.stored_bytes / MB:.0f} MB (compression {ratio:.2f}×) · "
                     f"paused {stats.pauses}×")
    return table


async def run_demo(data_dir: Path, *, seconds: float = 20.0, disk_size: int = 256 * 1024 * 1024, disks: int = 2,
                   console: Console | None = None) -> DemoResult:
    console = console or Console()
    config = Config.model_validate({"server": {"data_dir": str(data_dir), "port": 0}, "http": {"port": 0},
                                    "applier": {"http_port": 0}})
    pool = ContentPool()
    async with ProcessServer(config) as server:
        info = server.connect_info
        assert info is not None and info.token_file is not None
        console.print(f"process server on {info.host}:{info.port} (TLS, cert {info.cafile}); "
                      f"data in {data_dir}")
        agent = Agent(info.host, info.port, DEFAULT_AGENT, read_token(info.token_file),
                      ssl_context=client_context(info.cafile), server_hostname="localhost")
        async with agent:
            sources: dict[str, bytearray] = {}
            for i in range(disks):
                name = f"demo-disk-{i}"
                disk = await agent.open_disk(name, disk_size)
                if disk.acked_seq:
                    raise SystemExit(f"{data_dir} already holds disk {name}; remove the directory to rerun the demo")
                sources[name] = bytearray(disk_size)
            stop = asyncio.Event()
            started = time.monotonic()
            writers = [asyncio.create_task(_churn(agent.disks[n], sources[n], pool, stop, seed=i))
                       for i, n in enumerate(sources)]
            with Live(_progress_table(server, agent, started), console=console, refresh_per_second=4) as live:
                while time.monotonic() - started < seconds:
                    await asyncio.sleep(0.25)
                    live.update(_progress_table(server, agent, started))
                stop.set()
                await asyncio.gather(*writers)
                await agent.flush()
                live.update(_progress_table(server, agent, started))
            churn_seconds = time.monotonic() - started
            console.print("churn stopped; waiting for the applier to catch up …")
            catch_up = time.monotonic()
            await server.drain()
            catch_up_seconds = time.monotonic() - catch_up
            assert server.pipeline is not None
            stats = server.pipeline.stats
            result = DemoResult(churn_seconds, sum(d.acked_bytes for d in agent.disks.values()),
                                stats.received_bytes, stats.sealed_bytes, catch_up_seconds)
            for name, source in sources.items():
                seed = await asyncio.to_thread((config.seed_dir / f"{name}.img").read_bytes)
                result.disks.append(DiskResult(name, hashlib.sha256(source).hexdigest(),
                                               hashlib.sha256(seed).hexdigest(), agent.disks[name].acked_seq,
                                               server.applied_seq(name)))
    _print_summary(console, result)
    return result


def _print_summary(console: Console, result: DemoResult) -> None:
    table = Table(title="summary")
    for column in ("disk", "acked seq", "applied seq", "sha256 (source = seed)", "identical"):
        table.add_column(column)
    for d in result.disks:
        table.add_row(d.disk, str(d.acked_seq), str(d.applied_seq), d.seed_sha256[:16] + "…",
                      "[green]yes[/]" if d.identical else "[red]NO[/]")
    console.print(table)
    ratio = result.received_bytes / result.sealed_bytes if result.sealed_bytes else 0
    console.print(f"acknowledged {result.acked_bytes / MB:.0f} MB in {result.seconds:.1f}s "
                  f"= {result.acked_bytes / MB / result.seconds:.0f} MB/s; compression {ratio:.2f}×; "
                  f"applier caught up {result.catch_up_seconds:.1f}s after the churn stopped")
    console.print("[green]all seed disks are byte-identical to their sources[/]" if result.ok
                  else "[red]MISMATCH: a seed disk differs from its source[/]")
