"""Test helpers: real process servers (in-process or as subprocesses) and real agents over TLS."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.agent import Agent
from engine.auth import DEFAULT_AGENT, read_token
from engine.config import Config
from engine.tls import client_context

BLOCKFERRY = str(Path(sys.executable).parent / "blockferry")


def make_config(data_dir: Path, **sections: dict) -> Config:
    raw: dict = {"server": {"data_dir": str(data_dir), "port": 0}, "http": {"port": 0}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.model_validate(raw)


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
        log = open(self.log_path, "ab")
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
    path = seed_dir / f"{disk}.state.json"
    try:
        return json.loads(path.read_text())["applied_seq"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


async def wait_applied(seed_dir: Path, targets: dict[str, int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(applied_seq(seed_dir, disk) < seq for disk, seq in targets.items()):
        if time.monotonic() > deadline:
            got = {disk: applied_seq(seed_dir, disk) for disk in targets}
            raise TimeoutError(f"applier did not catch up: want {targets}, have {got}")
        await asyncio.sleep(0.05)
