"""Test helpers: real process servers (in-process or as subprocesses) and real agents over TLS."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from azurite import Azurite

from engine.agent import Agent, AgentDisk
from engine.auth import DEFAULT_AGENT, read_token
from engine.config import Config
from engine.disks import DiskInfo
from engine.pipeline import Pipeline
from engine.recovery.state_file import read_state_record
from engine.spool import Spool, UploadWatermarks
from engine.store import CacheStore, LocalStore
from engine.tls import client_context
from engine.workload import ContentPool, random_writes
from protocol import TagKind
from protocol.logblob import Sealer, key_id_of

BLOCKFERRY = str(Path(sys.executable).parent / "blockferry")
MiB = 1024 * 1024


@asynccontextmanager
async def running_pipeline(config: Config, *, spool: Spool | None = None, watermarks: UploadWatermarks | None = None,
                           disk_size: int = 1 << 20, key: bytes = bytes(range(32)),
                           store: CacheStore | None = None) -> AsyncIterator[Pipeline]:
    """A started pipeline for disk "d" (real spool, local cache store and watermark file under ``config``),
    closed on exit; the store is ``pipeline.store``."""
    pipeline = Pipeline(config, Sealer(key), spool or Spool(config.spool_dir, 1 << 30),
                        store or LocalStore(config.store_dir),
                        watermarks or UploadWatermarks(config.state_dir / "uploaded.json"),
                        keys=lambda key_id: key if key_id == key_id_of(key) else None)
    await pipeline.start([DiskInfo("d", "agent-1", disk_size, 4096)])
    try:
        yield pipeline
    finally:
        await pipeline.close()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


async def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
    return result


async def write_random(agent: Agent, sources: dict[str, bytearray], total_bytes: int, pool: ContentPool, *,
                       seed: int = 7, max_size: int = 1024 * 1024, tag_rate: float = 0.0) -> int:
    """Overlapping random writes (4 KiB .. ``max_size``) spread over the agent's open disks, mirrored into
    ``sources``, with an application- or crash-consistent tag after a ``tag_rate`` share of them; returns the
    bytes written (not flushed)."""
    rng = random.Random(seed)
    streams = {name: random_writes(pool, len(src), max_size=max_size, seed=seed + i)
               for i, (name, src) in enumerate(sources.items())}
    written = 0
    while written < total_bytes:
        name = rng.choice(list(sources))
        write = next(streams[name])
        sources[name][write.offset:write.offset + len(write.data)] = write.data
        await agent.disks[name].write(write.offset, write.data)
        written += len(write.data)
        if rng.random() < tag_rate:
            await agent.disks[name].tag(rng.choice(list(TagKind)), f"t{written}")
    return written


def make_config(data_dir: Path, *extra: dict, **sections: dict) -> Config:
    """A config under ``data_dir``; ``extra`` (e.g. :func:`backend_sections`) is merged in key by key."""
    raw: dict = {"server": {"data_dir": str(data_dir), "port": 0}, "http": {"port": 0},
                 "applier": {"process": False, "http_port": 0},
                 # a small last batch goes at its linger, not 4 s later (the tests of the wait set it)
                 "batch": {"min_bytes_wait_ms": 0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    for more in extra:
        _merge(raw, more)
    return Config.model_validate(raw)


def _merge(into: dict, more: dict) -> None:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# ------------------------------------------------------------------ seed and cache-store backends

SEED_BACKENDS = ["local", "azure"]


def backend_sections(azurite: Azurite | None, *, seed: str = "local", store: str = "local",
                     label: str = "t") -> dict:
    """Config sections for a seed volume ("local" | "azure") and a cache store ("local" | "azure") on Azurite;
    each Azure part in a fresh container (see :func:`azure_containers`)."""
    sections: dict = {}
    if "azure" in (seed, store):
        assert azurite is not None, "an Azure backend needs the azurite fixture"
        sections["store"] = {"azure": {"connection_string": azurite.connection_string()}}
    if store == "azure":
        sections["store"] = azurite.store_section(azurite.new_container(f"{label}-cache"))  # type: ignore[union-attr]
    if seed == "azure":
        sections["applier"] = {"volume": "azure",
                               "azure": {"container": azurite.new_container(f"{label}-seed")}}  # type: ignore
    return sections


def azure_containers(config: Config) -> list[str]:
    """The Azurite containers a config uses (to delete after a test)."""
    out = []
    if config.store.kind == "azure":
        out.append(config.store.azure.container)
    if config.applier.volume == "azure":
        out.append(config.applier.azure.container)
    return out


async def delete_containers(config: Config) -> None:
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.blob.aio import BlobServiceClient

    containers = azure_containers(config)
    if not containers:
        return
    async with BlobServiceClient.from_connection_string(
            config.store.azure.credentials().connection_string.get_secret_value()) as client:  # type: ignore
        for container in containers:
            with contextlib.suppress(ResourceNotFoundError):  # never created: nothing to delete
                await client.delete_container(container)


def _seed_blob(config: Config, name: str):  # type: ignore[no-untyped-def]
    from azure.storage.blob import BlobClient

    creds = config.store.azure.credentials()
    assert creds.connection_string is not None
    return BlobClient.from_connection_string(creds.connection_string.get_secret_value(),
                                             config.applier.azure.container, config.applier.azure.prefix + name)


def read_seed(config: Config, disk: str) -> bytes:
    """The seed image of ``disk`` (the local file, or the page blob up to the disk size)."""
    if config.applier.volume == "local":
        return (config.seed_dir / f"{disk}.img").read_bytes()
    with _seed_blob(config, f"{disk}.img") as blob:
        props = blob.get_blob_properties()
        size = int(props.metadata.get("disk_size", props.size))
        return blob.download_blob(offset=0, length=size, max_concurrency=4).readall() if size else b""


def seed_state(config: Config, disk: str) -> dict | None:
    """The applier state record of ``disk``, None if there is none yet."""
    if config.applier.volume == "local":
        return read_state_record(config.seed_dir, disk)
    from azure.core.exceptions import ResourceNotFoundError

    with _seed_blob(config, f"{disk}.state.json") as blob:
        try:
            return json.loads(blob.download_blob().readall())
        except ResourceNotFoundError:
            return None


def agent_for(data_dir: Path, port: int, **kwargs: object) -> Agent:
    """An agent using the credentials the embedded default generated in ``data_dir``."""
    return Agent("127.0.0.1", port, DEFAULT_AGENT, read_token(data_dir / "agent-1.token"),
                 ssl_context=client_context(data_dir / "tls" / "server.crt"), server_hostname="localhost",
                 **kwargs)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class ServerProcess:
    """`blockferry serve` in its own process, so it can be killed with SIGKILL like a crashed host."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log_path, "ab") as log:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen([BLOCKFERRY, "serve", "--config", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("server did not start listening")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def applied_seq(seed_dir: Path, disk: str) -> int:
    state = read_state_record(seed_dir, disk)
    return state["applied_seq"] if state is not None else 0


async def wait_applied(seed_dir: Path, targets: dict[str, int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(applied_seq(seed_dir, disk) < seq for disk, seq in targets.items()):
        if time.monotonic() > deadline:
            got = {disk: applied_seq(seed_dir, disk) for disk in targets}
            raise TimeoutError(f"applier did not catch up: want {targets}, have {got}")
        await asyncio.sleep(0.05)


async def write_logged(disk: AgentDisk, writes: Iterator[Any], last_seq: int) -> list[tuple[int, int, bytes]]:
    """Write from ``writes`` until sequence ``last_seq``; returns the log of (seq, offset, data) for state_at."""
    log = []
    for write in writes:
        log.append((disk.next_seq, write.offset, bytes(write.data)))
        await disk.write(write.offset, write.data)
        if disk.next_seq > last_seq:
            break
    return log


def state_at(writes: list[tuple[int, int, bytes]], size: int, seq: int) -> bytes:
    """The source disk after sequence ``seq``, rebuilt from a log of (seq, offset, data) writes."""
    image = bytearray(size)
    for s, offset, data in writes:
        if s <= seq:
            image[offset:offset + len(data)] = data
    return bytes(image)
