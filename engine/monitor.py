"""How far behind each disk is, as numbers (Prometheus), a verdict (/healthz), alerts and a table.

A ``Monitor`` observes the parts of this process — the pipeline (``serve``), the
applier (embedded, or ``blockferry apply``), or both — and changes nothing. Every
time below is the **server's** clock (microseconds since the epoch, taken when a
batch was opened or a blob was first listed), never the source clock a write
carries: a source clock that jumps back, or one that is simply wrong, cannot
distort a lag, and ordering is by sequence number everywhere else anyway.

Definitions, per disk:

ingest lag
    now − server-clock arrival time of the oldest accepted write not yet in the
    cache store (``DiskStream.oldest_unstored_us()``: the oldest batch still open,
    sealing or uploading); 0 when everything accepted is stored.

recoverable lag (the RPO)
    now − arrival time of the oldest accepted write that is not yet recoverable,
    i.e. ``max(ingest lag, now − applier.oldest_pending_us(disk))``; 0 when
    everything acknowledged is applied. We deliberately do **not** use "now −
    source time of the newest recovery point": an idle disk (nothing to replicate,
    nothing lost) would look ever more behind, and a source clock that jumps
    (back an hour, or forward) would distort the figure by the size of the jump.
    The apply part is measured from when the applier first listed a pending blob,
    so it slightly under-reads (by the time between upload and listing: almost
    nothing embedded, where uploads wake the applier; up to ``applier.poll_ms``
    for a separate ``blockferry apply``; the blobs' whole wait if the applier was
    restarted while they were pending).

    Each process reports what it can see: ``serve`` with its applier (on its
    loop, or — the default — as its child process, which reports every applied
    sequence back) sees all three stages, the apply part of a child's blobs
    measured from when the batch arrived (exact, except blobs stored by an
    earlier run, counted from the first report); ``serve`` without an applier
    sees ingest and upload only, and ``apply`` sees apply only
    (``DiskHealth.observed`` says which). Alerting from both processes covers the
    whole path.

stage behind
    where the oldest unrecoverable write waits: ``"ingest"`` (batching or sealing)
    or ``"upload"`` (``DiskStream.stage_behind()``), or ``"apply"`` (blobs pending
    in the cache store; also whenever the applier has stopped the disk on a bad
    blob); ``None`` when nothing is behind.

backlog
    server side: bytes accepted but not yet stored (``DiskStream.backlog_bytes``);
    applier side: the number of blobs pending in the cache store.

churn rate
    bytes per second received for the disk over a sliding window (10 s by
    default) of samples taken by the alert loop and on every snapshot; in an
    apply-only process, bytes applied per second instead.

applied sequence, last recovery point
    the applier's applied sequence and its newest point (sequence, kind, source
    time — the source time is shown, never used to order or to measure lag).

The RPO alert (``run``) compares each disk's recoverable lag with its policy's
``rpo_threshold_s`` every ``interval_s``; crossing it emits one
``rpo_exceeded`` event, and falling back to ``clear_ratio`` × threshold (default
0.8: a little hysteresis so a lag hovering at the threshold does not flap) emits
one ``rpo_recovered``. Each event is one log record on the ``blockferry.alerts``
logger whose message is the event as JSON, and, if ``alerts.webhook_url`` is set,
a POST of the same JSON. Posts go through a bounded queue drained by one task,
so a slow or failing webhook is logged and never delays the loop, let alone
replication.

Everything here runs on the event loop thread that owns the pipeline and the
applier (collectors are called from the ``/metrics`` handler on that loop).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from rich.table import Table
from rich.text import Text

from engine.config import Config
from engine.recovery.points import points_of

if TYPE_CHECKING:
    import aiohttp

    from engine.applier import Applier
    from engine.pipeline import Pipeline

log = logging.getLogger(__name__)
alerts_log = logging.getLogger("blockferry.alerts")

STAGES = ("ingest", "upload", "apply")


def _now_us() -> int:
    return time.time_ns() // 1000


def _lag_s(now_us: int, since_us: int | None) -> float:
    """Seconds since ``since_us``; 0 for nothing waiting (and never negative if the server clock stepped back)."""
    return 0.0 if since_us is None else max(0.0, (now_us - since_us) / 1e6)


@dataclass
class DiskHealth:
    """One disk as this process sees it; ``None`` marks what this process cannot observe."""

    disk: str
    recoverable_lag_s: float
    rpo_threshold_s: float
    stage: str | None = None
    ingest_lag_s: float | None = None
    backlog_bytes: int | None = None  # server side: accepted, not yet in the cache store
    pending_blobs: int | None = None  # applier side: blobs in the cache store waiting to be applied
    churn_bps: float = 0.0
    received_bytes: int | None = None
    sealed_bytes: int | None = None
    durable_seq: int | None = None
    uploaded_seq: int | None = None
    applied_seq: int | None = None
    applied_bytes: int | None = None
    points: int | None = None
    last_point_seq: int | None = None
    last_point_kind: str | None = None
    last_point_source_us: int | None = None
    failure: str | None = None  # why replication of this disk stopped
    stopped_at: str = "apply"  # the stage that stopped it: the applier on a bad blob, or ingest (its log)
    observed: tuple[str, ...] = ()  # "server", "applier" and/or "applier process" (serve's child)

    @property
    def rpo_exceeded(self) -> bool:
        return self.recoverable_lag_s > self.rpo_threshold_s

    @property
    def last_point_time(self) -> str | None:
        if self.last_point_source_us is None:
            return None
        moment = datetime.datetime.fromtimestamp(self.last_point_source_us / 1e6, datetime.UTC)
        return moment.isoformat()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["observed"] = list(self.observed)
        data["rpo_exceeded"] = self.rpo_exceeded
        data["last_point_time"] = self.last_point_time
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskHealth:
        """Inverse of ``as_dict`` (for ``blockferry status`` reading a running process's JSON)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["observed"] = tuple(values.get("observed", ()))
        return cls(**values)


class _Rate:
    """Bytes per second of a monotonic counter over a sliding window of samples."""

    def __init__(self, window_s: float, min_spacing_s: float = 0.2) -> None:
        self.window_s = window_s
        self.min_spacing_s = min_spacing_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, t: float, value: int) -> None:
        s = self.samples
        if len(s) >= 2 and t - s[-2][0] < self.min_spacing_s:
            s[-1] = (t, value)  # bounded however often we are sampled
        else:
            s.append((t, value))
        while len(s) > 2 and s[1][0] <= t - self.window_s:  # keep one sample at or before the window start
            s.popleft()

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self.samples[0], self.samples[-1]
        return max(0.0, (v1 - v0) / (t1 - t0)) if t1 > t0 else 0.0


WEBHOOK_BACKLOG = 100  # alert events waiting for the webhook before new ones are dropped (and logged)


class Monitor:
    def __init__(self, config: Config, pipeline: Pipeline | None, applier: Applier | None, *,
                 interval_s: float = 1.0, churn_window_s: float = 10.0, upload_failing_s: float = 60.0,
                 clear_ratio: float = 0.8, alerts: bool = True) -> None:
        """``alerts=False``: observe and report, never alert (serve's applier process: serve alerts for it)."""
        self.config = config
        self.alerts = alerts
        self.pipeline = pipeline
        self.applier = applier
        self.interval_s = interval_s
        self.churn_window_s = churn_window_s
        self.upload_failing_s = upload_failing_s
        self.clear_ratio = clear_ratio
        self.alerting: dict[str, dict[str, Any]] = {}  # disk → its rpo_exceeded event, while it lasts
        self.webhook_failures = 0
        self._rates: dict[str, _Rate] = {}
        stats = pipeline.stats if pipeline is not None else None
        self._last_stored = stats.stored_bytes if stats else 0
        self._last_upload_errors = stats.upload_errors if stats else 0
        self._upload_failing_since: float | None = None  # monotonic
        self._webhook: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WEBHOOK_BACKLOG)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MonitorCollector(self))

    # ------------------------------------------------------------ observation

    def disks(self) -> list[str]:
        names: set[str] = set()
        if self.pipeline is not None:
            names.update(self.pipeline.streams)
        if self.applier is not None:
            names.update(self.applier.disks)
            names.update(self.applier.failures)
            names.update(d for d, blobs in self.applier.first_seen.items() if blobs)
        return sorted(names)

    def observe(self) -> None:
        """Take the periodic samples (churn per disk, upload progress); ``run`` calls it every interval.

        Kept apart from ``snapshot`` so reading the state — a /metrics scrape, /healthz, ``status`` — never
        changes it: churn does not depend on how often Prometheus scrapes.
        """
        now_mono = time.monotonic()
        self._observe_uploads(now_mono)
        for disk in self.disks():
            counter = self._churn_counter(disk)
            if counter is not None:
                self._rates.setdefault(disk, _Rate(self.churn_window_s)).add(now_mono, counter)

    def _churn_counter(self, disk: str) -> int | None:
        """Bytes received for ``disk`` (an apply-only process: bytes applied), None if nothing here knows it."""
        stream = self.pipeline.streams.get(disk) if self.pipeline is not None else None
        if stream is not None:
            return stream.received_bytes
        d = self.applier.disks.get(disk) if self.applier is not None else None
        return d.state.applied_bytes if d is not None else None

    def snapshot(self) -> list[DiskHealth]:
        """Every disk's health now, sorted by disk id; changes nothing."""
        now_us = _now_us()
        return [self._disk_health(disk, now_us) for disk in self.disks()]

    def _disk_health(self, disk: str, now_us: int) -> DiskHealth:
        h = DiskHealth(disk, 0.0, self.config.policy_for(disk).rpo_threshold_s)
        observed: list[str] = []
        oldest: dict[str, int] = {}  # stage → arrival (server clock) of its oldest unrecoverable write
        stream = self.pipeline.streams.get(disk) if self.pipeline is not None else None
        if self.pipeline is not None:
            observed.append("server")
            h.ingest_lag_s = 0.0
            h.backlog_bytes = 0
            h.received_bytes = h.sealed_bytes = 0
        if stream is not None:
            unstored = stream.oldest_unstored_us()
            h.ingest_lag_s = _lag_s(now_us, unstored)
            if unstored is not None:
                oldest[stream.stage_behind() or "ingest"] = unstored
            h.backlog_bytes = stream.backlog_bytes
            h.received_bytes = stream.received_bytes
            h.sealed_bytes = stream.sealed_bytes
            h.durable_seq = stream.durable_seq
            h.uploaded_seq = stream.uploaded_seq
        if self.applier is not None:
            observed.append("applier")
            a = self.applier
            h.pending_blobs = len(a.first_seen.get(disk, {}))
            h.applied_seq = h.applied_bytes = h.points = 0  # until the applier opens the disk
            pending = a.oldest_pending_us(disk)
            if pending is not None:
                oldest["apply"] = pending
            d = a.disks.get(disk)
            if d is not None:
                h.applied_seq = d.state.applied_seq
                h.applied_bytes = d.state.applied_bytes
                h.points = len(d.entries)
                if d.entries:  # appended in sequence order, pruned from the front: the last is the newest
                    point = points_of(disk, [d.entries[-1]])[0]
                    h.last_point_seq, h.last_point_kind, h.last_point_source_us = point.seq, point.kind, point.source_us
            failure = a.failures.get(disk)
            if failure is not None:
                h.failure = f"blob {failure.blob}: {failure.reason}"
        elif stream is not None and self.pipeline is not None and self.pipeline.track_applied:
            observed.append("applier process")  # serve's own child: what it reports, and what it has not applied
            h.applied_seq = stream.applied_seq
            unapplied = stream.oldest_unapplied_us()
            if unapplied is not None:
                oldest["apply"] = unapplied
            if stream.apply_failure is not None:
                h.failure = stream.apply_failure
        if stream is not None and stream.log_failure is not None:
            h.failure, h.stopped_at = stream.log_failure, "ingest"
        h.observed = tuple(observed)
        if oldest:
            h.stage = min(oldest, key=lambda stage: (oldest[stage], STAGES.index(stage)))
            h.recoverable_lag_s = _lag_s(now_us, oldest[h.stage])
        if h.failure is not None:
            h.stage = h.stopped_at  # nothing more of this disk becomes recoverable until the operator acts
        rate = self._rates.get(disk)
        h.churn_bps = rate.rate() if rate is not None else 0.0
        return h

    def _observe_uploads(self, now_mono: float) -> None:
        """Track whether uploads have been failing with no success since the first failure."""
        if self.pipeline is None:
            return
        stats = self.pipeline.stats
        stored_moved = stats.stored_bytes != self._last_stored
        errors_moved = stats.upload_errors != self._last_upload_errors
        self._last_stored, self._last_upload_errors = stats.stored_bytes, stats.upload_errors
        # a stopped disk's blob that will never be stored (Pipeline._stop_disk) is not the store failing
        waiting = self.pipeline._upload_queue.qsize() or any(s.uploading and s.log_failure is None
                                                             for s in self.pipeline.streams.values())
        if stored_moved or not waiting:
            self._upload_failing_since = None
        elif errors_moved and self._upload_failing_since is None:
            self._upload_failing_since = now_mono

    def healthy(self) -> tuple[bool, list[str]]:
        """For /healthz: (True, []) or (False, reasons), one reason per problem, each naming what it concerns."""
        reasons: list[str] = []
        healths = self.snapshot()
        for h in healths:
            if h.failure is not None:
                stopper = "the applier stopped the disk on a bad log blob" if h.stopped_at == "apply" else \
                    "the server stopped the disk"
                reasons.append(f"disk {h.disk!r}: {stopper} ({h.failure})")
        if self.pipeline is not None:
            reasons += [f"{worker}; the blobs it would store wait in the spool until the server restarts"
                        for worker in self.pipeline.failed_upload_workers()]
        if self._upload_failing_since is not None:
            failing = time.monotonic() - self._upload_failing_since
            if failing >= self.upload_failing_s:
                assert self.pipeline is not None
                reasons.append(f"uploads to the cache store have been failing for {failing:.0f}s "
                               f"({self.pipeline.stats.upload_errors} errors so far)")
        for h in healths:
            if h.rpo_exceeded:
                reasons.append(f"disk {h.disk!r}: RPO {h.recoverable_lag_s:.1f}s exceeds its threshold "
                               f"{h.rpo_threshold_s:g}s (behind in {h.stage or '-'})")
            elif h.disk in self.alerting:  # the same hysteresis as the alert, so the two never disagree
                reasons.append(f"disk {h.disk!r}: RPO {h.recoverable_lag_s:.1f}s not yet back below "
                               f"{h.rpo_threshold_s * self.clear_ratio:g}s since it exceeded {h.rpo_threshold_s:g}s")
        return not reasons, reasons

    # ------------------------------------------------------------ alerts

    def evaluate(self) -> list[dict[str, Any]]:
        """One alert pass: the events to emit now (each disk changes state at most once per pass)."""
        events: list[dict[str, Any]] = []
        for h in self.snapshot():
            active = h.disk in self.alerting
            if not active and h.recoverable_lag_s > h.rpo_threshold_s:
                event = self._event("rpo_exceeded", h)
                self.alerting[h.disk] = event
                events.append(event)
            elif active and h.recoverable_lag_s <= h.rpo_threshold_s * self.clear_ratio:
                del self.alerting[h.disk]
                events.append(self._event("rpo_recovered", h))
        return events

    @staticmethod
    def _event(kind: str, h: DiskHealth) -> dict[str, Any]:
        return {"event": kind, "disk": h.disk, "rpo_s": round(h.recoverable_lag_s, 3),
                "threshold_s": h.rpo_threshold_s, "stage": h.stage,
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")}

    def emit(self, event: dict[str, Any]) -> None:
        level = logging.WARNING if event["event"] == "rpo_exceeded" else logging.INFO
        alerts_log.log(level, json.dumps(event), extra={"alert": event})
        if self.config.alerts.webhook_url:
            try:
                self._webhook.put_nowait(event)
            except asyncio.QueueFull:
                log.error("alerts: webhook backlog full (%d events); dropping %s for disk %r",
                          self._webhook.qsize(), event["event"], event["disk"])

    async def run(self) -> None:
        """The alert loop; runs until cancelled. Observes and alerts only."""
        session: aiohttp.ClientSession | None = None
        sender: asyncio.Task[None] | None = None
        if self.config.alerts.webhook_url:
            import aiohttp

            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.alerts.webhook_timeout_s))
            sender = asyncio.create_task(self._send_webhooks(session), name="alerts-webhook")
        try:
            while True:
                try:
                    self.observe()
                    for event in self.evaluate() if self.alerts else ():
                        self.emit(event)
                except Exception:  # a bug here must not end monitoring for good
                    log.exception("monitor: alert pass failed")
                await asyncio.sleep(self.interval_s)
        finally:
            if sender is not None:
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
            if session is not None:
                await session.close()

    async def _send_webhooks(self, session: aiohttp.ClientSession) -> None:
        url = self.config.alerts.webhook_url
        assert url
        where = urlsplit(url).netloc.rpartition("@")[2]  # webhook URLs often carry a secret: log the host only
        while True:
            event = await self._webhook.get()
            try:
                async with session.post(url, json=event) as resp:
                    if resp.status >= 300:
                        self.webhook_failures += 1
                        log.warning("alerts: webhook %s answered HTTP %d to %s for disk %r",
                                    where, resp.status, event["event"], event["disk"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — timeouts, refused connections, bad URLs: log, go on
                self.webhook_failures += 1
                log.warning("alerts: webhook %s failed for %s of disk %r: %s", where, event["event"], event["disk"],
                            exc.__class__.__name__ + (f": {exc}" if str(exc) else ""))


# ---------------------------------------------------------------- Prometheus


class MonitorCollector(Collector):
    """Reads the live objects at scrape time; nothing is counted twice or kept in parallel."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def describe(self) -> list[Metric]:
        return []  # families depend on what this process runs; collect() is cheap, nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        m = self.monitor
        healths = m.snapshot()
        yield from self._pipeline(m.pipeline)
        yield from self._applier(m.applier)
        errors = CounterMetricFamily("blockferry_errors", "Errors by kind: upload (retried), spool (retried), "
                                     "failed_blob (the applier stopped a disk).", labels=["kind"])
        if m.pipeline is not None:
            errors.add_metric(["upload"], m.pipeline.stats.upload_errors)
            errors.add_metric(["spool"], m.pipeline.stats.spool_errors)
        if m.applier is not None:
            errors.add_metric(["failed_blob"], m.applier.stats.failed_blobs)
        yield errors
        yield from self._disks(healths)

    @staticmethod
    def _pipeline(p: Pipeline | None) -> Iterator[Metric]:
        if p is None:
            return
        stats = p.stats
        stored = CounterMetricFamily("blockferry_stored_bytes", "Sealed bytes uploaded to the cache store.")
        stored.add_metric([], stats.stored_bytes)
        yield stored
        ratio = GaugeMetricFamily("blockferry_compression_ratio",
                                  "Payload bytes per sealed byte over everything sealed so far (lz4; >1 = saving).")
        ratio.add_metric([], stats.sealed_payload_bytes / stats.sealed_bytes if stats.sealed_bytes else 0.0)
        yield ratio
        gauges = [
            ("blockferry_inflight_bytes", "Payload bytes held in memory: not yet logged, or being sealed.",
             p.inflight_bytes),
            ("blockferry_inflight_limit_bytes", "pipeline.max_inflight_bytes: ingest pauses at this.",
             int(p.config.pipeline.max_inflight_bytes)),
            ("blockferry_ingest_paused", "1 while ingest is paused (backpressure), else 0.", int(p.paused)),
            ("blockferry_sealing_batches", "Batches cut and waiting to be sealed and spooled.",
             sum(len(s.sealing) for s in p.streams.values())),
            ("blockferry_upload_queue_length", "Sealed blobs queued for upload.", p._upload_queue.qsize()),
            ("blockferry_spool_used_bytes", "Bytes in the spool: write-ahead log and sealed blobs.", p.spool.used_bytes),
            ("blockferry_spool_capacity_bytes", "spool.max_bytes.", p.spool.max_bytes),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        yield from stats.log_commits.collect()
        log_bytes = CounterMetricFamily("blockferry_log_bytes", "Bytes appended to the write-ahead log.")
        log_bytes.add_metric([], stats.log_bytes)
        yield log_bytes
        pauses = CounterMetricFamily("blockferry_ingest_pauses", "Times ingest was paused by backpressure.")
        pauses.add_metric([], stats.pauses)
        yield pauses
        protocol = CounterMetricFamily("blockferry_protocol_errors", "Agent connections refused, by error code.",
                                       labels=["code"])
        for code, count in sorted(getattr(stats, "protocol_errors", {}).items(), key=lambda kv: str(kv[0])):
            protocol.add_metric([getattr(code, "name", str(code))], count)
        yield protocol

    @staticmethod
    def _applier(a: Applier | None) -> Iterator[Metric]:
        if a is None:
            return
        stats = a.stats
        for name, doc, value in [
            ("blockferry_apply_groups", "Apply groups committed (each is one recovery point).", stats.groups),
            ("blockferry_journal_bytes", "Undo-journal bytes written.", stats.journal_bytes),
            ("blockferry_pruned_entries", "Undo entries pruned by retention.", stats.pruned_entries),
        ]:
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c

    @staticmethod
    def _disks(healths: list[DiskHealth]) -> Iterator[Metric]:
        def family(kind: type[Metric], name: str, doc: str, attr: str) -> Metric | None:
            metric = kind(name, doc, labels=["disk"])
            present = False
            for h in healths:
                value = getattr(h, attr)
                if value is not None:
                    metric.add_metric([h.disk], float(value))
                    present = True
            return metric if present else None

        specs: list[tuple[type[Metric], str, str, str]] = [
            (CounterMetricFamily, "blockferry_disk_received_bytes", "Write payload bytes received.", "received_bytes"),
            (CounterMetricFamily, "blockferry_disk_sealed_bytes", "Sealed (compressed, encrypted) bytes spooled.",
             "sealed_bytes"),
            (CounterMetricFamily, "blockferry_disk_applied_bytes", "Write payload bytes applied to the seed disk.",
             "applied_bytes"),
            (GaugeMetricFamily, "blockferry_disk_ingest_lag_seconds",
             "Age (server clock) of the oldest accepted write not yet in the cache store.", "ingest_lag_s"),
            (GaugeMetricFamily, "blockferry_disk_recoverable_lag_seconds",
             "RPO: age (server clock) of the oldest accepted write not yet recoverable.", "recoverable_lag_s"),
            (GaugeMetricFamily, "blockferry_disk_rpo_threshold_seconds", "The disk policy's rpo_threshold_s.",
             "rpo_threshold_s"),
            (GaugeMetricFamily, "blockferry_disk_backlog_bytes", "Bytes accepted but not yet in the cache store.",
             "backlog_bytes"),
            (GaugeMetricFamily, "blockferry_disk_pending_blobs", "Log blobs in the cache store waiting to be applied.",
             "pending_blobs"),
            (GaugeMetricFamily, "blockferry_disk_churn_bytes_per_second",
             "Bytes received per second (apply-only process: applied), sliding window.", "churn_bps"),
            (GaugeMetricFamily, "blockferry_disk_durable_seq", "Highest sequence durable (acknowledged).",
             "durable_seq"),
            (GaugeMetricFamily, "blockferry_disk_applied_seq", "Highest sequence applied to the seed disk.",
             "applied_seq"),
            (GaugeMetricFamily, "blockferry_disk_recovery_points", "Recovery points retained.", "points"),
            (GaugeMetricFamily, "blockferry_disk_last_point_seq", "Sequence of the newest recovery point.",
             "last_point_seq"),
        ]
        for kind, name, doc, attr in specs:
            metric = family(kind, name, doc, attr)
            if metric is not None:
                yield metric
        if any(h.last_point_source_us is not None for h in healths):
            g = GaugeMetricFamily("blockferry_disk_last_point_source_timestamp_seconds",
                                  "Source clock of the newest recovery point (display only: not a lag).",
                                  labels=["disk"])
            for h in healths:
                if h.last_point_source_us is not None:
                    g.add_metric([h.disk], h.last_point_source_us / 1e6)
            yield g
        stage = GaugeMetricFamily("blockferry_disk_stage_behind",
                                  "1 for the stage holding the disk's oldest unrecoverable write.",
                                  labels=["disk", "stage"])
        stopped = GaugeMetricFamily("blockferry_disk_stopped",
                                    "1 if replication of the disk stopped: the applier found a bad log blob, or "
                                    "the server cannot read its write-ahead log back.", labels=["disk"])
        for h in healths:
            for s in STAGES:
                stage.add_metric([h.disk, s], float(h.stage == s))
            stopped.add_metric([h.disk], float(h.failure is not None))
        yield stage
        yield stopped


# ---------------------------------------------------------------- `blockferry status`


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def render_status_table(healths: Iterable[DiskHealth]) -> Table:
    table = Table(title="blockferry disks")
    for name, justify in [("Disk", "left"), ("Applied seq", "right"), ("Ingest lag", "right"), ("RPO", "right"),
                          ("Stage", "left"), ("Backlog", "right"), ("Churn", "right"), ("Last point", "left")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for h in healths:
        rpo = Text(_duration(h.recoverable_lag_s), style="bold red" if h.rpo_exceeded else "")
        stage = Text("stopped: " + h.failure, style="bold red") if h.failure else Text(h.stage or "-")
        backlog = [_bytes(h.backlog_bytes)] if h.backlog_bytes is not None else []
        if h.pending_blobs is not None:
            backlog.append(f"{h.pending_blobs} blob{'s' if h.pending_blobs != 1 else ''}")
        last = "-"
        if h.last_point_seq is not None:
            when = h.last_point_time or ""
            last = f"{h.last_point_seq} {h.last_point_kind} {when[:19].replace('T', ' ')}"
        table.add_row(h.disk, "-" if h.applied_seq is None else str(h.applied_seq), _duration(h.ingest_lag_s), rpo,
                      stage, " + ".join(backlog) or "-", _bytes(h.churn_bps) + "/s", last)
    return table
