"""The floor: the least CPU an acknowledged byte costs on this machine, step by step, over the same bytes.

Why: the ceiling (bench/ceiling.py) is the seal alone on every core, but no implementation can give every
core to the seal. On the bench's machine each acknowledged byte is also TLS-encrypted by its agent (the
generator shares the cores) and TLS-decrypted by the server; this design adds a CRC-32 at both ends (the
protocol's end-to-end check), the write-ahead log's AES-GCM (it acknowledges before it seals) and, for the
byte to be applied, the applier's opening of the blob. Here the sample goes through every step in turn on
one thread, each step on its own clock, done by the C code the engine calls for it (OpenSSL through the
ssl module's memory BIOs, zlib-ng, lz4, AES-GCM) and nothing else: no Python per frame, no system calls,
no copies into files, no undo journal. ``cores / (their CPU seconds per GB)`` is therefore more than can
be sustained here: by this design with all its steps, and by any implementation with only those the
mission requires (TLS at both ends and the seal). The engine is measured against the first; the second
is the highest engine / ceiling ratio this machine allows anyone on these libraries and this TLS cipher.
"""

from __future__ import annotations

import itertools
import os
import ssl
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.ceiling import AAD, BatchSealer
from engine.tls import client_context, generate_self_signed, server_context
from protocol.checksum import crc32

MB = 1e6
WRITE_BYTES = 64 * 1024  # the agent writes (checksums, encrypts) the sample in pieces of this size
# The agent's and the server's steps take a slice of writes at a time, as small as still keeps the clocks'
# own cost (~0.3 µs a reading) under 1 %: each step finds the bytes in the caches, as the engine's would.
SLICE_BYTES = 256 * 1024

# The steps, in the order a byte takes them, and whose CPU each one is.
AGENT_CHECKSUM = "agent: checksum (CRC-32)"
AGENT_TLS = "agent: TLS encrypt"
SERVER_TLS = "server: TLS decrypt"
SERVER_CHECKSUM = "server: checksum check"
SERVER_LOG = "server: write-ahead log (AES-GCM)"
SERVER_SEAL = "server: seal (lz4 + AES-GCM)"
APPLIER_OPEN = "applier: open (AES-GCM + lz4)"
STEPS = (AGENT_CHECKSUM, AGENT_TLS, SERVER_TLS, SERVER_CHECKSUM, SERVER_LOG, SERVER_SEAL, APPLIER_OPEN)
REQUIRED = (AGENT_TLS, SERVER_TLS, SERVER_SEAL)  # of any implementation: TLS on the agent port, lz4 + AES-GCM blobs
AGENT = (AGENT_CHECKSUM, AGENT_TLS)
SERVER = (SERVER_TLS, SERVER_CHECKSUM, SERVER_LOG, SERVER_SEAL)


class _TlsPair:
    """An agent's and a server's end of one TLS session over memory BIOs, with the engine's own contexts
    (so the cipher is the one the agent port negotiates), and the server's reused receive buffer."""

    def __init__(self) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            generate_self_signed(cert, key)
            server_ctx, client_ctx = server_context(cert, key), client_context(cert)
        self._to_server, self._from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._to_client, self._from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self._to_client, self._from_client, server_hostname="localhost")
        self.server = server_ctx.wrap_bio(self._to_server, self._from_server, server_side=True)
        self._receive = memoryview(bytearray(SLICE_BYTES))
        self._handshake()

    def _handshake(self) -> None:
        done: set[ssl.SSLObject] = set()
        for _ in range(16):
            for end in (self.client, self.server):
                if end in done:
                    continue
                try:
                    end.do_handshake()
                    done.add(end)
                except ssl.SSLWantReadError:
                    pass
            self._to_server.write(self._from_client.read())
            self._to_client.write(self._from_server.read())
            if len(done) == 2:
                return
        raise RuntimeError("the floor's TLS handshake did not complete")

    @property
    def cipher(self) -> str:
        return f"{self.client.version()} {self.client.cipher()[0]}"

    def encrypt(self, pieces: list[memoryview]) -> list[bytes]:
        """The records the agent's end sends for ``pieces`` (taken out of its BIO as a transport does)."""
        records = []
        for piece in pieces:
            self.client.write(piece)
            records.append(self._from_client.read())
        return records

    def decrypt(self, records: list[bytes]) -> memoryview:
        """Decrypt ``records`` (at most a slice) at the server's end into its receive buffer; what it got."""
        got = 0
        for record in records:
            self._to_server.write(record)
            while True:
                try:
                    n = self.server.read(len(self._receive) - got, self._receive[got:])
                except ssl.SSLWantReadError:
                    break
                if not n:
                    break
                got += n
        return self._receive[:got]


class _Clocks:
    """CPU seconds of this thread, per step."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def timing(self, step: str) -> Iterator[None]:
        start = time.thread_time()
        yield
        self.cpu[step] += time.thread_time() - start

    @property
    def total(self) -> float:
        return sum(self.cpu.values())


def _pieces(data: memoryview) -> list[memoryview]:
    return [data[i:i + WRITE_BYTES] for i in range(0, len(data), WRITE_BYTES)]


def _bound(cores: int, s_per_gb: float) -> float:
    return cores / s_per_gb * 1e9 / MB if s_per_gb > 0 else 0.0


def measure_floor(batches: list[bytes], min_seconds: float = 3.0, cores: int | None = None) -> dict:
    """Take the batches through every step (at least one batch, then on until ``min_seconds`` of CPU):
    CPU s/GB per step and the bounds they set on ``cores`` (default: every CPU, as the engine's threads)."""
    if not batches:
        raise ValueError("no bytes to measure the floor on")
    cores = cores or os.cpu_count() or 1
    largest = max(len(b) for b in batches)
    aead = AESGCM(os.urandom(32))
    sealer = BatchSealer(aead, largest)
    log_aead = AESGCM(os.urandom(32))  # the log's key is not the blobs' (nor are the nonces shared)
    log_out = memoryview(bytearray(largest + 16))
    open_out = memoryview(bytearray(largest + 64))
    tls = _TlsPair()
    clocks = _Clocks()
    done = 0
    for counter, batch in enumerate(itertools.cycle(batches), 1):
        view = memoryview(batch)
        for start in range(0, len(batch), SLICE_BYTES):
            pieces = _pieces(view[start:start + SLICE_BYTES])
            with clocks.timing(AGENT_CHECKSUM):
                sent = [crc32(piece) for piece in pieces]
            with clocks.timing(AGENT_TLS):
                records = tls.encrypt(pieces)
            with clocks.timing(SERVER_TLS):
                received = tls.decrypt(records)
            with clocks.timing(SERVER_CHECKSUM):
                checked = [crc32(piece) for piece in _pieces(received)]
            if checked != sent:
                raise RuntimeError("the floor's TLS session did not return the bytes it was given")
        with clocks.timing(SERVER_LOG):
            log_aead.encrypt_into(BatchSealer.nonce(counter), batch, AAD, log_out[:len(batch) + 16])
        with clocks.timing(SERVER_SEAL):
            sealed, compressed = sealer.seal(batch, counter)
        blob = bytes(sealed)  # the applier reads its own copy (untimed: the file read is not counted)
        with clocks.timing(APPLIER_OPEN):
            opened = open_out[:len(blob) - 16]
            aead.decrypt_into(BatchSealer.nonce(counter), blob, AAD, opened)
            if compressed:  # lz4 has no decompress-into: this one allocates, as the applier's does
                lz4.block.decompress(opened, uncompressed_size=len(batch))
        done += len(batch)
        if clocks.total >= min_seconds:
            break
    per_gb = {step: clocks.cpu[step] / done * 1e9 for step in STEPS}

    def cost(*groups: tuple[str, ...]) -> float:
        return sum(per_gb[step] for group in groups for step in group)

    return {
        "cpu_s_per_gb": per_gb,
        "cpu_s_per_gb_acked": cost(AGENT, SERVER),
        "cores": cores,
        # sustained MB/s acknowledged (and sealed) at most: by this design with the generator on the same
        # cores and the applier idle; by any implementation (the required steps only); by this design with
        # the applier keeping up; and so with the agents on other machines
        "bound_acked_mbps": _bound(cores, cost(AGENT, SERVER)),
        "bound_required_mbps": _bound(cores, cost(REQUIRED)),
        "bound_applied_mbps": _bound(cores, cost(AGENT, SERVER, (APPLIER_OPEN,))),
        "bound_applied_agents_elsewhere_mbps": _bound(cores, cost(SERVER, (APPLIER_OPEN,))),
        "required_steps": list(REQUIRED),
        "bytes": done,
        "tls": tls.cipher,
        "write_bytes": WRITE_BYTES,
        "what": "every step of an acknowledged byte in C on one thread: no Python per frame, no system calls, "
                "no file copies, no undo journal",
    }
