"""One measured load phase: a fresh server, the generators, the probe, and the figures.

Every phase starts ``blockferry serve`` on a fresh data directory (so peak RSS
and CPU belong to that phase alone), connects all agents, starts them at one
common time, measures over ``[start + warmup, end]``, then waits for every
write to be acknowledged and (unless told otherwise) applied.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from bench.loadgen import LoadGenerator, auto_procs, plan_agents
from bench.profiles import Profile
from bench.pyspy import PySpy, summarize
from bench.serverproc import (
    BenchServer,
    Probe,
    ProbeSample,
    pressure_totals,
    process_tree,
    system_cpu_seconds,
    thread_times,
)
from bench.stats import LogHistogram, SeqLog, interpolate, percentile, rate_between

MB = 1e6
MiB = 1024 * 1024


@dataclass
class PhaseSpec:
    name: str
    mode: str  # "closed" | "open"
    agents: int
    disks_per_agent: int
    profile: Profile
    duration: float
    warmup: float
    disk_size: int
    window: int
    offered_mbps: float = 0.0
    budget_bytes: int = 0
    gen_procs: int = 0
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    catch_up_timeout: float = 60.0
    flush_timeout: float = 120.0
    probe_interval: float = 0.1
    wait_for: str = "applied"  # "applied" | "stored" | "acked"
    keep_data: bool = False
    keep_server: bool = False
    pyspy_dir: Path | None = None  # profile the server over the measurement window with py-spy
    server_env: dict[str, str] = field(default_factory=dict)  # extra environment of the server process

    @property
    def disks(self) -> int:
        return self.agents * self.disks_per_agent


class Display:
    """One rich progress line per phase (stderr), quiet when asked."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    def __enter__(self) -> Self:
        if self.console is not None:
            self.progress = Progress(TextColumn("[bold]{task.description:<14}"), BarColumn(bar_width=24),
                                     TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=self.console,
                                     transient=False, refresh_per_second=4)
            self.progress.__enter__()
        return self

    def add(self, name: str, total: float) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(name, total=total, stats="")

    def update(self, completed: float, stats: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=completed, stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)


def release_space(data_dir: Path) -> None:
    """Give a finished phase's disk space back without deleting its files (the run removes its work
    directory at the end). On ext4 without a journal each inode freed makes the file creations of the
    next minutes scan past it (docs/benchmarks.md): deleting a phase's thousands of blob, journal and
    state files made the phase after it pay for that clean-up — in one pair of 1000-agent steps, 1.7 %
    against 17 % of all CPU samples in allocating inodes."""
    for directory, _, files in os.walk(data_dir):
        for name in files:
            try:
                os.truncate(os.path.join(directory, name), 0)
            except OSError:
                pass  # gone meanwhile, or not a regular file: nothing to give back


def run_phase(spec: PhaseSpec, workdir: Path, console: Console | None = None,
              on_server: Callable[[BenchServer], None] | None = None) -> dict:
    wall_start = time.monotonic()
    data_dir = workdir / spec.name / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    server = BenchServer(data_dir, agents=spec.agents, overrides=spec.overrides,
                         log_path=workdir / spec.name / "server.log", env=spec.server_env)
    server.start()
    plans = plan_agents(server.creds, spec.disks_per_agent)
    disk_names = [d for p in plans for d in p.disks]
    probe = Probe(server, disk_names, interval=max(spec.probe_interval, len(disk_names) / 2000),
                  scrape_interval=1.0 if len(disk_names) <= 100 else 0.0)  # /metrics grows with the disks
    probe.start()
    procs = auto_procs(spec.agents, spec.gen_procs)
    offered_bps = spec.offered_mbps * MB
    gen = LoadGenerator(plans, procs=procs, host="127.0.0.1", port=server.port, cafile=server.cafile,
                        profile=spec.profile, mode=spec.mode, offered_bps=offered_bps, disk_size=spec.disk_size,
                        window=spec.window, budget_bytes=spec.budget_bytes, flush_timeout=spec.flush_timeout)
    duration = spec.duration
    if spec.mode == "open" and spec.budget_bytes and offered_bps:
        duration = spec.budget_bytes / offered_bps
    result: dict = {"name": spec.name, "mode": spec.mode, "profile": spec.profile.name,
                    "agents": spec.agents, "disks": spec.disks, "disks_per_agent": spec.disks_per_agent,
                    "offered_mbps": spec.offered_mbps if spec.mode == "open" else None,
                    "window_per_agent": spec.window, "disk_size": spec.disk_size, "generator_procs": gen.procs,
                    "server_config_toml": server.toml, "server_env": spec.server_env, "server_pid": server.pid,
                    "loadavg_before": list(os.getloadavg())}
    if on_server is not None:
        on_server(server)
    spy: PySpy | None = None
    try:
        with Display(console) as display:
            display.add(spec.name, duration)
            result["connect_s"] = gen.start()
            t0 = time.monotonic() + 0.3
            t_measure, t_end = t0 + min(spec.warmup, duration / 2), t0 + duration
            gen.go(t0, t_measure, t_end)
            marks: dict[str, ProbeSample | None] = {}
            machine: dict[str, tuple[float, float, dict[str, float]]] = {}
            threads: dict[str, dict[str, tuple[float, float]]] = {}
            pending = [("start", t0), ("measure", t_measure), ("end", t_end)]

            def take_mark(label: str, now: float) -> None:
                nonlocal spy
                marks[label] = probe.sample_now()
                machine[label] = (time.monotonic(), system_cpu_seconds(), pressure_totals())
                threads[label] = thread_times(process_tree(server.pid))
                if label == "measure" and spec.pyspy_dir is not None:
                    spec.pyspy_dir.mkdir(parents=True, exist_ok=True)
                    spy = PySpy(server.pid, spec.pyspy_dir / f"{spec.name}.pyspy.txt")
                    if not spy.start():
                        result["server_profile"] = {"error": "py-spy not installed (pip install py-spy)"}
                        spy = None
                elif label == "end" and spy is not None:
                    spy.stop()
                    try:
                        result["server_profile"] = summarize(spy.out, seconds=now - t_measure, rate=spy.rate)
                    except OSError as exc:
                        said = spy.log.read_text(errors="replace")[-500:] if spy.log and spy.log.exists() else ""
                        result["server_profile"] = {"error": f"py-spy wrote no profile: {exc}; {said}"}
                    spy = None

            last_acked, last_t = 0, t0
            while not gen.done:
                next_tick = time.monotonic() + 0.25
                if pending:
                    next_tick = min(next_tick, pending[0][1])
                gen.poll(next_tick)
                now = time.monotonic()
                while pending and now >= pending[0][1]:
                    take_mark(pending.pop(0)[0], now)
                if [label for label, _ in pending] == ["end"] and gen.window_end is not None:
                    # a byte budget sent before the duration's cap: the window ends with the load
                    take_mark(pending.pop()[0], now)
                    t_end = gen.window_end
                if not server.alive():
                    raise RuntimeError(f"the server died during {spec.name}:\n{server.log_tail()}")
                acked, _sent = gen.totals()
                if now - last_t >= 1.0 or (acked and not last_acked):
                    rate = (acked - last_acked) / max(now - last_t, 1e-6) / MB
                    s = probe.samples[-1] if probe.samples else None
                    stats = f"acked {acked / MB:9.0f} MB  {rate:7.1f} MB/s"
                    if s is not None:
                        stats += f"  applied {s.applied_bytes / MB:9.0f} MB  RSS {s.rss / MiB:5.0f} MiB"
                    display.update(min(now - t0, duration), stats)
                    last_acked, last_t = acked, now
                if now > t_end + gen_flush_grace(spec):
                    last = next((x.metrics for x in reversed(probe.samples) if x.metrics), {})
                    raise RuntimeError(f"{spec.name}: generators did not finish in time; acked/sent per process "
                                       f"{gen.latest}; server gauges {last}")
            results = gen.wait_done(30)
            if pending or any("measure" not in r["snapshots"] for r in results):  # the load ended in the warm-up
                errors = [error for r in results for error in r["errors"]]
                cause = (f"the load failed: {errors[:3]}" if errors else
                         f"the byte budget was sent within the warm-up ({spec.warmup:g} s): raise --bytes or lower "
                         "--warmup")
                raise RuntimeError(f"{spec.name}: nothing to measure, {cause}")
            t_flushed = max(r["t_flushed"] for r in results)
            final_seq = {name: d["acked_seq"] for r in results for name, d in r["disks"].items()}
            caught_up = _wait_progress(probe, spec, final_seq)
            marks["caught_up"] = probe.sample_now()
            display.update(duration, "done" if spec.wait_for == "acked" else
                           f"done; {'caught up' if caught_up is not None else 'NOT caught up'}")
    except BaseException:
        server.stop()  # a failed phase never leaves its server behind, even one it was asked to keep
        raise
    finally:
        if spy is not None:
            spy.stop()
        gen.abort()
        probe.stop()
        if not spec.keep_server:
            server.stop()
    result.update(_figures(spec, gen, results, probe, marks, t0, t_measure, t_end, t_flushed, caught_up))
    result["machine_during_window"] = _machine(machine, result)
    result["server_threads"] = _threads(threads, machine)
    result["server_exit"] = server.proc.returncode if server.proc else None
    result["wait_for"] = spec.wait_for
    result["wall_s"] = round(time.monotonic() - wall_start, 1)
    if not spec.keep_data and not spec.keep_server:
        release_space(data_dir)
    result["_server"] = server  # for phases that continue on the same data (removed before JSON)
    return result


def _machine(machine: dict[str, tuple[float, float, dict[str, float]]], result: dict) -> dict | None:
    """How busy the whole machine was in the window, and how much of that was neither server nor generator."""
    if "measure" not in machine or "end" not in machine:
        return None
    (ta, ca, pa), (tb, cb, pb) = machine["measure"], machine["end"]
    span = max(tb - ta, 1e-9)
    busy = (cb - ca) / span
    generator = sum(result["generator"]["cpu_util_per_proc"])
    out = {"busy_cores": busy, "server_cores": result["server_cpu_util"], "generator_cores": generator,
           "other_cores": max(0.0, busy - result["server_cpu_util"] - generator),
           "nproc": os.cpu_count()}
    for kind in ("cpu", "io"):
        if kind in pa and kind in pb:
            out[f"{kind}_pressure_some_pct"] = 100 * (pb[kind] - pa[kind]) / span
    return out


def _threads(threads: dict[str, dict[str, tuple[float, float]]],
             machine: dict[str, tuple[float, float, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """serve's threads over the window, busiest first: cores on a CPU and cores' worth of waiting for one."""
    if "measure" not in threads or "end" not in threads:
        return {}
    span = max(machine["end"][0] - machine["measure"][0], 1e-9)
    before, after = threads["measure"], threads["end"]
    rows = {name: {"cores": (on - before.get(name, (0.0, 0.0))[0]) / span,
                   "waiting": (wait - before.get(name, (0.0, 0.0))[1]) / span}
            for name, (on, wait) in after.items()}
    return dict(sorted(rows.items(), key=lambda row: -row[1]["cores"]))


def gen_flush_grace(spec: PhaseSpec) -> float:
    return spec.flush_timeout + 30.0


def _wait_progress(probe: Probe, spec: PhaseSpec, final_seq: dict[str, int]) -> float | None:
    """Wait until the server has stored/applied everything acknowledged; returns when, or None."""
    if spec.wait_for == "acked":
        return None
    deadline = time.monotonic() + spec.catch_up_timeout
    while time.monotonic() < deadline:
        s = probe.sample_now()
        if s is not None:
            done = s.applied_seq if spec.wait_for == "applied" else s.uploaded_seq
            if all(done.get(d, 0) >= seq for d, seq in final_seq.items()):
                return s.t
        time.sleep(0.05)
    return None


def _figures(spec: PhaseSpec, gen: LoadGenerator, results: list[dict], probe: Probe,
             marks: dict[str, ProbeSample | None], t0: float, t_measure: float, t_end: float, t_flushed: float,
             caught_up: float | None) -> dict:
    # ---- the generator's side: acknowledged bytes, latency
    by_agent = {a["agent"]: a["acked_bytes"] for r in results for a in r["agents"]}
    acked_total = sum(by_agent.values())
    sent_total = sum(a["sent_bytes"] for r in results for a in r["agents"])
    window_rates, window_bytes, window_s = [], 0, 0.0
    for r in results:
        snaps = r["snapshots"]
        if "measure" in snaps and "end" in snaps:
            (ta, va), (tb, vb) = snaps["measure"], snaps["end"]
            window_rates.append((vb - va) / max(tb - ta, 1e-9))
            window_bytes += vb - va
            window_s = max(window_s, tb - ta)
    acked_bps = sum(window_rates)
    hist, hist_all, tag_hist, lateness = LogHistogram(), LogHistogram(), LogHistogram(), LogHistogram()
    for r in results:
        hist.merge(LogHistogram.from_dict(r["hist"]))
        hist_all.merge(LogHistogram.from_dict(r["hist_all"]))
        tag_hist.merge(LogHistogram.from_dict(r["tag_hist"]))
        lateness.merge(LogHistogram.from_dict(r["lateness"]))
    seqlogs = {name: SeqLog(name, d["first_seq"], d["times"], d["cum_bytes"])
               for r in results for name, d in r["disks"].items()}

    # ---- the server's side, from the probe
    samples = list(probe.samples)
    applied_pts = [(s.t, float(s.applied_bytes)) for s in samples]
    stored_pts = [(s.t, float(sum(log.bytes_through(s.uploaded_seq.get(n, 0)) for n, log in seqlogs.items())))
                  for s in samples]
    blob_pts, cum = [], 0
    for b in sorted(probe.blobs, key=lambda b: b.t):
        cum += b.size
        blob_pts.append((b.t, float(cum)))
    ratio = probe.compression_ratio()
    m_start, m_end = marks.get("measure"), marks.get("end")
    cpu_window = (m_end.cpu_s - m_start.cpu_s) if m_start and m_end else 0.0
    cpu_wall = (m_end.t - m_start.t) if m_start and m_end else 0.0
    end_sample = samples[-1] if samples else None
    total_cpu = end_sample.cpu_s if end_sample else 0.0

    # recoverable lag: age of the oldest write not yet applied, per disk, at every sample in the window
    lags, stored_lags, lag_series = [], [], []
    for s in samples:
        if not t_measure <= s.t <= t_end:
            continue
        per_disk = [log.lag(s.t, s.applied_seq.get(n, 0)) for n, log in seqlogs.items()]
        lags += per_disk
        stored_lags += [log.lag(s.t, s.uploaded_seq.get(n, 0)) for n, log in seqlogs.items()]
        lag_series.append((s.t - t0, max(per_disk) if per_disk else 0.0))
    # the tail after the end: how long until everything issued was recoverable
    for s in samples:
        if s.t > t_end:
            per_disk = [log.lag(s.t, s.applied_seq.get(n, 0)) for n, log in seqlogs.items()]
            lag_series.append((s.t - t0, max(per_disk) if per_disk else 0.0))

    step = 0.5 if t_end - t0 <= 60 else 1.0
    t_last = max(t_end, caught_up or t_end)
    acked_series = _sum_series(gen.history, t0, t_last, step)
    series = {
        "t": [round(t, 3) for t, _ in acked_series],
        "acked_mbps": [v / MB for _, v in acked_series],
        "stored_mbps": [rate_between(stored_pts, t0 + t - step, t0 + t) / MB for t, _ in acked_series],
        "stored_physical_mbps": [rate_between(blob_pts, t0 + t - step, t0 + t) / MB if blob_pts else 0.0
                                 for t, _ in acked_series],
        "applied_mbps": [rate_between(applied_pts, t0 + t - step, t0 + t) / MB for t, _ in acked_series],
        "rss_mib": [interpolate([(s.t, s.rss) for s in samples], t0 + t) / MiB for t, _ in acked_series],
        "lag_t": [round(t, 3) for t, _ in lag_series],
        "lag_s": [v for _, v in lag_series],
        "measure_from": round(t_measure - t0, 3),
        "measure_to": round(t_end - t0, 3),
    }
    gauges: dict[str, list[float]] = {}
    for s in samples:
        if t_measure <= s.t <= t_end:
            for name, value in s.metrics.items():
                gauges.setdefault(name, []).append(value)
    server_metrics = {name: {"mean": sum(v) / len(v), "max": max(v), "last": v[-1]} for name, v in gauges.items()
                      if not name.endswith(("_total", "_created"))}
    worker_util = [r["cpu_s"] / r["wall_s"] if r["wall_s"] else 0.0 for r in results]
    gen_errors = [e for r in results for e in r["errors"]]
    stored_bps = rate_between(stored_pts, t_measure, t_end)
    applied_bps = rate_between(applied_pts, t_measure, t_end)
    window_gb = window_bytes / 1e9
    return {
        "duration_s": round(t_end - t0, 3),
        "measure_window_s": round(window_s, 3),
        "acked_bytes_total": acked_total,
        "acked_bytes_by_agent": by_agent,
        "sent_bytes_total": sent_total,
        "acked_bytes_window": window_bytes,
        "writes": sum(d["writes"] for r in results for d in r["disks"].values()),
        "tags": sum(d["tags"] for r in results for d in r["disks"].values()),
        "acked_mbps": acked_bps / MB,
        "acked_mbps_halves": _halves(gen.history, t_measure, t_end),
        "stored_mbps": stored_bps / MB,
        "stored_physical_mbps": rate_between(blob_pts, t_measure, t_end) / MB if blob_pts else 0.0,
        "applied_mbps": applied_bps / MB,
        "compression_ratio": ratio,
        "blobs_seen": len(probe.blobs),
        "blobs_missed": probe.blobs_missed,
        "blob_mean_bytes": (sum(b.size for b in probe.blobs if b.size) / max(1, sum(1 for b in probe.blobs if b.size))),
        "server_cpu_s_window": cpu_window,
        "server_cpu_util": cpu_window / cpu_wall if cpu_wall else 0.0,
        "server_cpu_s_per_gb": cpu_window / window_gb if window_gb else 0.0,
        "server_cpu_s_total": total_cpu,
        "server_peak_rss": probe.peak_hwm,
        "applier_process_peak_rss": probe.peak_child_hwm,
        "server_rss_end": end_sample.rss if end_sample else 0,
        "latency": hist.summary_ms(),
        "latency_all": hist_all.summary_ms(),
        "latency_hist": hist.to_dict(),
        "tag_latency": tag_hist.summary_ms() if tag_hist.count else None,
        "lag_s": {"p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99), "max": max(lags, default=0.0),
                  "samples": len(lags)},
        "stored_lag_s": {"p50": percentile(stored_lags, 0.5), "p99": percentile(stored_lags, 0.99),
                         "max": max(stored_lags, default=0.0)},
        "flush_s": round(t_flushed - max(r["t_issued"] for r in results), 3),
        "caught_up_s": round(caught_up - t_end, 3) if caught_up is not None else None,
        "caught_up": caught_up is not None,
        "generator": {
            "procs": gen.procs,
            "cpu_util_per_proc": [round(u, 3) for u in worker_util],
            "bound": any(u > 0.9 for u in worker_util),
            "send_lateness": lateness.summary_ms() if lateness.count else None,
            "flushed": all(r["flushed"] for r in results),
            "failed_acks": sum(r["failed_acks"] for r in results),
            "peak_rss": max((r["maxrss"] for r in results), default=0),
            "errors": gen_errors[:10],
        },
        "server_gauges": server_metrics,
        "series": series,
    }


def _halves(history: dict[int, list[tuple[float, int]]], t_measure: float, t_end: float) -> list[float]:
    """Acknowledged MB/s in the first and the second half of the measurement window. A rate that falls
    within a step (this host's block allocator slows down after some tens of GB written) is a different
    finding from one that is low throughout; the mean alone hides which."""
    middle = (t_measure + t_end) / 2
    return [_acked_bps(history, a, b) / MB for a, b in ((t_measure, middle), (middle, t_end))]


def _acked_bps(history: dict[int, list[tuple[float, int]]], t0: float, t1: float) -> float:
    """Acknowledged bytes/s of all generator processes between t0 and t1 (monotonic)."""
    return sum(rate_between(pts, t0, t1) for pts in history.values() if len(pts) >= 2)


def _sum_series(history: dict[int, list[tuple[float, int]]], t0: float, t1: float,
                step: float) -> list[tuple[float, float]]:
    """Acknowledged MB/s of all generator processes on a regular grid (seconds since t0, bytes/s)."""
    out = []
    t = t0
    while t + step <= t1 + 1e-9:
        out.append((t + step - t0, _acked_bps(history, t, t + step)))
        t += step
    return out
