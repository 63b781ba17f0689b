"""The floor: the least CPU an acknowledged byte costs on this machine, step by step, over the same bytes.

Why: the ceiling (bench/ceiling.py) is the seal alone on every core, but the engine cannot give every
core to the seal. On the bench's machine each acknowledged byte is also checksummed and TLS-encrypted
by its agent (the generator shares the cores), TLS-decrypted, checksummed and encrypted into the
write-ahead log by the server, and opened again by the applier to be applied. Here each batch of the
sample goes through every step in turn, on one thread, each step timed on its own clock and done by the C
code the engine calls for it (zlib-ng, OpenSSL through the ssl module's memory BIOs, lz4, AES-GCM) and
nothing else: no Python per frame, no system calls, no copies into files, no undo journal. ``cores / (their CPU seconds per GB)`` is therefore more than any implementation can do here:
the engine is measured against it, and ``bound / ceiling`` is the highest engine / ceiling ratio this
machine allows anyone.
"""

from __future__ import annotations

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

# The steps, in the order a byte takes them, and whose CPU each one is.
AGENT_CHECKSUM = "agent: checksum (CRC-32)"
AGENT_TLS = "agent: TLS encrypt"
SERVER_TLS = "server: TLS decrypt"
SERVER_CHECKSUM = "server: checksum check"
SERVER_LOG = "server: write-ahead log (AES-GCM)"
SERVER_SEAL = "server: seal (lz4 + AES-GCM)"
APPLIER_OPEN = "applier: open (AES-GCM + lz4)"
STEPS = (AGENT_CHECKSUM, AGENT_TLS, SERVER_TLS, SERVER_CHECKSUM, SERVER_LOG, SERVER_SEAL, APPLIER_OPEN)


class _TlsPair:
    """An agent's and a server's end of one TLS session over memory BIOs, with the engine's own contexts
    (so the cipher is the one the agent port negotiates), and the server's reused receive buffer."""

    def __init__(self, largest: int) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
            cert, key = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
            generate_self_signed(cert, key)
            server_ctx, client_ctx = server_context(cert, key), client_context(cert)
        self._to_server, self._from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._to_client, self._from_server = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = client_ctx.wrap_bio(self._to_client, self._from_client, server_hostname="localhost")
        self.server = server_ctx.wrap_bio(self._to_server, self._from_server, server_side=True)
        self._receive = memoryview(bytearray(largest))
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

    def decrypt(self, records: list[bytes]) -> int:
        """Decrypt ``records`` at the server's end into its receive buffer; the bytes it got."""
        got = 0
        for record in records:
            self._to_server.write(record)
            while True:
                try:
                    n = self.server.read(len(self._receive), self._receive)
                except ssl.SSLWantReadError:
                    break
                if not n:
                    break
                got += n
        return got


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


def _pieces(batch: bytes) -> list[memoryview]:
    view = memoryview(batch)
    return [view[i:i + WRITE_BYTES] for i in range(0, len(batch), WRITE_BYTES)]


def _bound(cores: int, s_per_gb: float) -> float:
    return cores / s_per_gb * 1e9 / MB if s_per_gb > 0 else 0.0


def measure_floor(batches: list[bytes], min_seconds: float = 3.0, cores: int | None = None) -> dict:
    """Take every batch through every step (passes until ``min_seconds`` of CPU); CPU s/GB per step and bounds.

    Each batch goes through all the steps before the next one, so a byte is in the caches when the next
    step takes it: a cost no larger than the engine's, as a floor must be.
    """
    if not batches:
        raise ValueError("no bytes to measure the floor on")
    cores = cores or len(os.sched_getaffinity(0))
    largest = max(len(b) for b in batches)
    aead = AESGCM(os.urandom(32))
    sealer = BatchSealer(aead, largest)
    log_aead = AESGCM(os.urandom(32))  # the log's key is not the blobs' (nor are the nonces shared)
    log_out = memoryview(bytearray(largest + 16))
    open_out = memoryview(bytearray(largest + 64))
    tls = _TlsPair(largest)
    clocks = _Clocks()
    done = 0
    counter = 0
    while clocks.total < min_seconds:
        for batch in batches:
            counter += 1
            pieces = _pieces(batch)
            with clocks.timing(AGENT_CHECKSUM):
                for piece in pieces:
                    crc32(piece)
            with clocks.timing(AGENT_TLS):
                records = tls.encrypt(pieces)
            with clocks.timing(SERVER_TLS):
                received = tls.decrypt(records)
            if received != len(batch):
                raise RuntimeError(f"the floor's TLS session returned {received} of {len(batch)} bytes")
            with clocks.timing(SERVER_CHECKSUM):
                for piece in pieces:
                    crc32(piece)
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
    agent = per_gb[AGENT_CHECKSUM] + per_gb[AGENT_TLS]
    server = per_gb[SERVER_TLS] + per_gb[SERVER_CHECKSUM] + per_gb[SERVER_LOG] + per_gb[SERVER_SEAL]
    applier = per_gb[APPLIER_OPEN]
    return {
        "cpu_s_per_gb": per_gb,
        "cpu_s_per_gb_acked": agent + server,
        "cpu_s_per_gb_applied": agent + server + applier,
        "cores": cores,
        # at most this many MB/s acknowledged here (the generator on the same cores, the applier idle) ...
        "bound_acked_mbps": _bound(cores, agent + server),
        # ... and applied as fast (the applier keeping up), and with the agents on other machines
        "bound_applied_mbps": _bound(cores, agent + server + applier),
        "bound_server_alone_mbps": _bound(cores, server + applier),
        "bytes": done,
        "tls": tls.cipher,
        "write_bytes": WRITE_BYTES,
        "what": "every step of an acknowledged byte in C, a batch at a time on one thread: no Python per frame, "
                "no system calls, no file copies, no undo journal",
    }
