"""Shared fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from azurite import admin, azurite  # noqa: F401  (fixtures: Azurite and an SDK client on it)
from support import make_config

from engine.server import ProcessServer


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ProcessServer]:
    async with ProcessServer(make_config(tmp_path / "data")) as ps:
        yield ps
