"""Agent authentication: each agent has an id and a secret token.

The server stores only SHA-256 hashes of tokens (agents file), compares them in
constant time, and optionally limits each agent to disk-id patterns. The
embedded default creates one agent and writes its token to a 0600 file the
operator hands to the agent.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from engine.fsutil import write_durably
from engine.keys import KeyFileError, check_private

DEFAULT_AGENT = "agent-1"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class AgentEntry:
    agent: str
    token_sha256: str
    disks: tuple[str, ...] = ("*",)

    def may_open(self, disk: str) -> bool:
        return any(fnmatch.fnmatchcase(disk, pattern) for pattern in self.disks)


class AgentRegistry:
    def __init__(self, entries: dict[str, AgentEntry]) -> None:
        self._entries = entries

    def authenticate(self, agent: str, token: str) -> AgentEntry | None:
        entry = self._entries.get(agent)
        # Compare even for unknown agents so timing does not reveal which ids exist.
        expected = entry.token_sha256 if entry else "0" * 64
        ok = hmac.compare_digest(token_hash(token), expected)
        return entry if ok and entry else None

    @classmethod
    def load(cls, path: Path) -> AgentRegistry:
        check_private(path, "agents file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise KeyFileError(f"{path}: not valid TOML: {exc}") from None
        entries: dict[str, AgentEntry] = {}
        for agent, fields in data.get("agents", {}).items():
            digest = fields.get("token_sha256") if isinstance(fields, dict) else None
            if not isinstance(digest, str) or len(digest) != 64:
                raise KeyFileError(f"{path}: agents.{agent}.token_sha256 must be a 64-digit hex SHA-256")
            disks = fields.get("disks", ["*"])
            if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
                raise KeyFileError(f"{path}: agents.{agent}.disks must be a list of disk-id patterns")
            entries[agent] = AgentEntry(agent, digest, tuple(disks))
        return cls(entries)


def add_agent(agents_file: Path, agent: str, disks: tuple[str, ...] = ("*",)) -> str:
    """Append a new agent with a fresh token to ``agents_file``; returns the token (shown once)."""
    token = secrets.token_urlsafe(32)
    existing = agents_file.read_text() if agents_file.exists() else (
        "# blockferry agents: who may connect, by SHA-256 of their token, and which disk ids they may open.\n"
    )
    patterns = ", ".join(f'"{d}"' for d in disks)
    entry = f'\n[agents.{agent}]\ntoken_sha256 = "{token_hash(token)}"\ndisks = [{patterns}]\n'
    agents_file.parent.mkdir(parents=True, exist_ok=True)
    write_durably(agents_file, (existing + entry).encode(), mode=0o600)
    return token


def ensure_default_agent(agents_file: Path, token_file: Path) -> None:
    """First start of the embedded default: one agent, its token in a private file."""
    if agents_file.exists():
        return
    token = add_agent(agents_file, DEFAULT_AGENT)
    write_durably(token_file, (token + "\n").encode(), mode=0o600)


def read_token(path: Path) -> str:
    check_private(path, "token file")
    return path.read_text().strip()
