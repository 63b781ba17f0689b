"""``python -m bench compare OLD NEW``: the change between two runs, metric by metric.

Ratios measured inside each run (engine/ceiling, engine/borg) are the fairest
comparison across machines or noisy days; absolute MB/s are shown too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

MiB = 1024 * 1024

# (label, getter, higher is better, format)
Metric = tuple[str, Callable[[dict], float | None], bool, str]


def _get(d: object, *path: str | int) -> float | None:
    for key in path:
        if isinstance(d, dict):
            d = d.get(key)  # type: ignore[arg-type]
        else:
            return None
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _scale(n: int, key: str) -> Callable[[dict], float | None]:
    def get(r: dict) -> float | None:
        for step in _get_list(r, "scaling", "steps"):
            if step.get("agents") == n:
                value = step.get(key)
                if key == "server_peak_rss" and value is not None:
                    return value / MiB
                return value
        return None

    return get


def _get_list(d: dict, *path: str) -> list:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d if isinstance(d, list) else []


def metrics(result: dict) -> list[Metric]:
    out: list[Metric] = [
        ("engine / ceiling", lambda r: _get(r, "ratios", "engine_over_ceiling"), True, ".3f"),
        ("engine / floor's bound", lambda r: _get(r, "ratios", "engine_over_floor_bound"), True, ".3f"),
        ("engine / borg", lambda r: _get(r, "ratios", "engine_over_borg"), True, ".2f"),
        ("applied capacity / max ingest", lambda r: _get(r, "ratios", "applied_capacity_over_max_ingest"), True, ".2f"),
        ("1000 / 10 agents", lambda r: _get(r, "ratios", "scaling_1000_over_10"), True, ".2f"),
        ("ceiling MB/s", lambda r: _get(r, "ceiling", "mbps"), True, ".0f"),
        ("floor's bound MB/s", lambda r: _get(r, "floor", "bound_acked_mbps"), True, ".0f"),
        ("borg MB/s", lambda r: _get(r, "borg", "mbps"), True, ".0f"),
        ("drain applied MB/s", lambda r: _get(r, "drain", "applied_mbps"), True, ".1f"),
    ]
    names = sorted(set(result.get("phases", {})), key=lambda n: ({"max": 0, "open50": 1, "open90": 2}.get(n, 9), n))
    for name in names:
        out += [
            (f"{name}: acked MB/s", lambda r, n=name: _get(r, "phases", n, "acked_mbps"), True, ".1f"),
            (f"{name}: stored MB/s", lambda r, n=name: _get(r, "phases", n, "stored_mbps"), True, ".1f"),
            (f"{name}: applied MB/s", lambda r, n=name: _get(r, "phases", n, "applied_mbps"), True, ".1f"),
            (f"{name}: compression ratio", lambda r, n=name: _get(r, "phases", n, "compression_ratio"), True, ".2f"),
            (f"{name}: server CPU s/GB", lambda r, n=name: _get(r, "phases", n, "server_cpu_s_per_gb"), False, ".2f"),
            (f"{name}: peak RSS MiB", lambda r, n=name: (_get(r, "phases", n, "server_peak_rss") or 0) / MiB or None,
             False, ".0f"),
            (f"{name}: ack p50 ms", lambda r, n=name: _get(r, "phases", n, "latency", "p50_ms"), False, ".2f"),
            (f"{name}: ack p99 ms", lambda r, n=name: _get(r, "phases", n, "latency", "p99_ms"), False, ".2f"),
            (f"{name}: ack p99.9 ms", lambda r, n=name: _get(r, "phases", n, "latency", "p999_ms"), False, ".2f"),
            (f"{name}: lag p50 s", lambda r, n=name: _get(r, "phases", n, "lag_s", "p50"), False, ".3f"),
            (f"{name}: lag p99 s", lambda r, n=name: _get(r, "phases", n, "lag_s", "p99"), False, ".3f"),
        ]
    for n in (1, 10, 100, 1000):
        out += [(f"scale {n}: acked MB/s", _scale(n, "acked_mbps"), True, ".1f"),
                (f"scale {n}: peak RSS MiB", _scale(n, "server_peak_rss"), False, ".0f")]
    return out


def load(path: Path) -> dict:
    if path.is_dir():
        path = path / "result.json"
    return json.loads(path.read_text())


def compare(old: dict, new: dict) -> list[dict]:
    rows, seen = [], set()
    for label, get, higher, fmt in metrics(old) + metrics(new):
        if label in seen:
            continue
        seen.add(label)
        a, b = get(old), get(new)
        if a is None and b is None:
            continue
        change = (b - a) / a if a not in (None, 0) and b is not None else None
        better = None
        if change is not None and abs(change) >= 0.03:  # within 3 %: noise on a shared 2-core machine
            better = (change > 0) == higher
        rows.append({"metric": label, "old": a, "new": b, "change": change, "better": better, "fmt": fmt})
    return rows


def print_comparison(old_path: Path, new_path: Path, console: Console | None = None) -> list[dict]:
    console = console or Console()
    old, new = load(old_path), load(new_path)
    rows = compare(old, new)
    table = Table(title=f"{old_path} → {new_path}")
    for col, justify in (("metric", "left"), ("old", "right"), ("new", "right"), ("change", "right"), ("", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        fmt = row["fmt"]
        a = "—" if row["old"] is None else format(row["old"], fmt)
        b = "—" if row["new"] is None else format(row["new"], fmt)
        change = "" if row["change"] is None else f"{row['change']:+.1%}"
        verdict = {True: "[green]better[/]", False: "[red]worse[/]", None: ""}[row["better"]]
        table.add_row(row["metric"], a, b, change, verdict)
    console.print(table)
    for tag, res in (("old", old), ("new", new)):
        m = res.get("machine", {})
        console.print(f"{tag}: {res.get('started')} · {m.get('nproc')} × {m.get('cpu_model')} · commit "
                      f"{m.get('commit')} · `{res.get('command')}`")
    return rows
