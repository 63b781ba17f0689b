"""One TOML file configures the whole data plane.

Every setting has a default, a unit (in its name or its type) and a line of
documentation (the field description, which also feeds docs/configuration.md and
``blockferry config defaults``). Validation errors name the offending key as a
dotted path, e.g. ``batch.max_bytes``, and say why it was refused.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A configuration file is unreadable or invalid; the message names the key(s)."""


class _Section(BaseModel):
    # hide_input_in_errors: a rejected value may be a secret (a storage key), so errors name the key only
    model_config = ConfigDict(extra="forbid", validate_default=True, hide_input_in_errors=True)

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
                                        description="Socket receive buffer per agent connection (bytes); less "
                                                    "when many connections share read_buffers_total_bytes.")
    read_buffers_total_bytes: ByteSize = Field(
        ByteSize(32 * 1024 * 1024), ge=32 * 1024,
        description="About what all agent connections' receive buffers add up to (under twice this): a "
                    "connection gets read_buffer_bytes or its share of this, at least 32KiB, and all of them "
                    "the current share whenever their number reaches a power of two. A socket read reaches as "
                    "far as its buffer, and the TLS layer keeps a buffer per connection as large as its reads: "
                    "at 1000 agents, 1MiB each put serve at 977-1004 MiB RSS, this budget at 890, at the same "
                    "throughput (docs/benchmarks.md).")
    heartbeat_s: float = Field(10.0, gt=0, description="Seconds between heartbeats to idle agents.")
    idle_timeout_s: float = Field(60.0, gt=0, description="Close an agent connection silent for this long (s).")


class BatchConfig(_Section):
    max_bytes: ByteSize = Field(ByteSize(4 * 1024 * 1024), ge=4096,
                                description="Cut a disk's batch into a log blob once it holds this many payload bytes.")
    linger_ms: float = Field(250.0, ge=0, description="Cut a non-empty batch into a log blob after this long even if "
                                                      "not full (ms; a batch below min_bytes: up to "
                                                      "min_bytes_wait_ms). Acks do not wait for it (they follow the "
                                                      "spool's write-ahead log); it bounds how long a write waits to "
                                                      "be stored, and fewer, larger blobs cost less per byte "
                                                      "(at half load 50 ms cost 25 % more CPU per GB than 250; "
                                                      "500 raised ack p99 and lag: docs/benchmarks.md).")
    min_bytes: ByteSize = Field(ByteSize(1024 * 1024), ge=0,
                                description="A batch smaller than this when its linger ends waits for more, up to "
                                            "min_bytes_wait_ms, and is cut as soon as it holds this many payload "
                                            "bytes: a blob costs a file, a sync and an apply group whatever its "
                                            "size. Fast disks fill it within the linger and are not affected. 0: "
                                            "always cut at linger_ms; above max_bytes: max_bytes.")
    min_bytes_wait_ms: float = Field(4000.0, ge=0,
                                     description="How long in all a batch below min_bytes may wait (ms, counted "
                                                 "from its first write; less than linger_ms means linger_ms, and "
                                                 "linger_ms = 0 cuts every batch at once): a slow disk's "
                                                 "writes may wait this long to be stored, i.e. its recovery points "
                                                 "lag by up to this minus linger_ms more. "
                                                 "1 MiB and 4 s against 256 KiB and 1 s: 17-18 % more carried at "
                                                 "100 and 1000 agents, at 12-13 % less CPU per GB, blobs twice the "
                                                 "size; 10 agents unchanged (docs/benchmarks.md).")


class PipelineConfig(_Section):
    max_inflight_bytes: ByteSize = Field(ByteSize(64 * 1024 * 1024), ge=1024 * 1024, le=2 * 1024**3,
                                         description="Payload bytes held in memory, over all disks: received "
                                                     "and not yet sealed, less what batches opened above a "
                                                     "quarter of this left to the write-ahead log (read back "
                                                     "when sealed); at most 2GiB (one log commit must fit the "
                                                     "log's 32-bit chunk length); "
                                                     "beyond it the server stops reading agent sockets (backpressure). "
                                                     "More only queues: at 90 % load 128MiB doubled ack p99 over "
                                                     "64MiB; 32MiB and less cost throughput (docs/benchmarks.md).")
    seal_threads: int = Field(0, ge=0, description="Threads for lz4 + AES-GCM sealing; 0 = one per CPU core.")


class SpoolConfig(_Section):
    dir: Path | None = Field(None, description="The write-ahead log and the sealed blobs waiting for upload; "
                                               "empty: <data_dir>/spool.")
    max_bytes: ByteSize = Field(ByteSize(8 * 1024**3), ge=1024 * 1024,
                                description="Spool capacity (bytes: write-ahead log and sealed blobs); when full, "
                                            "ingest pauses until uploads free space. Used blob files kept for "
                                            "reuse (<dir>/.recycle: at most 256, of about batch.max_bytes each) "
                                            "and up to two released log segments kept to be written over "
                                            "(<dir>/.wal/*.free, at most an eighth of this each) come on top: "
                                            "size the disk for both.")
    fsync: bool = Field(True, description="fdatasync the write-ahead log before acknowledging, and a blob's data "
                                          "before the local cache store links it (never turn off in production: "
                                          "an ack would no longer mean durable).")


class UploadConfig(_Section):
    concurrency: int = Field(4, ge=1, le=256, description="Upload rounds in flight at once; a round takes what "
                                                          "has queued, up to 64 blobs (512 for the local store, "
                                                          "which syncs a round side by side).")
    retry_initial_ms: float = Field(100.0, gt=0, description="First retry delay after a failed upload (ms).")
    retry_max_ms: float = Field(30_000.0, gt=0, description="Cap of the exponential retry delay (ms); "
                                                           "uploads are retried until they succeed.")

    def retry_delays(self) -> Iterator[float]:
        """Seconds before each retry: doubling from retry_initial_ms up to retry_max_ms, for good. Spool
        writes, log appends and watermark saves retry on the same schedule as uploads."""
        delay = self.retry_initial_ms / 1000
        while True:
            yield delay
            delay = min(delay * 2, self.retry_max_ms / 1000)


AZURE_ENV = {  # setting of [store.azure] -> environment variable consulted when the setting is absent
    "connection_string": "BLOCKFERRY_AZURE_CONNECTION_STRING",
    "account_url": "BLOCKFERRY_AZURE_ACCOUNT_URL",
    "account_key": "BLOCKFERRY_AZURE_ACCOUNT_KEY",
    "sas_token": "BLOCKFERRY_AZURE_SAS_TOKEN",
}
_CONTAINER_NAME = re.compile(r"[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class AzureCredentials:
    """Resolved account settings. ``repr`` shows where each part came from, never a secret."""

    source: str                                      # "[store.azure]" or "environment"
    connection_string: SecretStr | None = None
    account_url: str | None = None
    credential: SecretStr | None = None              # account key or SAS token
    method: Literal["connection_string", "account_key", "sas_token"] = "connection_string"


class _BlobLocation(_Section):
    """Validation shared by the tables that name an Azure container and a blob-name prefix."""

    @field_validator("container", check_fields=False)
    @classmethod
    def _container_name(cls, value: str) -> str:
        if not _CONTAINER_NAME.fullmatch(value):
            raise ValueError("an Azure container name is 3-63 characters of a-z, 0-9 and single hyphens, "
                             "starting and ending with a letter or digit")
        return value

    @field_validator("prefix", check_fields=False)
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/") or "\\" in value:
            raise ValueError("a blob-name prefix must not start with '/' or contain '..' or '\\'")
        return value if not value or value.endswith("/") else value + "/"


class AzureStoreConfig(_BlobLocation):
    """Azure Blob Storage cache account (used when store.kind = "azure"). Credentials are taken from this table
    if it holds any, else from the environment (BLOCKFERRY_AZURE_CONNECTION_STRING, or BLOCKFERRY_AZURE_ACCOUNT_URL
    with BLOCKFERRY_AZURE_SAS_TOKEN or BLOCKFERRY_AZURE_ACCOUNT_KEY); secrets are never printed."""

    connection_string: SecretStr | None = Field(
        None, description="Storage connection string (holds the account key: prefer the environment variable "
                          "BLOCKFERRY_AZURE_CONNECTION_STRING); empty: use account_url with sas_token or account_key.")
    account_url: str | None = Field(
        None, description="Blob endpoint such as https://<account>.blob.core.windows.net; empty: "
                          "BLOCKFERRY_AZURE_ACCOUNT_URL. Not used with a connection string.")
    account_key: SecretStr | None = Field(
        None, description="Shared account key for account_url; empty: BLOCKFERRY_AZURE_ACCOUNT_KEY.")
    sas_token: SecretStr | None = Field(
        None, description="SAS token for account_url (needs read, add, create, write, delete and list on the "
                          "container); empty: BLOCKFERRY_AZURE_SAS_TOKEN.")
    container: str = Field("blockferry-cache", description="Container of the log blobs; created if missing.")
    prefix: str = Field("", description="Blob-name prefix (a virtual folder such as \"ps1/\") so several process "
                                        "servers can share one container; \"\" = none.")
    max_concurrency: int = Field(2, ge=1, le=64, description="Parallel requests for one blob (its blocks or "
                                                             "download ranges); at most upload.concurrency times "
                                                             "this many requests are in flight.")
    single_put_max_bytes: ByteSize = Field(ByteSize(64 * 1024 * 1024), ge=1024 * 1024, le=5000 * 1024 * 1024,
                                           description="Blobs up to this size are uploaded with one Put Blob "
                                                       "request (one transaction); larger ones as blocks.")
    block_bytes: ByteSize = Field(ByteSize(4 * 1024 * 1024), ge=64 * 1024, le=4000 * 1024 * 1024,
                                  description="Block size for blobs larger than single_put_max_bytes.")
    timeout_s: float = Field(30.0, gt=0, description="Network timeout of one request (connect, and each read) (s).")
    retry_total: int = Field(3, ge=0, le=20, description="Retries of one request inside the Azure SDK (exponential "
                                                         "backoff with jitter) before the pipeline's own endless "
                                                         "upload retry takes over.")
    retry_initial_ms: float = Field(250.0, gt=0, description="First SDK retry delay (ms); doubles per retry.")
    retry_max_ms: float = Field(8000.0, gt=0, description="Cap of the SDK retry delay (ms).")

    @field_validator("account_url")
    @classmethod
    def _account_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/?#\s]+", value):
            raise ValueError("must be an http(s) URL such as https://<account>.blob.core.windows.net")
        if value is not None and "?" in value:
            raise ValueError("must not carry a query string: put a SAS token in store.azure.sas_token")
        return value

    def credentials(self, environ: Mapping[str, str] | None = None) -> AzureCredentials:
        """The account settings to connect with, from this table or else the environment.

        Raises ValueError naming the ``store.azure.*`` keys (and variables) when they are missing or ambiguous.
        """
        env = os.environ if environ is None else environ
        secrets = ("connection_string", "account_key", "sas_token")
        if any(getattr(self, key) is not None for key in secrets):
            source = "[store.azure]"
            values = {key: getattr(self, key) for key in secrets}
        else:
            source = "environment"
            values = {key: SecretStr(env[AZURE_ENV[key]]) if env.get(AZURE_ENV[key]) else None for key in secrets}
        url = self.account_url or env.get(AZURE_ENV["account_url"]) or None
        names = {key: f"store.azure.{key}" if source == "[store.azure]" else AZURE_ENV[key] for key in secrets}
        given = [key for key in secrets if values[key] is not None]
        if values["connection_string"] is not None:
            if len(given) > 1:
                raise ValueError(f"{names['connection_string']} is set together with "
                                 f"{' and '.join(names[k] for k in given[1:])}: set only one way to authenticate")
            if self.account_url is not None:
                raise ValueError("store.azure.account_url is not used with a connection string (which names the "
                                 "endpoint): set only one of them")
            return AzureCredentials(source, connection_string=values["connection_string"])
        if not given:
            raise ValueError(
                'store.kind = "azure" needs credentials: set store.azure.connection_string, or store.azure.account_url '
                "with store.azure.sas_token or store.azure.account_key (or the environment variables "
                f"{', '.join(AZURE_ENV.values())})")
        if len(given) > 1:
            raise ValueError(f"{names['account_key']} and {names['sas_token']} are both set: set only one")
        if url is None:
            raise ValueError(f"{names[given[0]]} needs store.azure.account_url (or {AZURE_ENV['account_url']})")
        if not re.match(r"https?://[^/?#\s]+", url) or "?" in url:
            raise ValueError(f"{AZURE_ENV['account_url']} must be an http(s) URL without a query string")
        return AzureCredentials(source, account_url=url, credential=values[given[0]], method=given[0])


class StoreConfig(_Section):
    kind: Literal["local", "azure"] = Field("local", description="Cache store backend: 'local' (a directory) or "
                                                                 "'azure' (Azure Blob Storage, see [store.azure]).")
    path: Path | None = Field(None, description="Directory of the local cache store; empty: <data_dir>/cache.")
    azure: AzureStoreConfig = Field(default_factory=AzureStoreConfig)

    @model_validator(mode="after")
    def _azure_needs_credentials(self) -> StoreConfig:
        if self.kind == "azure":
            self.azure.credentials()
        return self


class KeysConfig(_Section):
    key_file: Path | None = Field(None, description="32-byte AES-256 key that seals new blobs (mode 0600); empty: "
                                                    "<data_dir>/keys/blob.key, generated on first start.")
    old_key_files: list[Path] = Field(default_factory=list,
                                      description="Retired keys still needed to open older blobs.")


class SeedAzureConfig(_BlobLocation):
    """Seed disks on Azure Blob Storage (used when applier.volume = "azure"): each disk's image is a page blob
    <prefix><disk>.img, its applier state the block blob <prefix><disk>.state.json and its undo journal the block
    blobs <prefix>journal/<disk>/*.undo, so the applier can run on any machine that reaches the account. The account,
    its credentials, timeouts and SDK retries are those of [store.azure] (that table, else the BLOCKFERRY_AZURE_*
    environment), whatever store.kind is. The running applier holds a lease on the blob <prefix>.applier.lock, so a
    second applier on the same container and prefix is refused, from any machine."""

    container: str = Field("blockferry-seed", description="Container of the seed page blobs, applier state and "
                                                          "undo journal; created if missing.")
    prefix: str = Field("", description="Blob-name prefix (a virtual folder such as \"site-a/\") so several "
                                        "appliers can share one container, each with its own lease; \"\" = none.")
    max_concurrency: int = Field(8, ge=1, le=64, description="Parallel requests of one seed operation on one disk "
                                                             "(page uploads of up to 4 MiB, range reads, the page "
                                                             "ranges of a failover copy).")


class ApplierConfig(_Section):
    enabled: bool = Field(True, description="Run the applier from `blockferry serve` (embedded default); false "
                                            "when `blockferry apply` runs it elsewhere.")
    process: bool = Field(True, description="Run serve's applier as its own child process (own core, own GIL: "
                                            "ingest and apply do not slow each other; restarted if it dies); "
                                            "false runs it on the server's event loop.")
    nice: int = Field(10, ge=0, le=19, description="How much nicer (lower CPU priority) than serve its applier "
                                                   "process runs. Under CPU contention acknowledging writes goes "
                                                   "first (agents wait for acks; a recovery point only comes "
                                                   "later) and the applier catches up with the CPU ingest leaves; "
                                                   "at 1000 agents on 2 cores, 10 against 0 carried 187 against "
                                                   "154 MB/s. 0: the same share as ingest. Only with process = "
                                                   "true (run `blockferry apply` under nice(1) yourself).")
    http_port: int = Field(9465, ge=0, le=65535, description="Port of the applier process's /metrics, /healthz "
                                                             "and /api (recovery commands find it by "
                                                             "themselves); 0 picks a free port.")
    volume: Literal["local", "azure"] = Field("local", description="Where seed disks, applier state and the undo "
                                                                   "journal live: 'local' (sparse files in seed_dir) "
                                                                   "or 'azure' (page blobs, see [applier.azure]).")
    seed_dir: Path | None = Field(None, description="Directory of seed disks (one sparse file per disk) and "
                                                    "applier state; with volume = 'azure' it holds only the "
                                                    "applier's lock file and the id of its Azure lease; empty: "
                                                    "<data_dir>/seed.")
    poll_ms: float = Field(200.0, gt=0, description="How often the applier looks for new log blobs (ms).")
    fsync: bool = Field(True, description="fsync the local seed disk before recording progress (keep on); an "
                                          "Azure page write is durable once acknowledged.")
    group_max_bytes: ByteSize = Field(ByteSize(8 * 1024 * 1024), ge=1024 * 1024,
                                      description="Most log-blob payload folded into one apply group (one undo "
                                                  "entry); a backlog is applied as several groups. The applier "
                                                  "holds a few times this per disk it applies at once (two): "
                                                  "8 MiB against 16 kept its process ~65 MiB smaller at the "
                                                  "maximum ingest and drained a backlog as fast.")
    prune_interval_s: float = Field(30.0, gt=0, description="How often recovery points beyond retention are "
                                                            "pruned (s); pruning never pauses applying.")
    azure: SeedAzureConfig = Field(default_factory=SeedAzureConfig)


class PolicyConfig(_Section):
    """A replication policy (ASR's term): recovery-point retention and the RPO alert threshold."""

    disks: list[str] = Field(default_factory=lambda: ["*"],
                             description="Disk-id patterns (fnmatch) this policy applies to.")
    retention_hours: float = Field(72.0, gt=0, le=360, description="How far back recovery points are kept "
                                                                   "(hours, at most 15 days).")
    crash_point_interval_ms: float = Field(1000.0, ge=0, description="Granularity of crash-consistent points "
                                                                     "(ms): the applier folds what arrived within "
                                                                     "this interval into one point; 0 = every "
                                                                     "log blob. App-consistent tags always "
                                                                     "get their own point.")
    rpo_threshold_s: float = Field(900.0, gt=0, description="Alert when a disk's recoverable lag (its RPO) "
                                                            "exceeds this (s); alerts only, changes nothing.")


class HttpConfig(_Section):
    listen: str = Field("127.0.0.1", description="Address of the metrics/health/admin HTTP endpoint.")
    port: int = Field(9464, ge=0, le=65535, description="Port of /metrics (Prometheus), /healthz and /api; "
                                                        "0 picks a free port.")
    enabled: bool = Field(True, description="Serve the HTTP endpoint from `serve` and `apply`.")


class AlertsConfig(_Section):
    webhook_url: str | None = Field(None, description="POST a JSON event here when a disk crosses its RPO "
                                                      "threshold and when it recovers; empty: log only.")
    webhook_timeout_s: float = Field(5.0, gt=0, description="Timeout of one webhook POST (s).")


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    applier: ApplierConfig = Field(default_factory=ApplierConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="The default replication policy.")
    policies: dict[str, PolicyConfig] = Field(
        default_factory=dict, description="Named policies; the first whose `disks` patterns match a disk wins, "
                                          "else the default `policy`.")
    http: HttpConfig = Field(default_factory=HttpConfig)
    alerts: AlertsConfig = Field(default_factory=AlertsConfig)

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

    def policy_for(self, disk: str) -> PolicyConfig:
        for policy in self.policies.values():
            if any(fnmatch.fnmatchcase(disk, pattern) for pattern in policy.disks):
                return policy
        return self.policy

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
