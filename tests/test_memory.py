"""The malloc arena cap of the long-running processes."""

from __future__ import annotations

import platform

import pytest

from engine.memory import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt arenas are a glibc feature")
def test_arenas_are_capped_on_glibc() -> None:
    assert limit_malloc_arenas() is True


def test_the_operators_malloc_arena_max_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert limit_malloc_arenas() is False
