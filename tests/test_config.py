"""Config loading, validation messages, derived paths, and the generated defaults/docs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ByteSize, ConfigDict, Field

from engine.config import Config, ConfigError, UploadConfig, load_config, parse_config
from engine.config_docs import (
    DOCS_BEGIN,
    DOCS_END,
    UNSET_NOTE,
    generated_region,
    render_defaults,
    render_markdown,
    splice_docs,
    toml_value,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
MiB = 1024 * 1024


def write(tmp_path: Path, text: str, name: str = "blockferry.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "test.toml")
    return str(exc.value)


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def all_keys(model: type[BaseModel] = Config, section: str | None = None) -> list[tuple[str | None, str]]:
    """(section, key) of every setting, sub-tables as dotted sections ("store.azure"); section None for
    top-level keys such as `policies`."""
    keys = [(section, key) for key, field in model.model_fields.items() if not _is_section(field.annotation)]
    for key, field in model.model_fields.items():
        if _is_section(field.annotation):
            keys += all_keys(field.annotation, f"{section}.{key}" if section else key)
    return keys


def fields_of(section: str | None) -> dict:
    model: type[BaseModel] = Config
    for part in section.split(".") if section else []:
        model = model.model_fields[part].annotation
    return model.model_fields


# --- defaults file -----------------------------------------------------------------------------------------------

def test_render_defaults_loads_back_to_exactly_the_defaults(tmp_path):
    text = render_defaults()
    cfg = load_config(write(tmp_path, text))
    assert cfg == Config()
    assert cfg.model_dump() == Config().model_dump()
    assert cfg.server.port == 9443
    assert cfg.batch.max_bytes == 4 * MiB
    assert cfg.server.max_frame_bytes == 4 * MiB + 64
    assert cfg.spool.dir is None and cfg.keys.old_key_files == []


def test_render_defaults_spelling():
    text = render_defaults()
    lines = text.splitlines()
    for header in ("[server]", "[batch]", "[pipeline]", "[spool]", "[upload]", "[store]", "[keys]", "[applier]"):
        assert header in lines
    assert 'max_bytes = "4MiB"  # size (bytes), >= 4KiB' in lines          # human size, accepted back
    assert 'max_inflight_bytes = "64MiB"  # size (bytes), >= 1MiB, <= 2GiB' in lines
    assert 'max_bytes = "8GiB"  # size (bytes), >= 1MiB' in lines
    # not a whole unit: written exactly as an integer, never rounded to "4.0MiB"
    assert "max_frame_bytes = 4194368  # size (bytes); 4MiB + 64B" in lines
    assert "port = 9443  # integer, >= 0, <= 65535" in lines
    assert 'kind = "local"  # one of "local", "azure"' in lines
    assert "old_key_files = []  # list of paths" in lines
    assert "fsync = true  # boolean" in lines
    # None defaults are commented out, TOML has no null
    assert f'# tls_cert = ""  {UNSET_NOTE}' in lines
    assert f'# dir = ""  {UNSET_NOTE}' in lines
    assert not any(re.match(r"^(tls_cert|tls_key|agents_file|dir|path|key_file|seed_dir)\s*=", ln) for ln in lines)


def test_render_defaults_documents_every_key_in_its_section():
    lines = render_defaults().splitlines()
    section = None
    seen = set()
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\[([\w.]+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^(?:# )?(\w+) = ", line):
            key = m.group(1)
            field = fields_of(section)[key]
            assert lines[i - 1] == f"# {' '.join(field.description.split())}", (section, key)
            seen.add((section, key))
    assert seen == set(all_keys())


def test_uncommenting_an_unset_line_keeps_the_derived_default(tmp_path):
    # `# dir = ""` uncommented must mean "derive it", not Path("") == "." (the working directory)
    cfg = load_config(write(tmp_path, '[spool]\ndir = ""\n[keys]\nkey_file = ""\n[server]\ndata_dir = "/srv/bf"\n'))
    assert cfg.spool.dir is None and cfg.keys.key_file is None
    assert cfg.spool_dir == Path("/srv/bf/spool")
    assert cfg.key_file == Path("/srv/bf/keys/blob.key")
    # only optional settings treat "" as unset: a required string stays ""
    assert parse_config({"server": {"listen": ""}}).server.listen == ""


class _Sub(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ratio: float = Field(0.5, gt=0, lt=1, description="A new nested setting.")


class _NewSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window_s: float = Field(1.5, description="A new duration | with a pipe.")
    chunk: ByteSize = Field(ByteSize(3 * 1024), description="A new size.")
    mode: Literal["a", "b"] = Field("b", description="A new choice.")
    tags: list[str] = Field(default_factory=lambda: ['x"y', "z\\w"], description="A new list.")
    where: Path | None = Field(None, description="Optional; empty: <data_dir>/x.")
    sub: _Sub = Field(default_factory=_Sub, description="A nested table.")


class _Extended(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top: int = Field(7, description="A top-level key.")
    server: _NewSection = Field(default_factory=_NewSection)


def test_renderers_pick_up_new_fields_generically():
    text = render_defaults(_Extended)
    assert _Extended.model_validate(tomllib.loads(text)) == _Extended()
    lines = text.splitlines()
    assert lines.index("top = 7  # integer") < lines.index("[server]") < lines.index("[server.sub]")
    assert 'chunk = "3KiB"  # size (bytes)' in lines
    assert "window_s = 1.5  # number (seconds)" in lines
    assert 'tags = ["x\\"y", "z\\\\w"]  # list of strings' in lines
    assert f'# where = ""  {UNSET_NOTE}' in lines
    assert "ratio = 0.5  # number, > 0, < 1" in lines
    md = render_markdown(_Extended)
    assert "### Top-level keys" in md and "### `[server]`" in md and "#### `[server.sub]`" in md
    assert "| `server.window_s` | number (seconds) | `1.5` | A new duration \\| with a pipe. |" in md
    assert "| `server.where` | path, optional | derived (see description) | Optional; empty: \\<data_dir>/x. |" in md
    assert "| `server.mode` | one of \"a\", \"b\" | `\"b\"` | A new choice. |" in md


def test_toml_value_rejects_unknown_types():
    assert toml_value(ByteSize(1000)) == "1000"
    assert toml_value(ByteSize(2 * 1024**3)) == '"2GiB"'
    assert toml_value(float("inf")) == "inf"
    with pytest.raises(TypeError, match="object"):
        toml_value(object())


# --- docs --------------------------------------------------------------------------------------------------------

def test_docs_configuration_md_is_up_to_date():
    text = DOCS.read_text(encoding="utf-8")
    body = render_markdown()
    assert body in text, ("docs/configuration.md is stale: "
                          "python -m engine.config_docs --write-docs docs/configuration.md")
    assert generated_region(text) == body
    assert splice_docs(text, body) == text


def test_markdown_has_a_row_for_every_key():
    md = render_markdown()
    for section, key in all_keys():
        dotted = f"{section}.{key}" if section else key
        assert re.search(rf"^\| `{dotted}` \| [^|]+ \| .+ \|$", md, re.MULTILINE), dotted
    assert "| `batch.max_bytes` | size (bytes), >= 4KiB | `\"4MiB\"` |" in md
    assert "| `server.max_frame_bytes` | size (bytes) | `4194368` (4MiB + 64B) |" in md
    assert "| `spool.dir` | path, optional | derived (see description) | " in md
    assert "<data_dir>" not in md.replace("\\<data_dir>", "")   # escaped, or Markdown eats it as an HTML tag


def test_docs_toml_examples_are_valid(tmp_path):
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 1
    for block in blocks:
        cfg = load_config(write(tmp_path, block))
        assert cfg != Config()
    tuned = load_config(write(tmp_path, blocks[0]))
    assert tuned.batch.max_bytes == 16 * MiB
    assert tuned.pipeline.max_inflight_bytes == 1024 * MiB


def test_splice_docs_needs_markers():
    assert splice_docs(f"intro\n{DOCS_BEGIN}\nold\n{DOCS_END}\nend\n", "new\n") == \
        f"intro\n{DOCS_BEGIN}\n\nnew\n\n{DOCS_END}\nend\n"
    with pytest.raises(ValueError, match="markers"):
        splice_docs("no markers here", "x")


# --- loading and validation --------------------------------------------------------------------------------------

def test_no_file_and_empty_file_give_defaults(tmp_path):
    assert load_config(None) == Config()
    cfg = load_config(write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.upload.concurrency == 4 and cfg.applier.poll_ms == 200.0


def test_unknown_key_is_reported_with_its_dotted_path(tmp_path):
    path = write(tmp_path, '[batch]\nmax_bytez = "8MiB"\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.splitlines()[0] == f"{path}: invalid configuration"
    assert "  batch.max_bytez: unknown setting" in msg
    assert "unknown setting" in error_of({"batchh": {}}) and "  batchh: " in error_of({"batchh": {}})


@pytest.mark.parametrize("data, key, why", [
    ({"server": {"port": "abc"}}, "server.port", "valid integer"),
    ({"server": {"port": 70000}}, "server.port", "less than or equal to 65535"),
    ({"server": {"port": -1}}, "server.port", "greater than or equal to 0"),
    ({"batch": {"max_bytes": 1000}}, "batch.max_bytes", "greater than or equal to 4096"),
    ({"batch": {"max_bytes": "4 potatoes"}}, "batch.max_bytes", "could not interpret byte unit"),
    ({"upload": {"concurrency": 0}}, "upload.concurrency", "greater than or equal to 1"),
    ({"server": {"heartbeat_s": 0}}, "server.heartbeat_s", "greater than 0"),
    ({"store": {"kind": "s3"}}, "store.kind", "'local'"),
    ({"spool": {"fsync": "maybe"}}, "spool.fsync", "valid boolean"),
    ({"keys": {"old_key_files": "a.key"}}, "keys.old_key_files", "valid list"),
    ({"server": 5}, "server", "valid dictionary"),
])
def test_wrong_type_or_range_names_the_key(data, key, why):
    lines = error_of(data).splitlines()
    assert lines[0] == "test.toml: invalid configuration"
    assert len(lines) == 2
    assert lines[1].startswith(f"  {key}: ") and why in lines[1], lines[1]


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, '[server]\nport = 70000\n[batch]\nmax_bytez = 1\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).splitlines() == [
        f"{path}: invalid configuration",
        "  server.port: Input should be less than or equal to 65535",
        "  batch.max_bytez: unknown setting (check the spelling; `blockferry config defaults` lists them all)",
    ]


def test_bad_toml_syntax_names_the_file(tmp_path):
    path = write(tmp_path, "[server]\nport = = 1\n", name="broken.toml")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in msg
    assert exc.value.__cause__ is None


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: no such configuration file"


def test_unreadable_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)                      # a directory
    assert str(exc.value).startswith(f"{tmp_path}: cannot read configuration file: ")
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: cannot read configuration file: ")


def test_utf8_file_is_read_as_utf8(tmp_path):
    path = tmp_path / "utf8.toml"
    path.write_bytes('[server]\nname = "caf\u00e9"\n'.encode("utf-8"))
    assert load_config(path).server.name == "caf\u00e9"


@pytest.mark.parametrize("text, expected", [
    ('"4MiB"', 4 * MiB),
    ('"4 MiB"', 4 * MiB),
    ('"4mib"', 4 * MiB),
    ('"512KB"', 512_000),
    ('"512KiB"', 512 * 1024),
    ('"1.5MiB"', 3 * MiB // 2),
    ('"1GiB"', 1024 * MiB),
    ("16777216", 16 * MiB),
])
def test_size_strings_are_accepted(tmp_path, text, expected):
    cfg = load_config(write(tmp_path, f"[batch]\nmax_bytes = {text}\n[pipeline]\nmax_inflight_bytes = \"2GiB\"\n"))
    assert cfg.batch.max_bytes == expected
    assert isinstance(cfg.batch.max_bytes, int)
    assert cfg.pipeline.max_inflight_bytes == 2 * 1024**3


def test_inflight_is_capped_by_what_one_log_commit_can_hold():
    assert "pipeline.max_inflight_bytes: Input should be less than or equal to 2147483648" in error_of(
        {"pipeline": {"max_inflight_bytes": "3GiB"}})


def test_inflight_must_be_at_least_twice_the_batch():
    msg = error_of({"batch": {"max_bytes": "4MiB"}, "pipeline": {"max_inflight_bytes": "6MiB"}})
    assert "pipeline.max_inflight_bytes must be at least twice batch.max_bytes" in msg
    assert msg.splitlines()[0] == "test.toml: invalid configuration"
    # against the default batch (4MiB) too
    assert "pipeline.max_inflight_bytes" in error_of({"pipeline": {"max_inflight_bytes": "7MiB"}})
    # and a larger batch against the default in-flight budget (64MiB)
    assert "pipeline.max_inflight_bytes" in error_of({"batch": {"max_bytes": "33MiB"}})
    # exactly twice is fine
    cfg = parse_config({"batch": {"max_bytes": "4MiB"}, "pipeline": {"max_inflight_bytes": "8MiB"}})
    assert cfg.pipeline.max_inflight_bytes == 8 * MiB == 2 * cfg.batch.max_bytes


# --- derived locations -------------------------------------------------------------------------------------------

def test_derived_paths_resolve_under_data_dir():
    cfg = Config()
    base = Path("blockferry-data")
    assert cfg.server.data_dir == base
    assert cfg.spool_dir == base / "spool"
    assert cfg.store_dir == base / "cache"
    assert cfg.seed_dir == base / "seed"
    assert cfg.key_file == base / "keys" / "blob.key"
    assert cfg.agents_file == base / "agents.toml"
    assert cfg.state_dir == base / "state"

    moved = parse_config({"server": {"data_dir": "/srv/bf"}})
    assert moved.spool_dir == Path("/srv/bf/spool")
    assert moved.store_dir == Path("/srv/bf/cache")
    assert moved.seed_dir == Path("/srv/bf/seed")
    assert moved.key_file == Path("/srv/bf/keys/blob.key")
    assert moved.agents_file == Path("/srv/bf/agents.toml")
    assert moved.state_dir == Path("/srv/bf/state")


def test_explicit_paths_win_over_data_dir(tmp_path):
    cfg = load_config(write(tmp_path, """
[server]
data_dir = "/srv/bf"
agents_file = "/etc/blockferry/agents.toml"
[spool]
dir = "/fast/spool"
[store]
path = "/mnt/cache"
[keys]
key_file = "/etc/blockferry/blob.key"
old_key_files = ["/etc/blockferry/old1.key", "old2.key"]
[applier]
seed_dir = "seed-here"
"""))
    assert cfg.spool_dir == Path("/fast/spool")
    assert cfg.store_dir == Path("/mnt/cache")
    assert cfg.seed_dir == Path("seed-here")
    assert cfg.key_file == Path("/etc/blockferry/blob.key")
    assert cfg.agents_file == Path("/etc/blockferry/agents.toml")
    assert cfg.keys.old_key_files == [Path("/etc/blockferry/old1.key"), Path("old2.key")]
    assert cfg.state_dir == Path("/srv/bf/state")     # not configurable: always under data_dir


def test_seal_threads_zero_means_cpu_count(monkeypatch):
    monkeypatch.setattr("engine.config.os.cpu_count", lambda: 12)
    assert Config().seal_threads == 12
    assert parse_config({"pipeline": {"seal_threads": 3}}).seal_threads == 3
    monkeypatch.setattr("engine.config.os.cpu_count", lambda: None)
    assert Config().seal_threads == 1


def test_retry_delays_double_up_to_the_cap_and_never_end():
    delays = UploadConfig(retry_initial_ms=100, retry_max_ms=350).retry_delays()
    assert [next(delays) for _ in range(5)] == [0.1, 0.2, 0.35, 0.35, 0.35]
