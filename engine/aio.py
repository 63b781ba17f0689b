"""How blockferry's processes run their event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from engine.threads import named_pool

T = TypeVar("T")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed (it is the faster loop for TLS ingest)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_with_named_executor(coro))
    return uvloop.run(_with_named_executor(coro))


async def _with_named_executor(coro: Coroutine[Any, Any, T]) -> T:
    """The loop's default executor (``to_thread``, ``run_in_executor(None, …)``: file and directory syncs,
    store calls) as asyncio would make it, but with threads the kernel knows by name (``io_N``)."""
    asyncio.get_running_loop().set_default_executor(named_pool(None, "io"))
    return await coro
