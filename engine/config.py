"""One TOML file configures the whole data plane.

Every setting has a default, a unit (in its name or its type) and a line of
documentation (the field description, which also feeds docs/configuration.md and
``blockferry config defaults``). Validation errors name the offending key as a
dotted path, e.g. ``batch.max_bytes``, and say why it was refused.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message names the key(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        # TOML has no null: `dir = ""` on a setting whose default is None means "not set, derive it",
        # not Path("") == Path(".") (the working directory).
        if isinstance(data, dict):
            data = {k: v for k, v in data.items()
                    if not (v == "" and k in cls.model_fields and cls.model_fields[k].default is None)}
        return data


class ServerConfig(_Section):
    listen: str = Field("127.0.0.1", description="Address the agent port binds to (0.0.0.0 for all interfaces).")
    port: int = Field(9443, ge=0, le=65535, description="TCP port of the agent protocol (TLS); 0 picks a free port.")
    name: str = Field("blockferry", description="Name this process server reports to agents in WELCOME.")
    data_dir: Path = Field(Path("blockferry-data"),
                           description="Directory for generated TLS/key/token files, the spool and local state.")
    tls_cert: Path | None = Field(None, description="PEM certificate of the agent port; empty: generate a "
                                                    "self-signed one in <data_dir>/tls on first start.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert (must not be group/world readable).")
    agents_file: Path | None = Field(None, description="TOML file of agent ids and token hashes; empty: "
                                                       "<data_dir>/agents.toml, created with one agent on first start.")
    max_frame_bytes: ByteSize = Field(ByteSize(4 * 1024 * 1024 + 64),
                                      description="Largest frame accepted from an agent (bytes).")
    read_buffer_bytes: ByteSize = Field(ByteSize(1024 * 1024),
                                        description="Socket receive buffer per agent connection (bytes).")
    heartbeat_s: float = Field(10.0, gt=0, description="Seconds between heartbeats to idle agents.")
    idle_timeout_s: float = Field(60.0, gt=0, description="Close an agent connection silent for this long (s).")


class BatchConfig(_Section):
    max_bytes: ByteSize = Field(ByteSize(4 * 1024 * 1024), ge=4096,
                                description="Cut a disk's batch into a log blob once it holds this many payload bytes.")
    linger_ms: float = Field(5.0, ge=0, description="Cut a non-empty batch after this long even if not full (ms); "
                                                    "bounds ack latency at low load.")


class PipelineConfig(_Section):
    max_inflight_bytes: ByteSize = Field(ByteSize(256 * 1024 * 1024), ge=1024 * 1024,
                                         description="Payload bytes received but not yet durable, over all disks; "
                                                     "beyond it the server stops reading agent sockets (backpressure).")
    seal_threads: int = Field(0, ge=0, description="Threads for lz4 + AES-GCM sealing; 0 = one per CPU core.")


class SpoolConfig(_Section):
    dir: Path | None = Field(None, description="Where sealed blobs wait for upload; empty: <data_dir>/spool.")
    max_bytes: ByteSize = Field(ByteSize(8 * 1024**3), ge=1024 * 1024,
                                description="Spool capacity (bytes); when full, ingest pauses until uploads free space.")
    fsync: bool = Field(True, description="fsync each spooled blob before acknowledging it (never turn off in "
                                          "production: an ack would no longer mean durable).")


class UploadConfig(_Section):
    concurrency: int = Field(4, ge=1, le=256, description="Blobs uploaded to the cache store at the same time.")
    retry_initial_ms: float = Field(100.0, gt=0, description="First retry delay after a failed upload (ms).")
    retry_max_ms: float = Field(30_000.0, gt=0, description="Cap of the exponential retry delay (ms); "
                                                           "uploads are retried until they succeed.")


class StoreConfig(_Section):
    kind: Literal["local"] = Field("local", description="Cache store backend: 'local' (a directory).")
    path: Path | None = Field(None, description="Directory of the local cache store; empty: <data_dir>/cache.")


class KeysConfig(_Section):
    key_file: Path | None = Field(None, description="32-byte AES-256 key that seals new blobs (mode 0600); empty: "
                                                    "<data_dir>/keys/blob.key, generated on first start.")
    old_key_files: list[Path] = Field(default_factory=list,
                                      description="Retired keys still needed to open older blobs.")


class ApplierConfig(_Section):
    enabled: bool = Field(True, description="Run the applier inside `blockferry serve` (embedded default).")
    seed_dir: Path | None = Field(None, description="Directory of seed disks (one sparse file per disk) and "
                                                    "applier state; empty: <data_dir>/seed.")
    poll_ms: float = Field(200.0, gt=0, description="How often the applier looks for new log blobs (ms).")
    fsync: bool = Field(True, description="fsync the seed disk before recording progress (keep on).")


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    applier: ApplierConfig = Field(default_factory=ApplierConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.pipeline.max_inflight_bytes < 2 * self.batch.max_bytes:
            raise ValueError("pipeline.max_inflight_bytes must be at least twice batch.max_bytes")
        return self

    # Resolved locations: everything defaults to a place under data_dir.
    def _under(self, value: Path | None, *parts: str) -> Path:
        return value if value is not None else self.server.data_dir.joinpath(*parts)

    @property
    def spool_dir(self) -> Path:
        return self._under(self.spool.dir, "spool")

    @property
    def store_dir(self) -> Path:
        return self._under(self.store.path, "cache")

    @property
    def seed_dir(self) -> Path:
        return self._under(self.applier.seed_dir, "seed")

    @property
    def key_file(self) -> Path:
        return self._under(self.keys.key_file, "keys", "blob.key")

    @property
    def agents_file(self) -> Path:
        return self._under(self.server.agents_file, "agents.toml")

    @property
    def state_dir(self) -> Path:
        return self.server.data_dir / "state"

    @property
    def seal_threads(self) -> int:
        return self.pipeline.seal_threads or (os.cpu_count() or 1)


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; `blockferry config defaults` lists them all)"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: Path | str | None) -> Config:
    """Load and validate a TOML config; ``None`` gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, str(path))
