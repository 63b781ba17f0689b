"""The whole run: which phases, in which order, and the ratios and targets of issue 5.

Order matters on a small machine: the ceiling and borg run first, with nothing
else running; then every load phase gets a fresh server. All figures of one
result come from the same run.

Phases (``--phases``):

``ceiling``  lz4 + AES-GCM over the sample, engine's seal-thread count, no I/O
``floor``    every step an acknowledged byte takes, in C on one thread: what this design, and any
             implementation, could sustain here at most (agent and server TLS, checksums, log, seal, applier)
``borg``     borg create --compression lz4 (repokey) over the same sample
``max``      closed loop: the maximum acknowledged throughput
``open``     open loop at fractions of that maximum (``--open-loads``) or at given MB/s (``--open-rate``)
``drain``    the applier's capacity on a backlog
``scaling``  1/10/100/1000 agents at the same offered load
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bench import SCHEMA
from bench.borg import measure_borg
from bench.ceiling import measure_ceiling
from bench.drain import run_drain
from bench.floor import measure_floor
from bench.loadgen import disk_seeds, plan_agents
from bench.phases import PhaseSpec, run_phase
from bench.profiles import Profile, sample_batches
from bench.scaling import run_scaling
from bench.serverproc import AgentCreds
from engine.config import parse_config

MB = 1e6
MiB = 1024 * 1024
GiB = 1024 * MiB
ALL_PHASES = ("ceiling", "floor", "borg", "max", "open", "drain", "scaling")


@dataclass
class SuiteOptions:
    out: Path
    command: str
    phases: tuple[str, ...] = ALL_PHASES
    profile: Profile = field(default_factory=Profile)
    agents: int = 8
    disks_per_agent: int = 2
    disk_size: int = 1 * GiB
    window: int = 64 * MiB
    gen_procs: int = 0
    duration: float = 30.0
    warmup: float = 5.0
    budget_bytes: int = 0
    open_loads: tuple[float, ...] = (0.5, 0.9)
    open_rates: tuple[float, ...] = ()
    open_duration: float | None = None
    drain_duration: float | None = None
    scaling_agents: tuple[int, ...] = (1, 10, 100, 1000)
    scaling_duration: float = 45.0
    scaling_load: float = 1.0
    scaling_rate: float | None = None
    sample_bytes: int = 1 * GiB
    ceiling_seconds: float = 5.0
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)
    catch_up_timeout: float = 120.0
    keep_data: bool = False
    plots: bool = True
    quiet: bool = False
    pyspy: bool = False
    server_env: dict[str, str] = field(default_factory=dict)
    catch_up_all: bool = True  # False: only the max phase waits for the applier afterwards (quick)


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for mod in ("lz4", "cryptography", "uvloop"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    commit = None
    try:
        root = Path(__file__).resolve().parent.parent
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        commit = head + ("+dirty" if dirty else "") if head else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "loadavg_start": list(os.getloadavg()),
            "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "packages": versions, "commit": commit,
            "hostname": platform.node()}


def config_for(overrides: dict[str, dict[str, object]]):  # -> engine.config.Config
    """The configuration the server will run with (defaults + overrides), for the ceiling's parameters."""
    sections = {k: dict(v) for k, v in overrides.items()}
    sections.setdefault("server", {})["data_dir"] = "/nonexistent-bench"
    return parse_config(sections, "bench")


def run_suite(opts: SuiteOptions) -> dict:
    console = None if opts.quiet else Console(stderr=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    work = opts.out / "work"
    work.mkdir(exist_ok=True)
    started = time.time()
    result: dict = {
        "schema": SCHEMA,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": opts.command,
        "machine": machine_info(),
        "settings": _settings(opts),
        "phases": {},
        "errors": {},
    }

    def say(text: str) -> None:
        if console is not None:
            console.print(text)

    def attempt(name: str, fn: Callable[[], object]) -> object:
        """Run one phase; a failure is recorded (and shown) and the run goes on with the next phase."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            message = f"{type(exc).__name__}: {exc}"
            result["errors"][name] = message[:4000]
            say(f"[red]{name} failed:[/] {message[:500]}")
            return None

    base = PhaseSpec(name="max", mode="closed", agents=opts.agents, disks_per_agent=opts.disks_per_agent,
                     profile=opts.profile, duration=opts.duration, warmup=opts.warmup, disk_size=opts.disk_size,
                     window=opts.window, budget_bytes=opts.budget_bytes, gen_procs=opts.gen_procs,
                     overrides=opts.overrides, catch_up_timeout=opts.catch_up_timeout, keep_data=opts.keep_data,
                     flush_timeout=max(30.0, opts.catch_up_timeout),
                     pyspy_dir=opts.out / "profiles" if opts.pyspy else None, server_env=opts.server_env,
                     wait_for="applied" if config_for(opts.overrides).applier.enabled else "stored")

    # ---- the same bytes, for the ceiling, the floor and borg
    if {"ceiling", "floor", "borg"} & set(opts.phases):
        say(f"[bold]sample[/]: {opts.sample_bytes / MiB:.0f} MiB of the '{opts.profile.name}' stream "
            f"({opts.profile.mix[0]:.0%} random / {opts.profile.mix[1]:.0%} text / {opts.profile.mix[2]:.0%} zeros)")
        plans = plan_agents([AgentCreds(f"x{i}", "") for i in range(opts.agents)], opts.disks_per_agent)
        config = config_for(opts.overrides)
        batch = int(config.batch.max_bytes)
        batches = sample_batches(opts.profile, disk_seeds(plans), opts.sample_bytes, batch, opts.disk_size)
        if "ceiling" in opts.phases:
            threads = config.seal_threads
            say(f"[bold]ceiling[/]: lz4 + AES-256-GCM on {threads} thread(s), no I/O …")
            ceiling = attempt("ceiling", lambda: measure_ceiling(batches, threads, opts.ceiling_seconds))
            if ceiling:
                result["ceiling"] = ceiling
                say(f"  ceiling {ceiling['mbps']:.0f} MB/s")
        if "floor" in opts.phases:
            say("[bold]floor[/]: every step of an acknowledged byte, in C, on one thread …")
            floor = attempt("floor", lambda: measure_floor(batches, opts.ceiling_seconds))
            if floor:
                result["floor"] = floor
                say(f"  {floor['cpu_s_per_gb_acked']:.2f} CPU s/GB: at most {floor['bound_acked_mbps']:.0f} MB/s "
                    f"acknowledged on {floor['cores']} cores")
        if "borg" in opts.phases:
            say("[bold]borg[/]: borg create --compression lz4 into a repokey repository …")
            b = attempt("borg", lambda: measure_borg(batches, work / "borg"))
            if b:
                result["borg"] = b
                say(f"  borg {b['mbps']:.0f} MB/s" if b.get("mbps") else f"  borg: {b.get('note') or b.get('error')}")
        del batches

    # ---- the engine
    max_mbps = None
    if "max" in opts.phases:
        say(f"[bold]max[/]: closed loop, {opts.agents} agents × {opts.disks_per_agent} disks, {opts.duration:g}s")
        r = attempt("max", lambda: run_phase(base, work, console))
        if r:
            r.pop("_server", None)
            result["phases"]["max"] = r
            max_mbps = r["acked_mbps"]

    if "open" in opts.phases:
        loads = [(f"open{round(f * 100)}", f, (max_mbps or 0) * f) for f in opts.open_loads] if max_mbps else []
        loads += [(f"open-{rate:g}MBps", None, rate) for rate in opts.open_rates]
        if not loads:
            say("[yellow]open loop skipped: no maximum measured and no --open-rate given[/]")
        for name, fraction, rate in loads:
            say(f"[bold]{name}[/]: open loop at {rate:.0f} MB/s" + (f" ({fraction:.0%} of max)" if fraction else ""))
            spec = replace(base, name=name, mode="open", offered_mbps=rate,
                           duration=opts.open_duration or opts.duration,
                           wait_for=base.wait_for if opts.catch_up_all else "acked")
            r = attempt(name, lambda spec=spec: run_phase(spec, work, console))
            if r:
                r.pop("_server", None)
                r["fraction_of_max"] = fraction
                result["phases"][name] = r

    if "drain" in opts.phases:
        say("[bold]drain[/]: build a backlog with the applier off, then time the embedded applier on it")
        spec = replace(base, name="drain-fill", duration=opts.drain_duration or min(opts.duration, 15.0),
                       warmup=min(opts.warmup, 1.0))
        drain = attempt("drain", lambda: run_drain(spec, work, console, timeout=max(60.0, 2 * opts.catch_up_timeout)))
        if drain:
            result["drain"] = drain

    if "scaling" in opts.phases:
        rate = opts.scaling_rate or ((max_mbps or 0) * opts.scaling_load)
        if rate <= 0:
            say("[yellow]scaling skipped: no maximum measured and no --scaling-rate given[/]")
        else:
            say(f"[bold]scaling[/]: {', '.join(map(str, opts.scaling_agents))} agents at {rate:.0f} MB/s offered")
            spec = replace(base, duration=opts.scaling_duration, warmup=min(opts.warmup, opts.scaling_duration / 3),
                           catch_up_timeout=min(opts.catch_up_timeout, 60.0),
                           wait_for=base.wait_for if opts.catch_up_all else "acked")
            scaling = attempt("scaling", lambda: run_scaling(spec, list(opts.scaling_agents), rate, work, console))
            if scaling:
                result["scaling"] = scaling

    result["ratios"] = ratios(result)
    result["targets"] = targets(result)
    result["elapsed_s"] = round(time.time() - started, 1)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    if not opts.keep_data:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _settings(opts: SuiteOptions) -> dict:
    return {
        "phases": list(opts.phases), "profile": opts.profile.to_dict(), "agents": opts.agents,
        "disks_per_agent": opts.disks_per_agent, "disk_size": opts.disk_size, "window_per_agent": opts.window,
        "duration_s": opts.duration, "warmup_s": opts.warmup, "budget_bytes": opts.budget_bytes,
        "open_loads": list(opts.open_loads), "open_rates": list(opts.open_rates),
        "scaling_agents": list(opts.scaling_agents), "scaling_duration_s": opts.scaling_duration,
        "scaling_load": opts.scaling_load, "scaling_rate": opts.scaling_rate, "sample_bytes": opts.sample_bytes,
        "catch_up_all": opts.catch_up_all,
        "server_overrides": opts.overrides, "server_env": opts.server_env, "python": sys.executable,
    }


def _get(d: dict | None, *path: str) -> object:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def ratios(result: dict) -> dict:
    max_mbps = _get(result, "phases", "max", "acked_mbps")
    ceiling = _get(result, "ceiling", "mbps")
    bound = _get(result, "floor", "bound_acked_mbps")
    borg = _get(result, "borg", "mbps")
    drain = _get(result, "drain", "applied_mbps")
    return {
        "engine_over_ceiling": max_mbps / ceiling if max_mbps and ceiling else None,
        # the engine's share of what this design could acknowledge here without any overhead, and that
        # bound as a multiple of the ceiling (the highest engine / ceiling this design could show here)
        "engine_over_floor_bound": max_mbps / bound if max_mbps and bound else None,
        "floor_bound_over_ceiling": bound / ceiling if bound and ceiling else None,
        "engine_over_borg": max_mbps / borg if max_mbps and borg else None,
        "applied_capacity_over_max_ingest": drain / max_mbps if drain and max_mbps else None,
        "scaling_1000_over_10": _get(result, "scaling", "ratio_1000_over_10"),
    }


def targets(result: dict) -> list[dict]:
    """Issue 5's targets, each with the measured value and whether it is met (None: not measured)."""
    r = result["ratios"]
    out = []

    def add(name: str, value: object, limit: float, higher_is_better: bool, unit: str = "") -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "unit": unit,
                    "direction": ">=" if higher_is_better else "<=", "met": met})

    add("acknowledged ingest / ceiling", r["engine_over_ceiling"], 0.6, True, "×")
    add("acknowledged ingest / borg", r["engine_over_borg"], 2.0, True, "×")
    add("ack latency p99 at 50 % of max", _get(result, "phases", "open50", "latency", "p99_ms"), 10.0, False, "ms")
    add("ack latency p99 at 90 % of max", _get(result, "phases", "open90", "latency", "p99_ms"), 50.0, False, "ms")
    add("recoverable lag p99 at 50 % of max", _get(result, "phases", "open50", "lag_s", "p99"), 2.0, False, "s")
    add("applied capacity / max ingest", r["applied_capacity_over_max_ingest"], 1.5, True, "×")
    add("1000 agents / 10 agents throughput", r["scaling_1000_over_10"], 0.8, True, "×")
    rss_1000 = None
    for step in _get(result, "scaling", "steps") or []:
        if step.get("agents") == 1000 and "server_peak_rss" in step:
            rss_1000 = step["server_peak_rss"] / MiB
    add("server RSS at 1000 agents", rss_1000, 1024.0, False, "MiB")
    rss_max = _get(result, "phases", "max", "server_peak_rss")
    add("server RSS at max throughput (default config)", rss_max / MiB if rss_max else None, 512.0, False, "MiB")
    return out

