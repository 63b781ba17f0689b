"""The `blockferry` command."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import click
from rich.console import Console
from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from engine.aio import run_loop
from engine.config import Config, ConfigError, load_config
from engine.keys import KeyFileError, KeyRing, load_key
from engine.memory import limit_malloc_arenas

if TYPE_CHECKING:
    from engine.recovery.service import Recovery

T = TypeVar("T")

console = Console(stderr=True)


async def _until_signalled(watch: asyncio.Task[None] | None = None) -> None:
    """Return on SIGINT or SIGTERM (or when ``watch`` ends), so services shut down cleanly under systemd,
    a container or a shell.

    Handlers are installed explicitly: a process started in the background by a
    non-interactive shell inherits SIGINT as ignored.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({waiter, *([watch] if watch else [])}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _config(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """blockferry: block-level replication data plane (process server, applier, agent)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limit_malloc_arenas()


# ---------------------------------------------------------------- server side

@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
def serve(config_path: Path | None) -> None:
    """Run a process server (and, by default, the applier) until interrupted."""
    from engine.server import ProcessServer

    config = _config(config_path)

    async def run() -> None:
        server = ProcessServer(config)
        try:
            info = await server.start()
        except (KeyFileError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        token = f"--token-file {info.token_file}" if info.token_file else "--token-file <your agent's token file>"
        if server.control is not None and server.control.http_port:
            console.print(f"metrics and health on http://{config.http.listen}:{server.control.http_port}"
                          "/metrics and /healthz")
        console.print(f"[bold]process server[/] on {info.host}:{info.port} (TLS). Connect an agent with:\n"
                      f"  blockferry agent replicate PATH --disk ID --server {info.host}:{info.port} "
                      f"--cafile {info.cafile} {token}")
        try:
            await _until_signalled()
        finally:
            await server.close()

    run_loop(run())


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
def apply(config_path: Path | None) -> None:
    """Run the applier alone: cache store → seed disks."""
    from engine.applier import ApplierLocked
    from engine.applier_service import ApplierService

    config = _config(config_path)

    async def run() -> None:
        service = ApplierService(config, "blockferry apply")
        try:
            await service.start()
        except (KeyFileError, ApplierLocked) as exc:
            raise click.ClickException(str(exc)) from None
        port = service.control.http_port if service.control else None
        console.print(f"applier: {config.store_dir} → {config.seed_dir}"
                      + (f"; metrics on http://{config.http.listen}:{port}/metrics" if port else ""))
        try:
            await _until_signalled(service.runner)
        finally:
            await service.close()

    run_loop(run())


# ---------------------------------------------------------------- agent side

@main.group()
def agent() -> None:
    """Agent commands (run on the protected machine)."""


@agent.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--disk", "disk_id", required=True, help="Disk id on the process server.")
@click.option("--server", "server", required=True, help="HOST:PORT of the process server.")
@click.option("--token-file", type=click.Path(exists=True, path_type=Path), required=True,
              help="File holding this agent's token (mode 0600).")
@click.option("--cafile", type=click.Path(exists=True, path_type=Path),
              help="Certificate to verify the server with (the server's tls/server.crt for a self-signed one).")
@click.option("--agent-id", default="agent-1", show_default=True)
@click.option("--interval", default=5.0, show_default=True, help="Seconds between change scans.")
@click.option("--once", is_flag=True, help="Stop after the initial copy (and its acknowledgement).")
def replicate(path: Path, disk_id: str, server: str, token_file: Path, cafile: Path | None, agent_id: str,
              interval: float, once: bool) -> None:
    """Replicate a file or block device: initial copy, then changed blocks."""
    from engine.agent import Agent, AgentError
    from engine.auth import read_token
    from engine.replicate import PassResult, Replicator
    from engine.tls import client_context

    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--server")
    try:
        token = read_token(token_file)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None

    async def run() -> None:
        client = Agent(host, int(port), agent_id, token, ssl_context=client_context(cafile))
        try:
            await client.start()
            replicator = Replicator(client, path, disk_id)
            await replicator.open()
            with Progress(*Progress.get_default_columns()[:-1], DownloadColumn(), TransferSpeedColumn(),
                          console=console) as bar:
                task = bar.add_task(f"initial copy of {path}", total=replicator.size)
                result = await replicator.initial_copy(lambda done, total: bar.update(task, completed=done))
                await client.flush()
            console.print(f"initial copy acknowledged: {result.sent_bytes} bytes sent in {result.writes} writes")
            if once:
                return

            def report(r: PassResult) -> None:
                if r.writes:
                    console.print(f"delta: {r.sent_bytes} bytes in {r.writes} writes acknowledged")

            while True:
                await asyncio.sleep(interval)
                report(await replicator.delta_pass())
                await client.flush()
        except AgentError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await client.close()

    try:
        run_loop(run())
    except KeyboardInterrupt:
        pass


@agent.command("add")
@click.argument("agent_id")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--disks", default="*", show_default=True, help="Comma-separated disk-id patterns it may open.")
@click.option("--token-file", type=click.Path(path_type=Path), required=True, help="Where to write its token.")
def agent_add(agent_id: str, config_path: Path | None, disks: str, token_file: Path) -> None:
    """Register an agent with a fresh token (written to --token-file, mode 0600)."""
    from engine.auth import add_agent
    from engine.fsutil import write_durably

    config = _config(config_path)
    token = add_agent(config.agents_file, agent_id, tuple(d.strip() for d in disks.split(",") if d.strip()))
    write_durably(token_file, (token + "\n").encode(), mode=0o600)
    console.print(f"agent {agent_id} added to {config.agents_file}; token in {token_file}")


# ---------------------------------------------------------------- recovery points and failover

def _recovery_call(config_path: Path | None, operation: Callable[[Recovery], Awaitable[T]]) -> T:
    from engine.applier import ApplierLocked
    from engine.recovery.service import RecoveryError, open_recovery

    config = _config(config_path)

    async def run() -> T:
        async with open_recovery(config) as recovery:
            return await operation(recovery)

    try:
        return run_loop(run())  # type: ignore[return-value]
    except (RecoveryError, ApplierLocked, KeyFileError, aiohttp.ClientError) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def points() -> None:
    """Recovery points of a disk."""


@points.command("list")
@click.option("--disk", required=True, help="Disk id.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def points_list(disk: str, config_path: Path | None, as_json: bool) -> None:
    """List a disk's retained recovery points, oldest first."""
    found = _recovery_call(config_path, lambda r: r.points(disk))
    if as_json:
        click.echo(json.dumps([p.as_dict() for p in found], indent=2))
        return
    table = Table(title=f"recovery points of {disk}")
    for column in ("id", "source time (UTC)", "sequence", "kind", "tag"):
        table.add_column(column)
    for p in found:
        table.add_row(p.id, p.source_time.isoformat(timespec="milliseconds"), str(p.seq), p.kind, p.tag_id)
    Console().print(table)


@main.group(invoke_without_command=True)
@click.option("--disk", help="Disk id.")
@click.option("--point", default="latest", show_default=True,
              help="latest (apply the backlog first: lowest RPO), latest-processed (no wait: lowest RTO), "
                   "latest-app, a point id, or an ISO time (the newest point at or before it).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Where to write the disk image.")
@click.option("--test", is_flag=True, help="Test failover: nothing about the disk or its replication changes.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.pass_context
def failover(ctx: click.Context, disk: str | None, point: str, out: Path | None, test: bool,
             config_path: Path | None) -> None:
    """Materialise a recovery point of a disk as a sparse image (`failover commit` to commit)."""
    if ctx.invoked_subcommand is not None:
        return
    if not disk or not out:
        raise click.UsageError("failover needs --disk and --out")
    with Progress(*Progress.get_default_columns()[:-1], DownloadColumn(), TransferSpeedColumn(),
                  console=console) as bar:
        task = bar.add_task(f"{'test ' if test else ''}failover of {disk} to {point}", total=None)
        result = _recovery_call(config_path, lambda r: r.failover(
            disk, point, out, test=test, progress=lambda done, total: bar.update(task, completed=done, total=total)))
    console.print(f"{'test ' if test else ''}failover of {disk}: point {result['seq']} written to {result['out']} "
                  f"({result['rolled_back_entries']} undo entries rolled back)")
    if not test:
        console.print(f"commit it with: blockferry failover commit --disk {disk}")


@failover.command("commit")
@click.option("--disk", required=True, help="Disk id.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
def failover_commit(disk: str, config_path: Path | None) -> None:
    """Commit a failover: stop replicating the disk and release its other recovery points."""
    released = _recovery_call(config_path, lambda r: r.commit(disk))
    console.print(f"failover of {disk} committed; replication stopped, {released} recovery points released")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status(config_path: Path | None, as_json: bool) -> None:
    """Per disk: applied sequence, lags (RPO), the stage behind, backlog, churn, last point."""
    from engine.monitor import DiskHealth, render_status_table

    healths = [DiskHealth.from_dict(d) for d in _recovery_call(config_path, lambda r: r.status())]
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in healths], indent=2))
    else:
        Console().print(render_status_table(healths))


@main.group()
def disk() -> None:
    """Disk maintenance (with serve, its applier and the disk's agent stopped)."""


@disk.command("reset")
@click.option("--disk", "disk_id", required=True, help="Disk id.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.confirmation_option(prompt="Empty the disk's seed and release its recovery points?")
def disk_reset(disk_id: str, config_path: Path | None) -> None:
    """Empty a disk's seed for a full resync (after writes were lost on the server): its recovery points
    are released, and serve resumes the disk after everything it and the cache store held of it."""
    from engine.applier import ApplierLocked
    from engine.recovery.reset import ResetError, ResetResult, reset_disk
    from engine.server import load_keyring, open_store
    from engine.store.base import StoreError
    from protocol import LogBlobError

    config = _config(config_path)

    async def run() -> ResetResult:
        keys = load_keyring(config, create=False)
        store = open_store(config, keys.lookup)
        try:
            return await reset_disk(config, store, keys, disk_id)
        finally:
            await store.close()

    try:
        result = run_loop(run())
    except (ResetError, ApplierLocked, KeyFileError, StoreError, LogBlobError, OSError) as exc:
        raise click.ClickException(f"disk {disk_id}: not reset: {exc}") from None
    console.print(f"disk {disk_id}: seed emptied, {result.released_points} recovery points released; serve "
                  f"resumes it after sequence {result.applied_seq}: start serve, then the disk's agent")


# ---------------------------------------------------------------- config and tools

@main.group()
def config() -> None:
    """Print or check configuration files."""


@config.command("defaults")
def config_defaults() -> None:
    """Print a commented configuration file with every default."""
    from engine.config_docs import render_defaults

    click.echo(render_defaults(), nl=False)


@config.command("check")
@click.argument("path", type=click.Path(path_type=Path))
def config_check(path: Path) -> None:
    """Validate a configuration file; exit status 1 with the offending keys if invalid."""
    _config(path)
    click.echo(f"{path}: ok")


@main.command("inspect-log")
@click.argument("blob", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key-file", type=click.Path(exists=True, path_type=Path), help="Key to open the blob with.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="Take the key ring from this config.")
@click.option("--max-records", type=int, default=None, help="List at most this many records.")
def inspect_log(blob: Path, key_file: Path | None, config_path: Path | None, max_records: int | None) -> None:
    """Print a log blob's header and records (not their payloads)."""
    from protocol import LogBlobError
    from tools.inspect_log import describe_blob

    try:
        keys = None
        if key_file is not None:
            keys = KeyRing(load_key(key_file))
        elif config_path is not None:
            cfg = _config(config_path)
            keys = KeyRing.from_files(cfg.key_file, list(cfg.keys.old_key_files))
        report = describe_blob(blob.read_bytes(), keys, name=blob.name, max_records=max_records)
    except (KeyFileError, LogBlobError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("\n".join(report.lines))


@main.command()
@click.option("--seconds", default=20.0, show_default=True, help="How long to churn.")
@click.option("--disk-size", default="256MiB", show_default=True, help="Size of each synthetic disk.")
@click.option("--disks", default=2, show_default=True, help="How many disks.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("demo-data"), show_default=True,
              help="Data directory (emptied first).")
def demo(seconds: float, disk_size: str, disks: int, data_dir: Path) -> None:
    """Replicate synthetic disks under random churn end to end and prove the copies identical."""
    from pydantic import ByteSize, TypeAdapter

    from engine.demo import run_demo

    size = int(TypeAdapter(ByteSize).validate_python(disk_size))
    if data_dir.exists():
        shutil.rmtree(data_dir)
    result = run_loop(run_demo(data_dir, seconds=seconds, disk_size=size, disks=disks, console=Console()))
    sys.exit(0 if result.ok else 1)  # type: ignore[union-attr]
