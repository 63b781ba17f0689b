"""The real `blockferry` console script, run as a subprocess: config, inspect-log, serve/agent/apply, demo."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import free_port

from protocol import TagKind
from protocol.logblob import BlobHeader, Sealer, blob_name, key_id_of, tag_record, write_record_header

pytestmark = pytest.mark.timeout(120)

KiB = 1024
MiB = 1024 * KiB
BLOCKFERRY = shutil.which("blockferry", path=str(Path(sys.executable).parent)) or str(
    Path(sys.executable).parent / "blockferry")


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # callers assert on the exit code themselves (several expect a failure)
    return subprocess.run([BLOCKFERRY, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"}, check=False)


def wait_until(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {log.read_text()[-3000:] if log else ''}")


class Background:
    """A long-running `blockferry` command; stopped with SIGINT like an operator's Ctrl-C."""

    def __init__(self, log: Path, *args: str | Path) -> None:
        self.log = log
        with open(log, "wb") as out:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen([BLOCKFERRY, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "COLUMNS": "200"})

    def interrupt(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.proc.args[1]} did not exit within {timeout}s of SIGINT: "
                                 f"{self.log.read_text()[-3000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def background() -> Iterator[list[Background]]:
    started: list[Background] = []
    yield started
    for b in started:
        b.kill()


# ---------------------------------------------------------------- config


def test_config_defaults_pass_config_check(tmp_path: Path) -> None:
    defaults = run("config", "defaults")
    assert defaults.returncode == 0, defaults.stderr
    data = tomllib.loads(defaults.stdout)
    assert {"server", "batch", "spool", "applier"} <= data.keys() and data["server"]["port"] == 9443
    path = tmp_path / "defaults.toml"
    path.write_text(defaults.stdout)
    check = run("config", "check", path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == f"{path}: ok"


@pytest.mark.parametrize("text, keys", [
    ("[batch]\nmax_bytez = 1\n", ["batch.max_bytez"]),
    ('[batch]\nmax_bytes = 100\n[server]\nport = 70000\n', ["batch.max_bytes", "server.port"]),
], ids=["misspelled-key", "two-bad-values"])
def test_config_check_names_the_bad_keys(tmp_path: Path, text: str, keys: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    check = run("config", "check", path)
    assert check.returncode != 0
    assert "ok" not in check.stdout
    for key in keys:
        assert re.search(rf"^\s+{re.escape(key)}: ", check.stderr, re.MULTILINE), check.stderr
    if "max_bytez" in text:
        assert "unknown setting" in check.stderr


# ---------------------------------------------------------------- inspect-log


@pytest.fixture
def sealed_blob(tmp_path: Path) -> tuple[Path, bytes]:
    """A real log blob (3 records of disk 'disk-x', sequences 5..7) and its key."""
    key = os.urandom(32)
    records = (write_record_header(5, 1_700_000_000_000_000, 0, 4096) + random.Random(1).randbytes(4096)
               + write_record_header(6, 1_700_000_000_000_100, 8192, 1024) + bytes(1024)
               + tag_record(7, 1_700_000_000_000_200, TagKind.APP, "nightly"))
    header = BlobHeader("disk-x", 1 * MiB, 5, 7, 3, 1_700_000_001_000_000, 1_700_000_000_000_200)
    sealed = bytes(Sealer(key).seal(records, header, os.urandom(12)))
    path = tmp_path / blob_name("disk-x", 5, 7).replace("/", "_")
    path.write_bytes(sealed)
    return path, key


def _key_file(tmp_path: Path, key: bytes, mode: int, name: str = "blob.key") -> Path:
    path = tmp_path / name
    path.write_bytes(key)
    path.chmod(mode)
    return path


HEADER_LINES = [
    r"^disk\s+disk-x$",
    r"^sequences\s+5\.\.7 \(3 records\)$",
    rf"^disk size\s+{MiB}$",
    r"^created\s+2023-11-14T22:13:21\.000000\+00:00$",
    r"^last source\s+2023-11-14T22:13:20\.000200\+00:00$",
]
RECORD_LINES = [
    r"^\s+seq\s+5\s+write\s+offset\s+0\s+length\s+4096\s+at 2023-11-14T22:13:20\.000000\+00:00$",
    r"^\s+seq\s+6\s+write\s+offset\s+8192\s+length\s+1024\s+at 2023-11-14T22:13:20\.000100\+00:00$",
    r"^\s+seq\s+7\s+tag\s+app\s+'nightly'\s+at 2023-11-14T22:13:20\.000200\+00:00$",
]


def test_inspect_log_with_key_lists_header_and_records(tmp_path: Path, sealed_blob: tuple[Path, bytes]) -> None:
    blob, key = sealed_blob
    result = run("inspect-log", blob, "--key-file", _key_file(tmp_path, key, 0o600))
    assert result.returncode == 0, result.stderr
    for pattern in HEADER_LINES + RECORD_LINES:
        assert re.search(pattern, result.stdout, re.MULTILINE), (pattern, result.stdout)
    assert f"key id {key_id_of(key).hex()}" in result.stdout
    assert "records (authenticated):" in result.stdout
    assert len(re.findall(r"^\s+seq\s+\d+", result.stdout, re.MULTILINE)) == 3
    assert key.hex() not in result.stdout


def test_inspect_log_without_key_prints_only_the_header(sealed_blob: tuple[Path, bytes]) -> None:
    blob, _key = sealed_blob
    result = run("inspect-log", blob)
    assert result.returncode == 0, result.stderr
    for pattern in HEADER_LINES:
        assert re.search(pattern, result.stdout, re.MULTILINE), (pattern, result.stdout)
    assert "no key given" in result.stdout
    assert not re.search(r"^\s+seq\s+\d+", result.stdout, re.MULTILINE)
    assert "authenticated" not in result.stdout


def test_inspect_log_refuses_a_readable_key_file(tmp_path: Path, sealed_blob: tuple[Path, bytes]) -> None:
    blob, key = sealed_blob
    key_file = _key_file(tmp_path, key, 0o644)
    result = subprocess.run([BLOCKFERRY, "inspect-log", str(blob), "--key-file", str(key_file)], capture_output=True,
                            timeout=60, check=False)
    assert result.returncode != 0
    err = result.stderr.decode(errors="replace")
    assert "chmod 600" in err and str(key_file) in err and "0644" in err, err
    for out in (result.stdout, result.stderr):  # never the key, in any spelling
        assert key not in out and key.hex().encode() not in out and key.hex().upper().encode() not in out
    assert b"seq " not in result.stdout


def test_inspect_log_with_the_wrong_key_fails_without_records(tmp_path: Path,
                                                              sealed_blob: tuple[Path, bytes]) -> None:
    blob, key = sealed_blob
    other = os.urandom(32)
    result = run("inspect-log", blob, "--key-file", _key_file(tmp_path, other, 0o600, "other.key"))
    assert result.returncode != 0
    assert f"no key with id {key_id_of(key).hex()}" in result.stderr, result.stderr
    assert not re.search(r"^\s+seq\s+\d+", result.stdout, re.MULTILINE)


# ---------------------------------------------------------------- serve + agent replicate + apply


def _source_file(path: Path, size: int, seed: int) -> bytes:
    """Random data with zero regions: whole 64 KiB blocks, unaligned runs and a zero tail."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start, length in ((1 * MiB, 2 * MiB), (3 * MiB + 100_000, 1 * MiB + 12_345), (6 * MiB + 7, 10_000),
                          (size - 70_000, 70_000)):
        start, length = min(start, size), min(length, max(size - start, 0))
        data[start:start + length] = bytes(length)
    path.write_bytes(data)
    return bytes(data)


def _nonzero_blocks_bytes(data: bytes, block: int = 64 * KiB) -> int:
    """What the initial copy of a fresh disk sends: every block that is not all zeros (sector-rounded)."""
    padded = data + bytes(-len(data) % 512)
    return sum(len(padded[i:i + block]) for i in range(0, len(padded), block) if any(padded[i:i + block]))


def test_serve_replicate_apply_end_to_end(tmp_path: Path, background: list[Background]) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    config = tmp_path / "blockferry.toml"
    config.write_text(f"""
[server]
data_dir = "{data_dir}"
port = {port}

[batch]
linger_ms = 2

[applier]
enabled = false  # `blockferry apply` does the applying, after the server stopped
poll_ms = 50

[http]
port = 0
""")
    assert run("config", "check", config).returncode == 0
    sources = {
        "big": _source_file(tmp_path / "big.img", 8 * MiB, seed=3),
        "odd": _source_file(tmp_path / "odd.img", 300_001, seed=4),  # not a whole number of sectors
    }

    server = Background(tmp_path / "serve.log", "serve", "--config", config)
    background.append(server)

    def accepting() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(accepting, 30, "the server to listen", server.proc, server.log)
    token_file, cafile = data_dir / "agent-1.token", data_dir / "tls" / "server.crt"
    assert token_file.stat().st_mode & 0o777 == 0o600

    for disk, source in sources.items():
        result = run("agent", "replicate", tmp_path / f"{disk}.img", "--disk", disk, "--server", f"127.0.0.1:{port}",
                     "--cafile", cafile, "--token-file", token_file, "--once", timeout=90)
        assert result.returncode == 0, result.stderr[-3000:]
        sent = re.search(r"initial copy acknowledged: (\d+) bytes sent in (\d+) writes", result.stderr)
        assert sent, result.stderr[-3000:]
        assert int(sent.group(1)) == _nonzero_blocks_bytes(source)  # zero blocks of a fresh disk are skipped
    token = token_file.read_text().strip()

    # everything acknowledged reaches the cache store (a small last batch after batch.min_bytes_wait_ms); then
    # stop the server like an operator would
    spool, cache = data_dir / "spool", data_dir / "cache"
    wait_until(lambda: not list(spool.glob("*/*.bflog")) and {b.parent.name for b in cache.glob("*/*.bflog")}
               == set(sources), 30, "uploads to the cache store", server.proc, server.log)
    blobs = sorted(cache.glob("*/*.bflog"))
    assert {b.parent.name for b in blobs} == set(sources)
    assert server.interrupt() == 0, server.log.read_text()[-3000:]
    serve_log = server.log.read_text()
    assert "Traceback" not in serve_log
    assert token not in serve_log
    assert not (data_dir / "seed" / "big.img").exists()  # the server's applier was disabled

    applier = Background(tmp_path / "apply.log", "apply", "--config", config)
    background.append(applier)
    expected = {disk: source + bytes(-len(source) % 512) for disk, source in sources.items()}

    def applied() -> bool:
        paths = {disk: data_dir / "seed" / f"{disk}.img" for disk in expected}
        return (all(p.exists() and p.stat().st_size == len(expected[d]) for d, p in paths.items())
                and all(paths[d].read_bytes() == expected[d] for d in expected)
                and not list((data_dir / "cache").glob("*/*.bflog")))

    wait_until(applied, 60, "the applier to catch up", applier.proc, applier.log)
    refused = run("disk", "reset", "--disk", "big", "--config", config, "--yes")
    assert refused.returncode != 0 and "another applier is running" in refused.stderr, refused.stderr[-3000:]
    assert applier.interrupt() == 0, applier.log.read_text()[-3000:]
    assert "Traceback" not in applier.log.read_text()
    for disk, want in expected.items():
        image = (data_dir / "seed" / f"{disk}.img").read_bytes()
        assert len(image) == len(want) == -(-len(sources[disk]) // 512) * 512
        assert image == want, f"seed image of {disk} differs from the replicated file"

    # a full resync's first step: the seed emptied, its points released, serve to resume after all it held
    reset = run("disk", "reset", "--disk", "big", "--config", config, "--yes")
    assert reset.returncode == 0, reset.stderr[-3000:]
    assert re.search(r"disk big: seed emptied, \d+ recovery points released; serve resumes it after sequence \d+",
                     " ".join(reset.stderr.split())), reset.stderr
    assert (data_dir / "seed" / "big.img").read_bytes() == bytes(len(expected["big"]))
    assert (data_dir / "seed" / "odd.img").read_bytes() == expected["odd"]
    listed = run("points", "list", "--disk", "big", "--config", config, "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout + listed.stderr


# ---------------------------------------------------------------- demo


def test_demo_proves_byte_identical_copies(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    result = run("demo", "--seconds", "3", "--disk-size", "16MiB", "--disks", "2", "--data-dir", data_dir,
                 timeout=110)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    assert "byte-identical" in result.stdout
    assert "MISMATCH" not in result.stdout
    for i in range(2):
        assert (data_dir / "seed" / f"demo-disk-{i}.img").stat().st_size == 16 * MiB
