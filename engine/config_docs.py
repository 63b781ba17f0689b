"""Documentation generated from the config models in :mod:`engine.config`.

Nothing here lists settings by hand: both renderers walk the pydantic models, so
a new field (with its ``description``) shows up in ``blockferry config defaults``
and docs/configuration.md automatically.

* :func:`render_defaults` -- a complete, commented TOML file of every default; it
  loads back (``load_config``) to exactly ``Config()``.
* :func:`render_markdown` -- the generated part of docs/configuration.md, one
  table per section. Refresh the file with
  ``python -m engine.config_docs --write-docs docs/configuration.md``.
"""

from __future__ import annotations

import argparse
import enum
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path, PurePath
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ByteSize
from pydantic.fields import FieldInfo

from engine.config import Config

DOCS_BEGIN = "<!-- BEGIN GENERATED (python -m engine.config_docs --write-docs docs/configuration.md) -->"
DOCS_END = "<!-- END GENERATED -->"

UNSET_NOTE = "(default: derived, see description)"

_SIZE_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_DURATION_SUFFIXES = (("_ms", "milliseconds"), ("_s", "seconds"))


# --- walking the models ------------------------------------------------------------------------------------------

class _Table(typing.NamedTuple):
    path: tuple[str, ...]            # () for the top level, ("server",) for [server]
    description: str | None
    keys: list[tuple[str, FieldInfo, Any]]   # (name, field, default) of the non-table fields


def _tables(instance: BaseModel, path: tuple[str, ...] = (), description: str | None = None) -> Iterator[_Table]:
    """Depth first: a table's own keys, then its sub-tables (the order TOML needs)."""
    model = type(instance)
    values = {name: getattr(instance, name) for name in model.model_fields}
    keys = [(name, f, values[name]) for name, f in model.model_fields.items()
            if not isinstance(values[name], BaseModel)]
    own_doc = model.__dict__.get("__doc__")   # not inherited: a section without a docstring has none
    yield _Table(path, description or (inspect.cleandoc(own_doc) if own_doc else None), keys)
    for name, f in model.model_fields.items():
        if isinstance(values[name], BaseModel):
            yield from _tables(values[name], (*path, _key(f.alias or name)), f.description)


# --- TOML values -------------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _toml_string(name)


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\t\n\f\r":
            out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _exact_size(n: int) -> str | None:
    """``"4MiB"`` if n is a whole number of some binary unit, else None."""
    for unit, scale in _SIZE_UNITS:
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return None


def _size_hint(n: int) -> str | None:
    """A readable spelling of a size that is not a whole unit, e.g. ``4MiB + 64B``."""
    if _exact_size(n) is not None:
        return None
    for unit, scale in _SIZE_UNITS:
        if n >= scale:
            q, r = divmod(n, scale)
            return f"{q}{unit} + {r}B"
    return None


def toml_value(value: Any) -> str:
    """``value`` written as TOML that validates back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ByteSize):
        exact = _exact_size(int(value))
        return _toml_string(exact) if exact else str(int(value))
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, PurePath):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, BaseModel):
        return toml_value(value.model_dump())
    raise TypeError(f"no TOML spelling for {type(value).__name__} value {value!r}")


def _placeholder(annotation: Any) -> str:
    """What to show, commented out, for a setting whose default is None (TOML has no null)."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    base = (typing.get_origin(inner[0]) or inner[0]) if inner else str
    if base is bool:
        return "false"
    if isinstance(base, type) and issubclass(base, (int, float)) and not issubclass(base, ByteSize):
        return "0"
    if base in (list, tuple, set, frozenset):
        return "[]"
    return '""'


# --- types and units ---------------------------------------------------------------------------------------------

def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _type_name(annotation: Any) -> str:
    if _is_union(annotation):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = " or ".join(_type_name(a) for a in args)
        return f"{name}, optional" if len(args) < len(typing.get_args(annotation)) else name
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(toml_value(a) for a in typing.get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(annotation)
        return f"list of {_type_name(args[0])}s" if args else "list"
    if origin is dict:
        return "table"
    if isinstance(annotation, type):
        if issubclass(annotation, ByteSize):
            return "size"
        if issubclass(annotation, bool):
            return "boolean"
        if issubclass(annotation, enum.Enum):
            return "one of " + ", ".join(toml_value(m.value) for m in annotation)
        if issubclass(annotation, int):
            return "integer"
        if issubclass(annotation, float):
            return "number"
        if issubclass(annotation, str):
            return "string"
        if issubclass(annotation, PurePath):
            return "path"
        if issubclass(annotation, BaseModel):
            return "table"
    return getattr(annotation, "__name__", str(annotation))


def _unit(name: str, annotation: Any) -> str | None:
    if isinstance(annotation, type) and issubclass(annotation, ByteSize):
        return "bytes"
    for suffix, unit in _DURATION_SUFFIXES:
        if name.endswith(suffix):
            return unit
    return None


def _bound(value: Any, is_size: bool) -> str:
    if is_size and isinstance(value, int):
        return _exact_size(value) or str(value)
    return str(value)


def _constraints(field: FieldInfo, is_size: bool) -> list[str]:
    out = []
    for m in field.metadata:
        for cls, sym, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
            if isinstance(m, cls):
                out.append(f"{sym} {_bound(getattr(m, attr), is_size)}")
    return out


def describe_type(name: str, field: FieldInfo) -> str:
    """``integer, >= 0, <= 65535`` / ``size (bytes), >= 4KiB`` / ``number (seconds), > 0``."""
    annotation = field.annotation
    text = _type_name(annotation)
    unit = _unit(name, annotation)
    if unit:
        text += f" ({unit})"
    is_size = isinstance(annotation, type) and issubclass(annotation, ByteSize)
    return ", ".join([text, *_constraints(field, is_size)])


# --- renderers ---------------------------------------------------------------------------------------------------

def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def render_defaults(model: type[BaseModel] = Config) -> str:
    """A complete, commented TOML file holding every default of ``model``."""
    lines = [
        "# blockferry configuration: every setting at its default value.",
        "# Generated from the config models (`blockferry config defaults`); keep only what you change.",
        '# Sizes are bytes: an integer or a string such as "4MiB" or "512KB". Durations carry their',
        "# unit in the key name (_s seconds, _ms milliseconds). Settings shown commented out have no",
        "# fixed default: when absent (or set to \"\") they are derived as their description says.",
    ]
    for table in _tables(model()):
        if table.path:
            lines.append("")
            if table.description:
                lines.append(f"# {_one_line(table.description)}")
            lines.append(f"[{'.'.join(table.path)}]")
        for name, field, value in table.keys:
            lines.append("")
            if field.description:
                lines.append(f"# {_one_line(field.description)}")
            key = _key(field.alias or name)
            kind = describe_type(name, field)
            if value is None:
                lines.append(f"# {key} = {_placeholder(field.annotation)}  {UNSET_NOTE}")
            else:
                hint = _size_hint(int(value)) if isinstance(value, ByteSize) else None
                lines.append(f"{key} = {toml_value(value)}  # {kind}" + (f"; {hint}" if hint else ""))
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """Escape text for a Markdown table cell: pipes, and ``<tag``-like text outside code spans (else it is HTML)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            part = re.sub(r"<(?=[A-Za-z/!?])", r"\\<", part)
        out.append(part.replace("|", "\\|"))
    return "".join(out)


def _md_code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render_markdown(model: type[BaseModel] = Config) -> str:
    """The generated body of docs/configuration.md: one table per section."""
    out: list[str] = []
    for table in _tables(model()):
        if not table.keys:
            continue
        heading = f"[{'.'.join(table.path)}]" if table.path else "Top-level keys"
        level = min(max(len(table.path), 1) + 2, 6)   # under "## Reference" in docs/configuration.md
        out.append(f"{'#' * level} {_md_code(heading) if table.path else heading}")
        out.append("")
        if table.description:
            out.extend([_md_cell(_one_line(table.description)), ""])
        out.append("| Key | Type / unit | Default | Description |")
        out.append("|---|---|---|---|")
        for name, field, value in table.keys:
            dotted = ".".join((*table.path, _key(field.alias or name)))
            if value is None:
                default = "derived (see description)"
            else:
                default = _md_code(toml_value(value))
                hint = _size_hint(int(value)) if isinstance(value, ByteSize) else None
                if hint:
                    default += f" ({hint})"
            cells = [_md_code(dotted), describe_type(name, field), default, _one_line(field.description)]
            out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def splice_docs(document: str, body: str) -> str:
    """Replace the generated region of docs/configuration.md (between the markers) with ``body``."""
    try:
        head, rest = document.split(DOCS_BEGIN, 1)
        _, tail = rest.split(DOCS_END, 1)
    except ValueError:
        raise ValueError(f"markers {DOCS_BEGIN!r} / {DOCS_END!r} not found") from None
    return f"{head}{DOCS_BEGIN}\n\n{body}\n{DOCS_END}{tail}"


def generated_region(document: str) -> str:
    """The body between the markers, as render_markdown() returned it."""
    _, rest = document.split(DOCS_BEGIN, 1)
    body, _ = rest.split(DOCS_END, 1)
    return body.removeprefix("\n\n").removesuffix("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.config_docs", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--markdown", action="store_true", help="print the Markdown tables instead of the TOML")
    group.add_argument("--write-docs", metavar="PATH", type=Path,
                       help="rewrite the generated region of PATH (docs/configuration.md)")
    args = parser.parse_args(argv)
    if args.write_docs:
        path: Path = args.write_docs
        path.write_text(splice_docs(path.read_text(encoding="utf-8"), render_markdown()), encoding="utf-8")
    else:
        sys.stdout.write(render_markdown() if args.markdown else render_defaults())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
