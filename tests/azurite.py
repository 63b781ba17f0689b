"""Azurite (the Azure Storage emulator) for tests: a session fixture that finds or starts one.

Use: ``from azurite import azurite`` in tests/conftest.py (or a test module). The fixture

* uses the Azurite that ``BLOCKFERRY_AZURITE=host:port`` names, or else one already answering on
  127.0.0.1:10000 (``BLOCKFERRY_AZURITE=spawn`` skips that and always starts a private one);
* otherwise starts ``azurite-blob`` on a free port with a temporary ``--location`` (from
  ./node_modules/.bin or PATH; if neither has it, ``npm install`` it into the repository once),
  waits until it answers, and stops it when the session ends.

Tests talk to it with the well-known development account (devstoreaccount1 and its published key:
https://learn.microsoft.com/azure/storage/common/storage-use-azurite#well-known-storage-account-and-key)
and should use :meth:`Azurite.new_container` so tests, and runs sharing one Azurite, never collide.
Set ``BLOCKFERRY_SKIP_AZURITE=1`` to skip the Azure tests on a machine without Node.js.
"""

from __future__ import annotations

import http.client
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from azure.storage.blob.aio import BlobServiceClient

ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
NPM_PACKAGE = "azurite@3.35.0"
DEFAULT_PORT = 10000
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Azurite:
    host: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _counter: itertools.count[int] = field(default_factory=itertools.count)
    _run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{ACCOUNT}"

    def endpoint_via(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/{ACCOUNT}"

    def connection_string(self, endpoint: str | None = None, key: str = ACCOUNT_KEY) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
                f"BlobEndpoint={endpoint or self.blob_endpoint};")

    def new_container(self, label: str = "t") -> str:
        """A container name no other test (or concurrent run on a shared Azurite) uses."""
        return f"bf-{label[:20]}-{self._run}-{next(self._counter)}".lower().replace("_", "-")

    def store_section(self, container: str | None = None, **settings: object) -> dict:
        """A ``store`` config section for ``make_config(..., store=...)``."""
        azure = {"connection_string": self.connection_string(), "container": container or self.new_container()}
        azure.update(settings)
        return {"kind": "azure", "azure": azure}


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if an Azurite blob service answers there (it names itself in the Server header)."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", f"/{ACCOUNT}?comp=list")
            response = conn.getresponse()
            response.read()
            return "azurite" in (response.getheader("Server") or "").lower()
        finally:
            conn.close()
    except OSError:
        return False


def find_binary() -> str | None:
    local = REPO / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


def install() -> str | None:
    npm = shutil.which("npm")
    if npm is None:
        return None
    subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", NPM_PACKAGE], cwd=REPO, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, timeout=600)
    return find_binary()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(location: Path, timeout: float = 60.0) -> Azurite:
    binary = find_binary() or install()
    if binary is None:
        raise RuntimeError(f"azurite-blob is not installed and npm is missing: install Node.js, then run "
                           f"`npm install --no-save --no-audit --no-fund {NPM_PACKAGE}` in {REPO}")
    port = _free_port()
    log_path = location / "azurite.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location / "data"),
             "--disableTelemetry", "--skipApiVersionCheck", "--loose", "--silent"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    instance = Azurite("127.0.0.1", port, proc, log_path)
    deadline = time.monotonic() + timeout
    while not answers("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(instance)
            raise RuntimeError(f"azurite-blob did not start: {log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    return instance


def stop(instance: Azurite) -> None:
    proc = instance.proc
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the node process and anything it started
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


_instance: Azurite | None = None  # one per test process, even if the fixture is registered twice


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    global _instance
    if os.environ.get("BLOCKFERRY_SKIP_AZURITE"):
        pytest.skip("BLOCKFERRY_SKIP_AZURITE is set")
    if _instance is not None:
        yield _instance
        return
    wanted = os.environ.get("BLOCKFERRY_AZURITE", "")
    started = False
    if wanted and wanted != "spawn":
        host, _, port = wanted.rpartition(":")
        if not answers(host, int(port)):
            pytest.fail(f"BLOCKFERRY_AZURITE={wanted}: no Azurite answers there")
        _instance = Azurite(host, int(port))
    elif wanted != "spawn" and answers("127.0.0.1", DEFAULT_PORT):
        _instance = Azurite("127.0.0.1", DEFAULT_PORT)
    else:
        _instance = start(tmp_path_factory.mktemp("azurite"))
        started = True
    try:
        yield _instance
    finally:
        if started:
            stop(_instance)
        _instance = None


@pytest.fixture
async def admin(azurite: Azurite) -> AsyncIterator[BlobServiceClient]:
    """A plain SDK client on the account: to look behind the backends' back and to clean up."""
    from azure.storage.blob.aio import BlobServiceClient

    client = BlobServiceClient.from_connection_string(azurite.connection_string())
    yield client
    await client.close()
