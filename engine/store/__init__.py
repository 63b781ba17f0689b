"""Cache stores: where sealed log blobs land between the process server and the applier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.store.base import CacheStore, StoreError
from engine.store.local import LocalStore

if TYPE_CHECKING:
    from engine.store.azure import AzureBlobStore

__all__ = ["AzureBlobStore", "CacheStore", "LocalStore", "StoreError"]


def __getattr__(name: str) -> Any:
    if name == "AzureBlobStore":  # lazily: the Azure SDK costs import time and is only needed when configured
        from engine.store.azure import AzureBlobStore

        return AzureBlobStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
