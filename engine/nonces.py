"""AES-GCM nonces for the sealing threads, drawn from the kernel many at a time."""

from __future__ import annotations

import os
import threading

from protocol.logblob import NONCE_SIZE


class RandomNonces:
    """Random 96-bit nonces, as ``os.urandom(12)`` gives them, but ``batch`` per system call.

    ``os.urandom`` releases the GIL, and a thread that releases it beside serve's busy event loop may wait
    up to a switch interval (5 ms) to win it back, once per log commit and once per sealed blob (it
    showed in the commit's p99 in ``python -m bench commit``). Drawing them in bulk keeps the nonces
    exactly as random (and as unique) and leaves one such wait per ``batch`` nonces. Thread-safe.
    """

    def __init__(self, batch: int = 4096) -> None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self._batch = batch
        self._pool = b""
        self._taken = 0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            if self._taken == len(self._pool):
                self._pool, self._taken = os.urandom(NONCE_SIZE * self._batch), 0
            nonce = self._pool[self._taken:self._taken + NONCE_SIZE]
            self._taken += NONCE_SIZE
            return nonce
