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


def measure_ceiling(batches: list[bytes], threads: int, min_seconds: float = 3.0) -> dict:
    """Seal every batch (repeating passes until ``min_seconds``) on ``threads`` threads; MB/s of input."""
    if not batches:
        raise ValueError("no bytes to measure the ceiling on")
    threads = max(1, threads)
    aead = AESGCM(os.urandom(32))
    aad = bytes(96)  # about the size of a blob header (the engine authenticates its header as AAD)
    largest = max(len(b) for b in batches)
    sample_bytes = sum(len(b) for b in batches)
    compressed = [0]
    stored = [0]
    lock = threading.Lock()

    def work(tid: int, rounds: int, counts: list[int]) -> None:
        out = bytearray(largest + 64)  # lz4 can grow incompressible input a little; we store those raw
        view = memoryview(out)
        nonce = bytearray(12)
        done = 0
        c_total = s_total = 0
        for r in range(rounds):
            for i in range(tid, len(batches), threads):
                batch = batches[i]
                packed = lz4.block.compress(batch, store_size=False)
                payload = packed if len(packed) < len(batch) else batch
                nonce[:8] = (r * len(batches) + i).to_bytes(8, "little")
                aead.encrypt_into(bytes(nonce), payload, aad, view[:len(payload) + 16])
                done += len(batch)
                if r == 0:
                    c_total += len(payload) + 16
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
