"""The ceiling: lz4 + AES-256-GCM over the same bytes, the same number of threads, no I/O.

This is what the machine can do for the engine's essential work (compress, then
encrypt, every batch) with nothing else in the way: no sockets, no TLS, no
frames, no files. Each thread reuses one output buffer (``encrypt_into``), as
DESIGN.md asks of the engine; like the engine, an incompressible batch is
stored rather than compressed. Measured with the rest of the machine idle.
"""

from __future__ import annotations

import os
import threading
import time

import lz4
import lz4.block
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MB = 1e6
AAD = bytes(96)  # about the size of a blob header (the engine authenticates its header as AAD)


class BatchSealer:
    """lz4, then AES-256-GCM into one output buffer kept for good; a batch lz4 cannot shrink is stored raw,
    as the engine stores it. One per thread (the buffer is the thread's): the ceiling and the floor
    (bench/floor.py) both seal this way, so that they measure the same work."""

    def __init__(self, aead: AESGCM, largest: int) -> None:
        self._aead = aead
        self._out = memoryview(bytearray(largest + 64))  # lz4 can grow incompressible input a little

    def seal(self, batch: bytes, counter: int) -> tuple[memoryview, bool]:
        """The sealed batch (a view of the buffer, valid until the next call) and whether it is compressed."""
        packed = lz4.block.compress(batch, store_size=False)
        compressed = len(packed) < len(batch)
        payload = packed if compressed else batch
        sealed = self._out[:len(payload) + 16]
        self._aead.encrypt_into(self.nonce(counter), payload, AAD, sealed)
        return sealed, compressed

    @staticmethod
    def nonce(counter: int) -> bytes:
        """The GCM nonce ``seal(batch, counter)`` used."""
        return counter.to_bytes(12, "little")


def measure_ceiling(batches: list[bytes], threads: int, min_seconds: float = 3.0) -> dict:
    """Seal every batch (repeating passes until ``min_seconds``) on ``threads`` threads; MB/s of input."""
    if not batches:
        raise ValueError("no bytes to measure the ceiling on")
    threads = max(1, threads)
    aead = AESGCM(os.urandom(32))
    largest = max(len(b) for b in batches)
    sample_bytes = sum(len(b) for b in batches)
    compressed = [0]
    stored = [0]
    lock = threading.Lock()

    def work(tid: int, rounds: int, counts: list[int]) -> None:
        sealer = BatchSealer(aead, largest)
        done = 0
        c_total = s_total = 0
        for r in range(rounds):
            for i in range(tid, len(batches), threads):
                batch = batches[i]
                sealed, _ = sealer.seal(batch, r * len(batches) + i)
                done += len(batch)
                if r == 0:
                    c_total += len(sealed)
                    s_total += len(batch)
        counts[tid] = done
        if rounds and c_total:
            with lock:
                compressed[0] += c_total
                stored[0] += s_total

    # one untimed warm-up pass over a few batches (imports, page faults of the output buffers)
    for b in batches[: threads]:
        lz4.block.compress(b, store_size=False)

    rounds, elapsed, processed = 1, 0.0, 0
    while True:
        counts = [0] * threads
        compressed[0] = stored[0] = 0
        pool = [threading.Thread(target=work, args=(t, rounds, counts)) for t in range(threads)]
        start = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        elapsed = time.perf_counter() - start
        processed = sum(counts)
        if elapsed >= min_seconds or rounds >= 64:
            break
        rounds = max(rounds + 1, int(rounds * min_seconds / max(elapsed, 1e-3) * 1.1) + 1)
    return {
        "mbps": processed / elapsed / MB,
        "threads": threads,
        "bytes": processed,
        "seconds": elapsed,
        "sample_bytes": sample_bytes,
        "batches": len(batches),
        "batch_bytes_max": largest,
        "compression_ratio": stored[0] / compressed[0] if compressed[0] else 0.0,
        "what": "lz4.block.compress + AESGCM.encrypt_into per batch, reused output buffer, no I/O",
        "lz4_version": getattr(lz4, "__version__", "?"),
    }
