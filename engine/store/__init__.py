"""Cache stores: where sealed log blobs land between the process server and the applier."""

from engine.store.base import CacheStore, StoreError
from engine.store.local import LocalStore

__all__ = ["CacheStore", "LocalStore", "StoreError"]
