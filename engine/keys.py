"""Encryption keys: generated, loaded and checked for safe permissions.

Keys never appear in logs or errors; they are named by their key id (see
``protocol.logblob.key_id_of``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from engine.fsutil import private_dir, write_durably
from protocol.logblob import KEY_SIZE, key_id_of


class KeyFileError(Exception):
    """A key file is missing, malformed or readable by others."""


def check_private(path: Path, what: str) -> None:
    """Refuse a secret file that group or others can read or write (like ssh does)."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{what} {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by its owner only "
            f"(run: chmod 600 {path})"
        )


def load_key(path: Path) -> bytes:
    try:
        check_private(path, "key file")
        key = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    if len(key) != KEY_SIZE:
        raise KeyFileError(f"key file {path} holds {len(key)} bytes; an AES-256 key is {KEY_SIZE} bytes")
    return key


def ensure_key(path: Path) -> bytes:
    """Load the key at ``path``, generating a fresh random one on first start."""
    if not path.exists():
        private_dir(path.parent)
        write_durably(path, os.urandom(KEY_SIZE), mode=0o600)
    return load_key(path)


class KeyRing:
    """The sealing key plus retired keys still needed to open older blobs."""

    def __init__(self, current: bytes, old: list[bytes] | None = None) -> None:
        self.current = current
        self._by_id = {key_id_of(k): k for k in [current, *(old or [])]}

    def lookup(self, key_id: bytes) -> bytes | None:
        return self._by_id.get(key_id)

    @classmethod
    def from_files(cls, current: Path, old: list[Path], *, create: bool = False) -> KeyRing:
        key = ensure_key(current) if create else load_key(current)
        return cls(key, [load_key(p) for p in old])
