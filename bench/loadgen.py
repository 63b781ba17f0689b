"""The load generator: simulated agents, each a real ``engine.agent.Agent`` over TLS.

Agents are spread over one or more generator *processes* (``multiprocessing``,
spawn) so that a thousand connections or a high rate do not make the generator
the bottleneck; each process runs its agents on one event loop (uvloop when
installed). Payloads are memoryviews into a pre-generated ``ContentPool``.

Two modes:

- **closed loop**: every disk writes as fast as the agent's unacknowledged
  window allows; latency is measured from the call to ``write``.
- **open loop**: every disk follows a fixed schedule (its share of the offered
  MB/s); latency is measured from the *intended* send time, so a stalled server
  shows up as latency instead of silently slowing the generator down (no
  coordinated omission).

The parent (``LoadGenerator``) starts the processes, waits until every agent is
connected and every disk open, gives one common start time, collects progress
every ``report_s`` and, at the end, each process's result: bytes per agent,
latency histograms, and per-disk sequence logs (for lag and stored/applied bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import random
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench.profiles import BurstClock, DiskWorkload, Profile, disk_seed
from bench.serverproc import AgentCreds, raise_nofile
from bench.stats import LogHistogram, SeqLog
from engine.aio import run_loop

MiB = 1024 * 1024


@dataclass(frozen=True)
class AgentPlan:
    index: int
    agent_id: str
    token: str
    disks: tuple[str, ...]


@dataclass(frozen=True)
class WorkerSpec:
    worker: int
    host: str
    port: int
    cafile: str
    agents: tuple[AgentPlan, ...]
    profile: dict
    mode: str  # "closed" | "open"
    rate_per_disk: float  # bytes/s, open loop only
    disk_size: int
    window: int  # max unacknowledged bytes per agent
    budget_per_disk: int  # 0: no byte budget
    flush_timeout: float
    report_s: float
    connect_concurrency: int = 64


def plan_agents(creds: list[AgentCreds], disks_per_agent: int) -> list[AgentPlan]:
    return [AgentPlan(i, c.agent_id, c.token, tuple(f"a{i:05d}d{j:02d}" for j in range(disks_per_agent)))
            for i, c in enumerate(creds)]


def disk_seeds(plans: list[AgentPlan]) -> list[int]:
    return [disk_seed(p.index, j) for p in plans for j in range(len(p.disks))]


# ====================================================================== worker process


def worker_main(spec: WorkerSpec, out_q: mp.Queue, ctl_q: mp.Queue) -> None:
    raise_nofile()
    try:
        run_loop(_Worker(spec, out_q, ctl_q).run())
    except BaseException:  # noqa: BLE001 - report anything to the parent, then die
        out_q.put(("error", spec.worker, traceback.format_exc()))


@dataclass
class _Disk:
    agent_index: int
    name: str
    handle: object  # engine.agent.AgentDisk
    seqlog: SeqLog
    issued: int = 0
    writes: int = 0
    tags: int = 0


class _Worker:
    def __init__(self, spec: WorkerSpec, out_q: mp.Queue, ctl_q: mp.Queue) -> None:
        self.spec = spec
        self.out_q = out_q
        self.ctl_q = ctl_q
        self.profile = Profile.from_dict(spec.profile)
        self.agents: list[object] = []
        self.disks: list[_Disk] = []
        self.hist = LogHistogram()  # acks of writes meant to be sent inside the measurement window
        self.hist_all = LogHistogram()
        self.tag_hist = LogHistogram()
        self.lateness = LogHistogram()  # open loop: how late the generator called write() vs its schedule
        self.errors: list[str] = []
        self.t_measure = self.t_end = 0.0
        self.failed_acks = 0

    async def run(self) -> None:
        pool = self.profile.make_pool()
        await self._connect()
        self.out_q.put(("ready", self.spec.worker, len(self.agents), len(self.disks)))
        loop = asyncio.get_running_loop()
        msg = await loop.run_in_executor(None, self.ctl_q.get)
        if msg[0] != "go":
            await self._close()
            return
        _, t0, t_measure, t_end = msg
        self.t_measure, self.t_end = t_measure, t_end
        cpu0 = time.process_time()
        wall0 = time.monotonic()
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        reporter = asyncio.create_task(self._report_loop())
        snaps: dict[str, tuple[float, int]] = {}
        snapper = asyncio.create_task(self._snapshots(snaps))
        rng = random.Random(self.spec.worker)
        tasks = [asyncio.create_task(self._drive(d, pool, t0, t_end, rng.random())) for d in self.disks]
        # A disk whose window stays full (no acks) would block its task forever: give up on it shortly after the
        # end, and say so, instead of hanging the run.
        done, blocked = await asyncio.wait(tasks, timeout=max(0.0, t_end - time.monotonic()) + 10.0)
        for task in blocked:
            task.cancel()
        if blocked:
            self.errors.append(f"{len(blocked)} disk(s) still waiting for window space 10 s after the end "
                               f"(no acknowledgements arriving)")
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                self.errors.append(f"{type(exc).__name__}: {exc}")
        await asyncio.gather(*blocked, return_exceptions=True)
        t_issued = time.monotonic()
        flushed = True
        try:
            await asyncio.wait_for(asyncio.gather(*(a.flush() for a in self.agents)), self.spec.flush_timeout)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001
            flushed = False
            self.errors.append(f"flush: {type(exc).__name__}: {exc}")
        t_flushed = time.monotonic()
        snapper.cancel()
        if "end" not in snaps:  # a byte budget sent (or the schedule's last write due) before the window's end
            snaps["end"] = (t_flushed, self._acked())
        self.out_q.put(("flushed", self.spec.worker, snaps["end"][0]))  # the phase ends its window with ours
        reporter.cancel()
        cpu = time.process_time() - cpu0
        self.out_q.put(("progress", self.spec.worker, time.monotonic(), self._acked(), self._sent()))
        result = {
            "worker": self.spec.worker,
            "agents": [{"agent": a.agent_id, "acked_bytes": sum(d.acked_bytes for d in a.disks.values()),
                        "sent_bytes": sum(d.sent_bytes for d in a.disks.values()),
                        "connections": a.connections} for a in self.agents],
            "disks": {d.name: {"first_seq": d.seqlog.first_seq, "times": d.seqlog.times,
                               "cum_bytes": d.seqlog.cum_bytes, "writes": d.writes, "tags": d.tags,
                               "acked_seq": d.handle.acked_seq} for d in self.disks},
            "hist": self.hist.to_dict(),
            "hist_all": self.hist_all.to_dict(),
            "tag_hist": self.tag_hist.to_dict(),
            "lateness": self.lateness.to_dict(),
            "snapshots": snaps,
            "t_issued": t_issued,
            "t_flushed": t_flushed,
            "flushed": flushed,
            "failed_acks": self.failed_acks,
            "cpu_s": cpu,
            "wall_s": t_flushed - wall0,
            "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "errors": self.errors[:20],
        }
        await self._close()
        self.out_q.put(("done", self.spec.worker, result))

    # -- setup / teardown

    async def _connect(self) -> None:
        from engine.agent import Agent
        from engine.tls import client_context

        ctx = client_context(Path(self.spec.cafile))
        sem = asyncio.Semaphore(self.spec.connect_concurrency)

        async def one(plan: AgentPlan) -> None:
            async with sem:
                agent = Agent(self.spec.host, self.spec.port, plan.agent_id, plan.token, ssl_context=ctx,
                              server_hostname="localhost", max_unacked_bytes=self.spec.window)
                self.agents.append(agent)
                await asyncio.wait_for(agent.start(), 120)
                for name in plan.disks:
                    handle = await asyncio.wait_for(agent.open_disk(name, self.spec.disk_size), 120)
                    self.disks.append(_Disk(plan.index, name, handle, SeqLog(name, handle.next_seq)))

        await asyncio.gather(*(one(p) for p in self.spec.agents))
        # stable order (agent-major) so that disk i gets the same seed as in the ceiling replay
        order = {p.agent_id: p.index for p in self.spec.agents}
        self.agents.sort(key=lambda a: order[a.agent_id])
        self.disks.sort(key=lambda d: d.name)

    async def _close(self) -> None:
        await asyncio.gather(*(a.close() for a in self.agents), return_exceptions=True)

    # -- counters

    def _acked(self) -> int:
        return sum(d.handle.acked_bytes for d in self.disks)

    def _sent(self) -> int:
        return sum(d.issued for d in self.disks)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.spec.report_s)
            self.out_q.put(("progress", self.spec.worker, time.monotonic(), self._acked(), self._sent()))

    async def _snapshots(self, snaps: dict[str, tuple[float, int]]) -> None:
        for label, when in (("measure", self.t_measure), ("end", self.t_end)):
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            snaps[label] = (time.monotonic(), self._acked())

    # -- the write loops

    def _on_ack(self, hist: LogHistogram, intended: float, future: asyncio.Future) -> None:
        if future.cancelled() or future.exception() is not None:
            self.failed_acks += 1
            return
        latency = time.monotonic() - intended
        self.hist_all.record(latency)
        if self.t_measure <= intended < self.t_end and hist is not None:
            hist.record(latency)

    async def _drive(self, disk: _Disk, pool: object, t0: float, t_end: float, phase: float) -> None:
        from protocol import TagKind

        spec, profile = self.spec, self.profile
        workload = DiskWorkload(profile, pool, spec.disk_size, disk_seed(disk.agent_index, int(disk.name[-2:])))
        clock = BurstClock(profile)
        handle = disk.handle
        seqlog = disk.seqlog
        budget = spec.budget_per_disk or math.inf
        open_loop = spec.mode == "open"
        rate = spec.rate_per_disk
        # bursts keep the average rate: inside a burst the schedule runs 1/duty times faster
        busy_rate = rate / profile.burst_duty if profile.burst else rate
        on_ack: Callable = self._on_ack
        hist = self.hist
        # open loop: a random phase inside one write interval, so disks do not fire in lock step
        busy = phase * (64 * 1024) / busy_rate if open_loop and rate > 0 else 0.0
        next_tag = t0 + profile.tag_interval_s * (0.5 + phase) if profile.tags else math.inf
        since_yield = 0
        monotonic = time.monotonic
        while disk.issued < budget:
            now = monotonic()
            if now >= t_end:
                break
            if now >= next_tag:
                intended_tag = next_tag
                next_tag += profile.tag_interval_s
                fut = await handle.tag(TagKind.APP, f"app-{disk.tags}")
                seqlog.add(intended_tag if open_loop else now, 0)
                disk.tags += 1
                fut.add_done_callback(partial(self._on_tag_ack, intended_tag if open_loop else now))
                continue
            offset, data = workload.next()
            size = len(data)
            if open_loop:
                intended = t0 + clock.wall(busy)
                busy += size / busy_rate
                if intended >= t_end:
                    break
                delay = intended - monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    since_yield = 0
                else:
                    self.lateness.record(-delay)
            else:
                wait = clock.off_until(now - t0)
                if wait > 0:
                    await asyncio.sleep(min(wait, t_end - now))
                    since_yield = 0
                    if monotonic() >= t_end:
                        break
                intended = monotonic()
            fut = await handle.write(offset, data)
            seqlog.add(intended, size)
            disk.issued += size
            disk.writes += 1
            fut.add_done_callback(partial(on_ack, hist, intended))
            since_yield += size
            if since_yield >= 4 * MiB:  # a free window never suspends: let acks and other disks in
                since_yield = 0
                await asyncio.sleep(0)

    def _on_tag_ack(self, intended: float, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.tag_hist.record(time.monotonic() - intended)


# ====================================================================== parent side


@dataclass
class GenProgress:
    t: list[float] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)


class GeneratorError(RuntimeError):
    pass


class LoadGenerator:
    """Starts the generator processes, synchronises them, and gathers what they measured."""

    def __init__(self, plans: list[AgentPlan], *, procs: int, host: str, port: int, cafile: Path,
                 profile: Profile, mode: str, offered_bps: float, disk_size: int, window: int,
                 budget_bytes: int = 0, flush_timeout: float = 120.0, report_s: float = 0.25) -> None:
        self.plans = plans
        self.procs = max(1, min(procs, len(plans)))
        n_disks = sum(len(p.disks) for p in plans)
        self.n_disks = n_disks
        self._ctx = mp.get_context("spawn")
        self.out_q: mp.Queue = self._ctx.Queue()
        self.ctl_qs: list[mp.Queue] = []
        self.workers: list[mp.Process] = []
        self.specs = []
        for w in range(self.procs):
            mine = tuple(plans[w::self.procs])
            self.specs.append(WorkerSpec(
                worker=w, host=host, port=port, cafile=str(cafile), agents=mine, profile=profile.to_dict(),
                mode=mode, rate_per_disk=(offered_bps / n_disks) if mode == "open" else 0.0, disk_size=disk_size,
                window=window, budget_per_disk=(budget_bytes // n_disks) if budget_bytes else 0,
                flush_timeout=flush_timeout, report_s=report_s))
        self.latest: dict[int, tuple[float, int, int]] = {}
        self.history: dict[int, list[tuple[float, int]]] = {}
        self.results: dict[int, dict] = {}
        self.window_ends: dict[int, float] = {}  # worker → when its measurement window ended
        self.errors: list[str] = []

    def start(self, timeout: float = 180.0) -> float:
        """Spawn the processes and wait until every agent is connected; returns the connect time."""
        t = time.monotonic()
        for spec in self.specs:
            ctl: mp.Queue = self._ctx.Queue()
            proc = self._ctx.Process(target=worker_main, args=(spec, self.out_q, ctl), name=f"bench-gen-{spec.worker}",
                                     daemon=True)
            proc.start()
            self.ctl_qs.append(ctl)
            self.workers.append(proc)
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < len(self.workers):
            msg = self._get(deadline)
            if msg[0] == "ready":
                ready.add(msg[1])
        return time.monotonic() - t

    def go(self, t0: float, t_measure: float, t_end: float) -> None:
        for ctl in self.ctl_qs:
            ctl.put(("go", t0, t_measure, t_end))

    def _get(self, deadline: float) -> tuple:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.abort()
                raise GeneratorError("generator processes did not answer in time")
            try:
                msg = self.out_q.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p for p in self.workers if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    self.abort()
                    raise GeneratorError(f"generator process {dead[0].name} died (exit {dead[0].exitcode})") from None
                continue
            self._handle(msg)
            return msg

    def poll(self, until: float) -> None:
        """Process messages until ``until`` (monotonic), or until a generator process ends its window."""
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            try:
                msg = self.out_q.get(timeout=remaining)
            except queue.Empty:
                return
            self._handle(msg)
            if msg[0] == "flushed":
                return

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "error":
            self.abort()
            raise GeneratorError(f"generator process {msg[1]} failed:\n{msg[2]}")
        if msg[0] == "progress":
            self.latest[msg[1]] = (msg[2], msg[3], msg[4])
            self.history.setdefault(msg[1], []).append((msg[2], msg[3]))
        elif msg[0] == "flushed":
            self.window_ends[msg[1]] = msg[2]
        elif msg[0] == "done":
            self.results[msg[1]] = msg[2]

    def totals(self) -> tuple[int, int]:
        return (sum(v[1] for v in self.latest.values()), sum(v[2] for v in self.latest.values()))

    @property
    def done(self) -> bool:
        return len(self.results) == len(self.workers)

    @property
    def window_end(self) -> float | None:
        """When the last generator process ended its measurement window (its load sent and acknowledged,
        or the duration over), once every one has: None before."""
        return max(self.window_ends.values()) if len(self.window_ends) == len(self.workers) else None

    def wait_done(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not self.done:
            self._get(deadline)
        for proc in self.workers:
            proc.join(10)
        return [self.results[w] for w in sorted(self.results)]

    def abort(self) -> None:
        for ctl in self.ctl_qs:
            # Best effort: a closed or full queue (or a broken pipe) is fine, terminate() below stops the worker anyway.
            with contextlib.suppress(ValueError, OSError, queue.Full):
                ctl.put_nowait(("abort",))
        for proc in self.workers:
            if proc.is_alive():
                proc.terminate()
        for proc in self.workers:
            proc.join(5)


def auto_procs(agents: int, requested: int = 0) -> int:
    """Generator processes: one per 250 agents, at most one per core (the server needs the rest)."""
    if requested > 0:
        return requested
    return max(1, min(os.cpu_count() or 1, math.ceil(agents / 250)))
