"""Process-wide memory settings for the long-running processes (serve, apply, serve's applier process)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # mallopt(3) parameter number in glibc's malloc.h
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (default: 8 per core) unless MALLOC_ARENA_MAX says otherwise.

    Why: every pool thread that allocates a multi-MiB blob, record list or before-image gets an
    arena of its own, and memory freed in one arena is never reused by another, so RSS grows to
    many times what is live. Measured at maximum throughput (bench max phase, same run): serve's
    processes peaked at 789 MiB with the default and 606 MiB with two arenas, at the same
    throughput. Call before the thread pools start. Returns whether the cap was applied.
    """
    if "MALLOC_ARENA_MAX" in os.environ:  # the operator's choice wins (glibc read it at start-up)
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        applied = bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to cap
        applied = False
    if not applied:
        log.debug("malloc arenas not capped (no glibc mallopt)")
    return applied
