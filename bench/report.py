"""Reports of a run: ``result.json``, ``report.md`` and PNG plots (matplotlib, optional extra ``bench``)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.stats import LogHistogram

MiB = 1024 * 1024
MAIN_PHASES = ("max", "open50", "open90")


def _rss(phase: dict) -> str:
    """Peak RSS of serve's processes, and the applier process's part of it when it has one."""
    child = phase.get("applier_process_peak_rss") or 0
    return f"{phase['server_peak_rss'] / MiB:.0f}" + (f" ({child / MiB:.0f})" if child else "")


def _halves_text(halves: list[float] | None) -> str:
    """A step's acknowledged MB/s in the two halves of its window: equal when the rate held."""
    return " / ".join(format(v, ".0f") for v in halves) if halves else "—"


def _f(value: object, fmt: str = ".1f", none: str = "—") -> str:
    if value is None:
        return none
    if isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def _loadavg(values: list[float] | None) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "?"


def _machine_note(m: dict | None) -> str:
    if not m:
        return ""
    note = (f"; machine in the window: {m['busy_cores']:.2f} of {m['nproc']} cores busy "
            f"(server {m['server_cores']:.2f}, generator ≈{m['generator_cores']:.2f}, "
            f"**other ≈{m['other_cores']:.2f}**)")
    if "cpu_pressure_some_pct" in m:
        note += (f", CPU pressure {m['cpu_pressure_some_pct']:.0f} %, "
                 f"I/O pressure {m.get('io_pressure_some_pct', 0):.0f} %")
    return note


_GAUGES = ("inflight_bytes", "ingest_paused", "sealing_batches", "upload_queue_length", "spool_used_bytes")


def _gauge_note(gauges: dict | None) -> str:
    """A few of the server's own gauges (its /metrics) over the window: where the pipeline waits."""
    if not gauges:
        return ""
    parts = []
    for suffix in _GAUGES:
        g = gauges.get(f"blockferry_{suffix}")
        if g is not None:
            scale, unit = (1e6, " MB") if suffix.endswith("bytes") else (1, "")
            parts.append(f"{suffix} mean {g['mean'] / scale:.3g}{unit} / max {g['max'] / scale:.3g}{unit}")
    return "; server gauges: " + ", ".join(parts) if parts else ""


def _threads_note(threads: dict | None, shown: int = 8) -> str:
    """serve's busiest threads: cores on a CPU / waiting for one (a thread that waits as long as it runs
    is short of CPU, not of work)."""
    if not threads:
        return ""
    parts = [f"{name} {row['cores']:.2f} / {row['waiting']:.2f}" for name, row in list(threads.items())[:shown]]
    return "; threads (cores on a CPU / waiting for one): " + ", ".join(parts)


def _floor_line(floor: dict, ratios: dict, ceiling: dict | None) -> str:
    """What the floor measured, step by step, and what it allows."""
    steps = ", ".join(f"{name} {value:.2f}" for name, value in floor["cpu_s_per_gb"].items())
    share = ratios.get("engine_over_floor_bound")
    share_text = f"; the engine acknowledged {share:.2f}× of it" if share is not None else ""
    over = ratios.get("floor_bound_over_ceiling")
    of_ceiling = f" = {over:.2f}× the ceiling" if over else ""
    required_of_ceiling = (f" = {floor['bound_required_mbps'] / ceiling['mbps']:.2f}× the ceiling"
                           if ceiling and ceiling.get("mbps") else "")
    return (f"- **floor**: this design sustains at most **{floor['bound_acked_mbps']:.0f} MB/s** acknowledged on "
            f"{floor['cores']} cores{of_ceiling} ({floor['cpu_s_per_gb_acked']:.2f} CPU s/GB){share_text}; any "
            f"implementation on these libraries at most {floor['bound_required_mbps']:.0f} MB/s{required_of_ceiling} (only "
            f"{', '.join(floor['required_steps'])}); this design with the applier keeping up "
            f"{floor['bound_applied_mbps']:.0f} MB/s, and so with the agents on other machines "
            f"{floor['bound_applied_agents_elsewhere_mbps']:.0f} MB/s — {floor['what']}; CPU s/GB per step: {steps}; "
            f"{floor['tls']}, {floor['write_bytes'] // 1024} KiB writes")


def _unattainable(result: dict) -> list[str]:
    """The throughput targets the floor puts out of reach on this machine, by any implementation or by this
    design, each with the figures."""
    floor = result.get("floor")
    if not floor:
        return []
    needs = {"acknowledged ingest / ceiling": ("the ceiling", (result.get("ceiling") or {}).get("mbps")),
             "acknowledged ingest / borg": ("borg", (result.get("borg") or {}).get("mbps"))}
    out = []
    for target in result.get("targets", []):
        of, base = needs.get(target["target"], (None, None))
        if not base:
            continue
        need = target["limit"] * base
        if need > floor["bound_required_mbps"]:
            who, bound = "any implementation on these libraries", floor["bound_required_mbps"]
        elif need > floor["bound_acked_mbps"]:
            who, bound = "this design", floor["bound_acked_mbps"]
        else:
            continue
        out.append(f"- acknowledged ingest ≥ {target['limit']:g} × {of} needs {need:.0f} MB/s sustained: more than "
                   f"{who} can do on this machine (the floor: at most {bound:.0f} MB/s).")
    return ["Out of reach here (the floor, below):", "", *out, ""] if out else []


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "not measured"}[met]


def load_phases(result: dict) -> list[tuple[str, dict]]:
    phases = list(result.get("phases", {}).items())
    order = {name: i for i, name in enumerate(MAIN_PHASES)}
    return sorted(phases, key=lambda kv: (order.get(kv[0], 99), kv[0]))


def markdown(result: dict, plots: dict[str, str] | None = None) -> str:
    m = result.get("machine", {})
    lines = [f"# blockferry bench — {result.get('started', '?')}", ""]
    lines += [f"Command: `{result.get('command', '?')}`  ",
              (f"Machine: {m.get('nproc')} × {m.get('cpu_model')}, {(m.get('memory_bytes') or 0) / 2**30:.0f} GiB, "
               f"Linux {m.get('kernel')}, Python {m.get('python')}, commit {m.get('commit')}  "),
              (f"Load average (1/5/15 min) at start: {_loadavg(m.get('loadavg_start'))}, at end: "
               f"{_loadavg(m.get('loadavg_end'))} (other work on the machine skews every figure; ratios less)  "),
              f"Run time: {result.get('elapsed_s', '?')} s", ""]

    lines += ["## Targets (issue 5), measured in this run", "",
              "| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in result.get("targets", []):
        unit = t["unit"]
        value = _f(t["value"], ".2f") + (f" {unit}" if t["value"] is not None and unit != "×" else
                                         ("×" if t["value"] is not None else ""))
        lines.append(f"| {t['target']} | {value} | {t['direction']} {t['limit']:g}{'×' if unit == '×' else ' ' + unit} "
                     f"| {_met(t['met'])} |")
    lines.append("")
    lines += _unattainable(result)

    if result.get("errors"):
        lines += ["## Phases that failed", ""]
        lines += [f"- **{name}**: {message[:1500]}" for name, message in result["errors"].items()]
        lines.append("")

    ceiling, borg = result.get("ceiling"), result.get("borg")
    lines += ["## Ceiling, floor and peer (same bytes, same run)", ""]
    if ceiling:
        lines.append(f"- **ceiling**: {ceiling['mbps']:.0f} MB/s — {ceiling['what']}, {ceiling['threads']} thread(s), "
                     f"{ceiling['sample_bytes'] / MiB:.0f} MiB sample in {ceiling['batches']} batches, "
                     f"compression ratio {ceiling['compression_ratio']:.2f}")
    if result.get("floor"):
        lines.append(_floor_line(result["floor"], result.get("ratios") or {}, ceiling))
    if borg:
        if borg.get("mbps"):
            lines.append(f"- **borg**: {borg['mbps']:.0f} MB/s — {borg.get('version')}, `borg create --compression "
                         f"lz4` into a repokey repository, {borg['bytes'] / MiB:.0f} MiB in {borg['seconds']:.2f} s "
                         f"({borg['cpu_s']:.2f} CPU s)")
        else:
            lines.append(f"- **borg**: no figure — {borg.get('note') or borg.get('error')}")
    lines.append("")

    phases = load_phases(result)
    if phases:
        lines += ["## Load phases", "",
                  ("| phase | mode | offered MB/s | acked MB/s | stored MB/s | applied MB/s | compression | "
                   "server CPU s/GB | server CPU | peak RSS MiB | ack p50 / p99 / p99.9 ms | lag p50 / p99 s | "
                   "caught up after |"),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, p in phases:
            lat, lag = p["latency"], p["lag_s"]
            lines.append(
                f"| {name} | {p['mode']} | {_f(p.get('offered_mbps'), '.0f')} | {p['acked_mbps']:.1f} | "
                f"{p['stored_mbps']:.1f} | {p['applied_mbps']:.1f} | {p['compression_ratio']:.2f} | "
                f"{p['server_cpu_s_per_gb']:.2f} | {p['server_cpu_util']:.2f} cores | "
                f"{_rss(p)} | "
                f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['p999_ms']:.1f} | "
                f"{lag['p50']:.2f} / {lag['p99']:.2f} | "
                + ("not waited |" if p.get("wait_for") == "acked" else f"{_f(p.get('caught_up_s'), '.1f')} s |"))
        lines.append("")
        lines.append("acked = acknowledged (durable in the spool); stored = in the cache store (upload watermark); "
                     "applied = on the seed disk; all payload MB/s (10^6 B/s) over the measurement window after "
                     "warm-up. Server CPU and RSS: all of serve's processes (server + applier; the applier "
                     "process's part in brackets). Latency: open loop from the intended send time; closed loop from the call to "
                     "`write` (so it includes the agent's own window). Lag: age of the oldest write not yet "
                     "applied, per disk, sampled through the window.")
        lines.append("")
        notes = []
        for name, p in phases:
            g = p["generator"]
            blob_note = f"{p['blobs_seen']} blobs of {p['blob_mean_bytes'] / 1024:.0f} KiB mean"
            if p["blobs_missed"]:
                blob_note += f" ({p['blobs_missed']} gone before the probe read them)"
            notes.append(f"- {name}: {p['agents']} agents × {p['disks_per_agent']} disks in {g['procs']} generator "
                         f"process(es) at {', '.join(f'{u:.0%}' for u in g['cpu_util_per_proc'])} CPU"
                         f"{' — **generator-bound**' if g['bound'] else ''}; {blob_note}"
                         "; "
                         f"{p['writes']} writes, {p['tags']} tags; acked bytes {p['acked_bytes_total']} "
                         f"(sum over agents); flushed in {p['flush_s']:.1f} s"
                         + ("" if p["caught_up"] or p.get("wait_for") == "acked"
                            else "; **applier did not catch up in time**")
                         + (f"; errors: {g['errors'][:3]}" if g["errors"] else "")
                         + _machine_note(p.get("machine_during_window"))
                         + _gauge_note(p.get("server_gauges"))
                         + _threads_note(p.get("server_threads")))
        lines += ["Per phase:", "", *notes, ""]

    drain = result.get("drain")
    if drain:
        lines += ["## Applier capacity (backlog drain)", ""]
        lines.append(f"Backlog of {drain['backlog_bytes'] / 1e6:.0f} MB ({drain['backlog_blobs']} blobs, "
                     f"{drain['backlog_blob_bytes'] / 1e6:.0f} MB sealed) over {drain['disks']} disks, built at "
                     f"{drain['fill']['acked_mbps']:.0f} MB/s with the applier off; the embedded applier (default "
                     f"config) applied it at **{drain['applied_mbps']:.1f} MB/s** "
                     f"({drain['applied_mbps_from_spawn']:.1f} MB/s counting from the server's start); "
                     f"drained: {'yes' if drain['drained'] else '**no**'}; peak RSS "
                     f"{drain['server_peak_rss'] / MiB:.0f} MiB.")
        lines.append("")

    scaling = result.get("scaling")
    if scaling:
        lines += [f"## Scaling (open loop, {scaling['offered_mbps']:.0f} MB/s offered in total)", "",
                  ("| agents | acked MB/s | acked 1st / 2nd half | stored MB/s | carried | ack p50 / p99 ms | "
                   "peak RSS MiB | server CPU s/GB | window/agent MiB | connect s | blob KiB |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in scaling["steps"]:
            if "error" in s:
                lines.append(f"| {s['agents']} | failed: {s['error'][:200]} | | | | | | | | | |")
                continue
            lines.append(f"| {s['agents']} | {s['acked_mbps']:.1f} | {_halves_text(s.get('acked_mbps_halves'))} | "
                         f"{_f(s.get('stored_mbps'))} | "
                         f"{s['carried']:.0%} | "
                         f"{s['latency']['p50_ms']:.1f} / {s['latency']['p99_ms']:.1f} | "
                         f"{_rss(s)} | {s['server_cpu_s_per_gb']:.2f} | "
                         f"{s['window_per_agent'] / MiB:.0f} | {s['connect_s']:.1f} | "
                         f"{s['blob_mean_bytes'] / 1024:.0f} |")
        lines += ["", ("Stored below acked means the spool absorbed the difference during the step: a longer run "
                       "settles at the stored rate once the spool fills."), ""]
        lines += [f"- {s['agents']} agents:{_threads_note(s['server_threads'])[1:]}" for s in scaling["steps"]
                  if s.get("server_threads")]
        lines += [""] if any(s.get("server_threads") for s in scaling["steps"]) else []

    profiled = [(name, p["server_profile"]) for name, p in phases if p.get("server_profile")]
    for step in (scaling or {}).get("steps", []):
        if step.get("server_profile"):
            profiled.append((f"scale-{step['agents']}", step["server_profile"]))
    if profiled:
        from bench.pyspy import markdown as profile_markdown

        lines += ["## Server profile (py-spy, measurement window)", ""]
        for name, prof in profiled:
            if "error" in prof:
                lines += [f"- {name}: {prof['error']}", ""]
            else:
                lines += profile_markdown(name, prof)

    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({path})" for name, path in plots.items()] + [""]

    configs = {p["server_config_toml"] for _, p in phases}
    if configs:
        lines += ["## Server configuration", "",
                  ("Every load phase ran `blockferry serve --config FILE` with the defaults except these lines "
                   "(data_dir and port differ per phase):"), ""]
        for text in sorted(configs, key=len)[:1]:
            lines += ["```toml", text.strip(), "```", ""]
        if drain:
            lines.append("The drain phase's fill ran with `[applier] enabled = false`; the drain itself with the "
                         "defaults.")
            lines.append("")
        envs = {json.dumps(p.get("server_env") or {}, sort_keys=True) for _, p in phases}
        if envs != {"{}"}:
            lines += [f"Extra server environment: `{', '.join(sorted(envs))}`", ""]
    s = result.get("settings", {})
    if s:
        lines += ["## Settings", "", "```json", json.dumps(s, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def plot(result: dict, out_dir: Path) -> dict[str, str]:
    """PNG plots; returns {title: file name}. Empty if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    files: dict[str, str] = {}

    def save(fig: object, title: str, name: str) -> None:
        fig.tight_layout()  # type: ignore[attr-defined]
        fig.savefig(out_dir / name, dpi=90)  # type: ignore[attr-defined]
        plt.close(fig)  # type: ignore[arg-type]
        files[title] = name
    phases = load_phases(result)
    if phases:
        fig, axes = plt.subplots(len(phases), 1, figsize=(10, 3.2 * len(phases)), squeeze=False, sharex=False)
        for ax, (name, p) in zip(axes[:, 0], phases):
            s = p["series"]
            ax.plot(s["t"], s["acked_mbps"], label="acknowledged", lw=1.5)
            ax.plot(s["t"], s["stored_mbps"], label="stored (cache store)", lw=1.2)
            ax.plot(s["t"], s["applied_mbps"], label="applied (seed disk)", lw=1.2)
            if p.get("offered_mbps"):
                ax.axhline(p["offered_mbps"], color="grey", ls=":", lw=1, label="offered")
            ax.axvspan(s["measure_from"], s["measure_to"], color="0.93", zorder=0)
            ax.set_title(f"{name}: {p['mode']} loop, {p['agents']}×{p['disks_per_agent']} disks")
            ax.set_ylabel("MB/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="upper right")
        axes[-1, 0].set_xlabel("seconds since start (shaded: measurement window)")
        save(fig, "throughput over time per stage", "throughput.png")

        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, p in phases:
            hist = LogHistogram.from_dict(p["latency_hist"])
            if hist.count:
                pts = hist.cdf()
                ax.plot([x * 1e3 for x, _ in pts], [y for _, y in pts],
                        label=f"{name} (p99 {p['latency']['p99_ms']:.1f} ms)")
        ax.set_xscale("log")
        ax.set_xlabel("ack latency, ms (open loop: from the intended send time)")
        ax.set_ylabel("fraction of writes ≤ x")
        ax.axhline(0.99, color="grey", ls=":", lw=1)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title("ack-latency distribution (CDF)")
        save(fig, "ack-latency distribution", "latency.png")

        fig, ax = plt.subplots(figsize=(9, 4.5))
        for name, p in phases:
            s = p["series"]
            if s["lag_t"]:
                ax.plot(s["lag_t"], s["lag_s"], label=name, lw=1.2)
        ax.axhline(2.0, color="grey", ls=":", lw=1, label="2 s target")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("recoverable lag, s (worst disk)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("recoverable lag over time (age of the oldest write not yet applied)")
        save(fig, "lag over time", "lag.png")

    scaling = result.get("scaling")
    steps = [s for s in (scaling or {}).get("steps", []) if "error" not in s]
    if steps:
        fig, ax1 = plt.subplots(figsize=(8, 4))
        labels = [str(s["agents"]) for s in steps]
        ax1.bar(labels, [s["acked_mbps"] for s in steps], color="tab:blue", alpha=0.7, label="acked MB/s")
        ax1.axhline(scaling["offered_mbps"], color="grey", ls=":", lw=1, label="offered")
        ax1.set_xlabel("concurrent agent connections")
        ax1.set_ylabel("acked MB/s")
        ax2 = ax1.twinx()
        ax2.plot(labels, [s["server_peak_rss"] / MiB for s in steps], color="tab:red", marker="o", label="peak RSS")
        ax2.set_ylabel("server peak RSS, MiB")
        ax1.set_title("scaling at the same total offered load")
        fig.legend(fontsize=8, loc="upper right")
        save(fig, "scaling", "scaling.png")
    return files


def write_reports(result: dict, out_dir: Path, *, plots: bool = True) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot(result, out_dir) if plots else {}
    result["plots"] = images
    json_path = out_dir / "result.json"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(markdown(result, images))
    return {"json": json_path, "markdown": md_path, **{k: out_dir / v for k, v in images.items()}}
