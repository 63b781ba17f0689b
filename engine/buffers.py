"""Buffers that pool threads reuse instead of allocating one per blob."""

from __future__ import annotations

import threading


class ThreadBuffer:
    """One buffer per thread, grown when a request is larger and otherwise reused.

    Why: a fresh buffer of a few hundred KiB per blob is fresh memory each time (page faults, zeroing),
    and at 1000 disks that cost the seal threads more CPU than AES-GCM. Per thread, because whoever holds
    a view must finish with it before its thread takes the buffer again, and a pool thread does: it
    asks for the next only once its current task is done. A buffer keeps its largest size for good.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def take(self, size: int) -> memoryview:
        """``size`` bytes of this thread's buffer, valid until this thread calls ``take`` again."""
        buffer: bytearray | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size:
            buffer = self._local.buffer = bytearray(size)
        return memoryview(buffer)[:size]
