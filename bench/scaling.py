"""Scaling: 1, 10, 100, 1000 concurrent agent connections at the same total offered load.

Each step is an open-loop phase on a fresh server: ``N`` agents with one disk
each share the same total offered MB/s (by default the closed-loop maximum of
the same run, so a step that cannot carry it shows the shortfall). Reported per
step: acknowledged MB/s, its share of the offered load, ack latency, the
server's peak RSS and CPU per GB. The per-agent window shrinks with N
(``total_window / N``, at least ``min_window``) so 1000 agents do not pin
1000 × 64 MiB in the generators.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console

from bench.phases import PhaseSpec, run_phase

MiB = 1024 * 1024


def scaling_window(agents: int, total_window: int, min_window: int = 4 * MiB, max_window: int = 64 * MiB) -> int:
    return max(min_window, min(max_window, total_window // max(1, agents)))


def run_scaling(base: PhaseSpec, counts: list[int], offered_mbps: float, workdir: Path,
                console: Console | None = None, total_window: int = 512 * MiB) -> dict:
    steps = []
    for n in counts:
        spec = replace(base, name=f"scale-{n}", mode="open", agents=n, disks_per_agent=1, offered_mbps=offered_mbps,
                       window=scaling_window(n, total_window), probe_interval=max(base.probe_interval, 0.25),
                       gen_procs=base.gen_procs)
        try:
            r = run_phase(spec, workdir, console)
            r.pop("_server", None)
        except Exception as exc:  # noqa: BLE001 - one failed step must not lose the others
            steps.append({"agents": n, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            continue
        steps.append({
            "agents": n,
            "offered_mbps": offered_mbps,
            "acked_mbps": r["acked_mbps"],
            "acked_mbps_halves": r["acked_mbps_halves"],
            "carried": r["acked_mbps"] / offered_mbps if offered_mbps else 0.0,
            "stored_mbps": r["stored_mbps"],
            "applied_mbps": r["applied_mbps"],
            "latency": r["latency"],
            "lag_s": r["lag_s"],
            "server_peak_rss": r["server_peak_rss"],
            "applier_process_peak_rss": r.get("applier_process_peak_rss", 0),
            "server_cpu_s_per_gb": r["server_cpu_s_per_gb"],
            "connect_s": r["connect_s"],
            "window_per_agent": spec.window,
            "generator": r["generator"],
            "blob_mean_bytes": r["blob_mean_bytes"],
            "caught_up": r["caught_up"],
            "server_threads": r["server_threads"],
            **({"server_profile": r["server_profile"]} if "server_profile" in r else {}),
        })
    by_n = {s["agents"]: s for s in steps if "error" not in s}
    ratio = None
    if 10 in by_n and 1000 in by_n and by_n[10]["acked_mbps"]:
        ratio = by_n[1000]["acked_mbps"] / by_n[10]["acked_mbps"]
    return {"offered_mbps": offered_mbps, "steps": steps, "ratio_1000_over_10": ratio}
