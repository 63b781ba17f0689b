"""The names the kernel shows for the engine's threads."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

PR_SET_NAME = 15  # prctl(2)
TASK_COMM_LEN = 16  # the kernel keeps 15 bytes and a NUL


def name_os_thread() -> None:
    """Give the calling thread its Python name in the kernel too (cut to 15 bytes).

    Why: otherwise every thread is ``blockferry`` to ``top -H``, ``ps -L``, perf and
    ``/proc/<pid>/task/*/comm``, and an operator cannot tell the event loop from the seal threads or the
    log's commit thread — the first question when serve is slow (docs/operations.md). Used as the
    thread pools' ``initializer``; a no-op where there is no prctl (not Linux).
    """
    name = threading.current_thread().name.encode(errors="replace")[:TASK_COMM_LEN - 1]
    with contextlib.suppress(Exception):  # a name is never worth a thread: raised here, it would break its pool
        ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)


def named_pool(threads: int | None, prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads the kernel knows as ``prefix_N`` (None threads: the executor's default)."""
    return ThreadPoolExecutor(threads, thread_name_prefix=prefix, initializer=name_os_thread)
