"""RPO, health and metrics against real parts: an in-process process server over TLS, real agents (or a raw
protocol client), the real applier, a real HTTP scrape and a real webhook receiver."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from support import agent_for, make_config, wait_for

from engine.auth import DEFAULT_AGENT, read_token
from engine.config import Config
from engine.http import monitoring_routes, start_http
from engine.monitor import DiskHealth, Monitor, render_status_table
from engine.server import ProcessServer, build_applier, load_keyring
from engine.tls import client_context
from protocol import (
    PROTOCOL_VERSION,
    Ack,
    ClientConnection,
    DiskOpened,
    Error,
    Frame,
    Hello,
    OpenDisk,
    Tag,
    TagKind,
    Welcome,
    Write,
)
from protocol.logblob import BlobHeader, blob_name

pytestmark = pytest.mark.timeout(60)

KiB = 1024
MiB = 1024 * KiB
T = 10.0  # upper bound of any single wait
TICK = 0.05  # the monitor's alert interval in these tests
HOUR_US = 3600 * 1_000_000


def alert_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "blockferry.alerts"]


@asynccontextmanager
async def running(monitor: Monitor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(monitor.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def http(monitor: Monitor) -> AsyncIterator[str]:
    runner, port = await start_http(monitoring_routes(monitor), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class WebhookReceiver:
    """A real HTTP endpoint collecting POSTed JSON; ``hold`` makes it hang until released."""

    def __init__(self, hold: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.hold = hold
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        if self.hold:
            await self.release.wait()
        return web.json_response({"ok": True})

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[WebhookReceiver]:
        runner, port = await start_http([web.post("/hook", self.handle)], "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}/hook"
        try:
            yield self
        finally:
            self.release.set()
            await runner.cleanup()


async def scrape(base: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=T)) as session,
                session.get(base + "/metrics") as resp):
        assert resp.status == 200
        content_type, text = resp.headers["Content-Type"], await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return content_type, samples


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=T)) as session, session.get(url) as resp:
        return resp.status, await resp.json()


def health_of(monitor: Monitor, disk: str) -> DiskHealth:
    return next(h for h in monitor.snapshot() if h.disk == disk)


# ---------------------------------------------------------------- (a) the RPO alert fires once and clears once


async def test_rpo_alert_fires_once_when_apply_falls_behind_and_clears_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blockferry.alerts")
    data = tmp_path / "data"
    async with WebhookReceiver().serving() as hook:
        # The applier folds at most one group per 2.5 s, so a write arriving just after a group waits ~2.5 s.
        cfg = make_config(data, policy={"rpo_threshold_s": 0.3, "crash_point_interval_ms": 2500},
                          batch={"min_bytes": 0},  # stored at once: what is behind is the applier
                          alerts={"webhook_url": hook.url, "webhook_timeout_s": 2})
        async with ProcessServer(cfg, control_plane=False) as ps:
            assert ps.applier is not None and ps.connect_info is not None
            async with agent_for(data, ps.connect_info.port) as agent:
                disk = await asyncio.wait_for(agent.open_disk("slow", 1 * MiB), T)
                await asyncio.wait_for(await disk.write(0, b"a" * 4096), T)
                await wait_for(lambda: ps.applier.applied_seq("slow") == 1, "the first group")  # starts the interval
                monitor = Monitor(cfg, ps.pipeline, ps.applier, interval_s=TICK)
                async with running(monitor):
                    await asyncio.sleep(5 * TICK)
                    assert alert_events(caplog) == [], "nothing is behind yet"
                    await asyncio.wait_for(await disk.write(4096, b"b" * 4096), T)  # acknowledged, then held back
                    await wait_for(lambda: alert_events(caplog), "rpo_exceeded")
                    assert ps.applier.applied_seq("slow") == 1, "the alert must fire while the write is unapplied"
                    await wait_for(lambda: len(alert_events(caplog)) >= 2, "rpo_recovered")
                    assert ps.applier.applied_seq("slow") == 2
                    await asyncio.sleep(10 * TICK)  # no flapping afterwards
                    await wait_for(lambda: len(hook.bodies) >= 2, "both webhook posts")
                    events = alert_events(caplog)
                    assert [e["event"] for e in events] == ["rpo_exceeded", "rpo_recovered"], events
                    exceeded, recovered = events
                    assert exceeded["disk"] == recovered["disk"] == "slow"
                    assert exceeded["stage"] == "apply", exceeded  # stored, acknowledged, not yet applied
                    assert exceeded["threshold_s"] == 0.3 and 0.3 <= exceeded["rpo_s"] < 2.0, exceeded  # rounded to ms
                    assert recovered["rpo_s"] <= 0.3 * monitor.clear_ratio, recovered
                    assert hook.bodies == events, "the webhook gets exactly the logged events, in order"
                    assert monitor.healthy() == (True, [])


async def test_failing_webhook_neither_blocks_nor_stops_the_alert_loop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    async with WebhookReceiver(hold=True).serving() as hook:  # accepts the POST and never answers
        cfg = make_config(data, policy={"rpo_threshold_s": 0.3}, batch={"linger_ms": 1},
                          alerts={"webhook_url": hook.url, "webhook_timeout_s": 2.0})
        async with ProcessServer(cfg, run_applier=False, control_plane=False) as ps:
            assert ps.pipeline is not None and ps.store is not None and ps.connect_info is not None
            async with agent_for(data, ps.connect_info.port) as agent:
                disk = await asyncio.wait_for(agent.open_disk("hooked", 1 * MiB), T)
                await asyncio.wait_for(await disk.write(0, b"x" * 8192), T)
            await asyncio.wait_for(ps.pipeline.drain(), T)
            applier = build_applier(cfg, ps.store, load_keyring(cfg, create=False))
            try:
                await applier.pending()  # the applier has seen the blob; it applies nothing yet
                monitor = Monitor(cfg, ps.pipeline, applier, interval_s=TICK)
                async with running(monitor):
                    await wait_for(lambda: alert_events(caplog), "rpo_exceeded")
                    await wait_for(lambda: hook.bodies, "the webhook POST to arrive (and hang)")
                    assert await asyncio.wait_for(applier.apply_available(force=True), T) == 1
                    # well before the hanging POST times out (2 s), the loop has noticed the recovery
                    await wait_for(lambda: len(alert_events(caplog)) == 2, "rpo_recovered despite the webhook", 1)
                    assert [e["event"] for e in alert_events(caplog)] == ["rpo_exceeded", "rpo_recovered"]
                    assert monitor.webhook_failures == 0
                    await wait_for(lambda: monitor.webhook_failures == 1, "the webhook timeout to be logged", 5)
                    assert any("webhook" in r.getMessage() and "TimeoutError" in r.getMessage()
                               for r in caplog.records if r.name == "engine.monitor")
                    assert any(t.get_name() == "alerts-webhook" for t in asyncio.all_tasks()), "the sender survived"
            finally:
                await applier.close()


# ---------------------------------------------------------------- (b) /metrics over HTTP


async def test_metrics_endpoint_reports_bytes_lags_and_queues(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = make_config(data, batch={"linger_ms": 60_000})  # only tags (and drain) cut batches
    async with ProcessServer(cfg, control_plane=False) as ps:
        assert ps.pipeline is not None and ps.applier is not None and ps.connect_info is not None
        async with agent_for(data, ps.connect_info.port) as agent:
            m1 = await asyncio.wait_for(agent.open_disk("m1", 2 * MiB), T)
            m2 = await asyncio.wait_for(agent.open_disk("m2", 1 * MiB), T)
            for i in range(5):
                await m1.write(i * 64 * KiB, bytes([65 + i]) * 64 * KiB)  # compressible
            await m1.tag(TagKind.APP, "app-1")
            for i in range(3):
                await m2.write(i * 16 * KiB, bytes([97 + i]) * 16 * KiB)
            await m2.tag(TagKind.CRASH, "c-1")
            await asyncio.wait_for(agent.flush(), T)
            await asyncio.wait_for(ps.drain(), T)
            monitor = Monitor(cfg, ps.pipeline, ps.applier)
            monitor.observe()  # first churn sample
            sampled = time.monotonic()
            for i in range(2):  # received and logged (acknowledged), sitting in m2's open batch (not stored)
                await m2.write(512 * KiB + i * 8 * KiB, bytes([120 + i]) * 8 * KiB)
            await wait_for(lambda: ps.pipeline.streams["m2"].received_bytes == 48 * KiB + 16 * KiB, "m2 writes")
            await asyncio.sleep(0.4)
            async with http(monitor) as base:
                _, unsampled = await scrape(base)  # a scrape reads, it does not sample: no churn seen yet
                monitor.observe()  # the second sample (what Monitor.run does every interval)
                content_type, s = await scrape(base)
                elapsed = time.monotonic() - sampled
                status, body = await get_json(base + "/healthz")
                log_bytes = ps.pipeline.wal.size_bytes

    def disk(name: str, d: str, **labels: str) -> float:
        return s[(name, tuple(sorted({"disk": d, **labels}.items())))]

    def plain(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted(labels.items())))]

    assert content_type.startswith("text/plain") and "version=0.0.4" in content_type, content_type
    assert (status, body) == (200, {"status": "ok"})
    # bytes per disk: exactly what the agent wrote
    assert disk("blockferry_disk_received_bytes_total", "m1") == 5 * 64 * KiB
    assert disk("blockferry_disk_received_bytes_total", "m2") == 48 * KiB + 16 * KiB
    assert disk("blockferry_disk_applied_bytes_total", "m1") == 5 * 64 * KiB
    assert disk("blockferry_disk_applied_bytes_total", "m2") == 48 * KiB
    assert disk("blockferry_disk_applied_seq", "m1") == 6 and disk("blockferry_disk_applied_seq", "m2") == 4
    assert disk("blockferry_disk_durable_seq", "m2") == 6, "acknowledged once logged, before it is sealed"
    sealed = disk("blockferry_disk_sealed_bytes_total", "m1") + disk("blockferry_disk_sealed_bytes_total", "m2")
    assert 0 < sealed == plain("blockferry_stored_bytes_total"), "everything sealed was stored"
    assert plain("blockferry_compression_ratio") > 10, "constant-filled writes compress well"
    # m1 is fully recoverable; m2 has 16 KiB waiting in an open batch since ≥ 0.4 s
    assert disk("blockferry_disk_ingest_lag_seconds", "m1") == 0
    assert disk("blockferry_disk_recoverable_lag_seconds", "m1") == 0
    ingest = disk("blockferry_disk_ingest_lag_seconds", "m2")
    assert 0.4 <= ingest < 5 and disk("blockferry_disk_recoverable_lag_seconds", "m2") >= ingest
    assert disk("blockferry_disk_stage_behind", "m2", stage="ingest") == 1
    assert disk("blockferry_disk_stage_behind", "m1", stage="ingest") == 0
    assert disk("blockferry_disk_backlog_bytes", "m2") == 16 * KiB and disk("blockferry_disk_backlog_bytes", "m1") == 0
    assert disk("blockferry_disk_pending_blobs", "m1") == 0
    # churn: m2 received 16 KiB between the two samples, m1 nothing
    assert unsampled[("blockferry_disk_churn_bytes_per_second", (("disk", "m2"),))] == 0
    churn = disk("blockferry_disk_churn_bytes_per_second", "m2")
    assert 16 * KiB / elapsed <= churn <= 16 * KiB / 0.4, churn
    assert disk("blockferry_disk_churn_bytes_per_second", "m1") == 0
    # recovery points: m1's newest is its app-consistent tag
    assert disk("blockferry_disk_last_point_seq", "m1") == 6
    assert disk("blockferry_disk_recovery_points", "m1") >= 1
    # queues
    assert plain("blockferry_inflight_bytes") == 16 * KiB, "m2's open batch (memory is plentiful: not read back)"
    assert plain("blockferry_inflight_limit_bytes") == int(cfg.pipeline.max_inflight_bytes)
    assert plain("blockferry_ingest_paused") == 0
    assert plain("blockferry_upload_queue_length") == 0 and plain("blockferry_sealing_batches") == 0
    # the spool holds the write-ahead log's open segment and no sealed blob (all stored)
    assert plain("blockferry_spool_used_bytes") == log_bytes > 48 * KiB + 16 * KiB
    assert plain("blockferry_spool_capacity_bytes") == int(cfg.spool.max_bytes)
    assert plain("blockferry_errors_total", kind="upload") == 0
    # every ack waited for a log commit: they are counted, timed and bucketed
    commits = plain("blockferry_log_commit_seconds_count")
    assert 1 <= commits <= 5 + 3 + 2 + 2 and plain("blockferry_log_commit_seconds_sum") > 0
    assert plain("blockferry_log_commit_seconds_bucket", le="+Inf") == commits
    assert plain("blockferry_log_commit_seconds_bucket", le="0.001") <= plain(
        "blockferry_log_commit_seconds_bucket", le="1.0") <= commits
    assert plain("blockferry_log_bytes_total") == log_bytes, "nothing of the log released yet: all still there"
    assert plain("blockferry_errors_total", kind="failed_blob") == 0
    # the status table renders every disk
    healths = monitor.snapshot()
    assert [h.disk for h in healths] == ["m1", "m2"]
    assert healths[0].last_point_kind == "app" and DiskHealth.from_dict(healths[0].as_dict()) == healths[0]
    assert render_status_table(healths).row_count == 2


# ---------------------------------------------------------------- (c) /healthz after a tampered blob


async def test_healthz_turns_503_naming_the_disk_stopped_on_a_tampered_blob(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = make_config(data, batch={"linger_ms": 60_000})
    async with ProcessServer(cfg, run_applier=False, control_plane=False) as ps:
        assert ps.pipeline is not None and ps.store is not None and ps.connect_info is not None
        async with agent_for(data, ps.connect_info.port) as agent:
            disk = await asyncio.wait_for(agent.open_disk("tampered", 1 * MiB), T)
            for group in range(2):  # two blobs: write, write, tag
                await disk.write(group * 64 * KiB, bytes([group + 1]) * 16 * KiB)
                await disk.write(group * 64 * KiB + 32 * KiB, bytes([group + 7]) * 16 * KiB)
                await disk.tag(TagKind.APP, f"g{group}")  # an app tag ends its apply group: one blob each
            await asyncio.wait_for(agent.flush(), T)
        await asyncio.wait_for(ps.pipeline.drain(), T)
        second = blob_name("tampered", 4, 6)
        path = cfg.store_dir / second
        blob = bytearray(path.read_bytes())
        header = BlobHeader.unpack(blob)
        blob[header.size + header.payload_size // 2] ^= 0x01  # one bit of ciphertext
        path.write_bytes(blob)

        applier = build_applier(cfg, ps.store, load_keyring(cfg, create=False))
        monitor = Monitor(cfg, ps.pipeline, applier)
        try:
            async with http(monitor) as base:
                assert await get_json(base + "/healthz") == (200, {"status": "ok"})
                assert await asyncio.wait_for(applier.apply_available(), T) == 1  # the first blob only
                assert "tampered" in applier.failures
                status, body = await get_json(base + "/healthz")
                _, s = await scrape(base)
        finally:
            await applier.close()
    assert status == 503 and body["status"] == "unhealthy", body
    assert len(body["reasons"]) == 1 and "'tampered'" in body["reasons"][0] and second in body["reasons"][0], body
    assert s[("blockferry_disk_stopped", (("disk", "tampered"),))] == 1
    assert s[("blockferry_errors_total", (("kind", "failed_blob"),))] == 1
    assert s[("blockferry_disk_applied_seq", (("disk", "tampered"),))] == 3
    assert s[("blockferry_disk_pending_blobs", (("disk", "tampered"),))] == 1
    assert s[("blockferry_disk_stage_behind", (("disk", "tampered"), ("stage", "apply")))] == 1


async def test_healthz_reports_uploads_failing_continuously_and_recovers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = make_config(data, batch={"linger_ms": 1}, upload={"retry_initial_ms": 20, "retry_max_ms": 50})
    async with ProcessServer(cfg, run_applier=False, control_plane=False) as ps:
        assert ps.pipeline is not None and ps.connect_info is not None
        blocker = cfg.store_dir / "upfail"
        blocker.write_bytes(b"")  # a file where the disk's directory of the cache store must go: uploads fail
        monitor = Monitor(cfg, ps.pipeline, None, upload_failing_s=0.3, interval_s=0.02)
        observing = asyncio.create_task(monitor.run())  # observes upload progress every 20 ms
        async with agent_for(data, ps.connect_info.port) as agent:
            disk = await asyncio.wait_for(agent.open_disk("upfail", 1 * MiB), T)
            await asyncio.wait_for(await disk.write(0, b"u" * 4096), T)  # durable in the spool: acknowledged
            started = time.monotonic()
            await wait_for(lambda: ps.pipeline.stats.upload_errors >= 2, "failing uploads")
            h = health_of(monitor, "upfail")
            assert h.stage == "upload" and h.backlog_bytes and h.ingest_lag_s, h
            checked_at = time.monotonic()
            healthy_now = monitor.healthy()
            if checked_at - started < 0.3:  # not yet failing "continuously" (on a slow machine we may be late)
                assert healthy_now == (True, []), healthy_now
            reasons = await wait_for(lambda: monitor.healthy()[1], "unhealthy after 0.3 s of failing uploads")
            assert time.monotonic() - started >= 0.3
            assert len(reasons) == 1 and "uploads" in reasons[0] and "failing" in reasons[0], reasons
            async with http(monitor) as base:
                status, body = await get_json(base + "/healthz")
                assert status == 503 and len(body["reasons"]) == 1 and "uploads" in body["reasons"][0], body
                _, s = await scrape(base)
                assert s[("blockferry_errors_total", (("kind", "upload"),))] >= 2
                assert s[("blockferry_disk_stage_behind", (("disk", "upfail"), ("stage", "upload")))] == 1
            blocker.unlink()  # the store is back
            await wait_for(lambda: monitor.healthy()[0], "healthy again once an upload succeeds")
            assert health_of(monitor, "upfail").ingest_lag_s == 0
        observing.cancel()
        await asyncio.gather(observing, return_exceptions=True)


# ---------------------------------------------------------------- (d) a source clock an hour behind


class RawAgent:
    """The wire protocol by hand (protocol.ClientConnection over TLS), so frames carry any source timestamp."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.frames: deque[Frame] = deque()

    @classmethod
    async def connect(cls, data_dir: Path, port: int) -> RawAgent:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(data_dir / "tls" / "server.crt"), server_hostname="localhost"), T)
        raw = cls(reader, writer)
        writer.write(raw.conn.send(Hello(PROTOCOL_VERSION, DEFAULT_AGENT, read_token(data_dir / "agent-1.token"))))
        await raw.expect(Welcome)
        return raw

    async def expect(self, kind: type) -> Any:
        while True:
            while not self.frames:
                chunk = await asyncio.wait_for(self.reader.read(64 * KiB), T)
                assert chunk, "the server closed the connection"
                self.frames.extend(self.conn.receive_data(chunk))
            frame = self.frames.popleft()
            assert not isinstance(frame, Error), frame
            if isinstance(frame, kind):
                return frame

    async def open_disk(self, handle: int, disk: str, size: int) -> DiskOpened:
        self.writer.write(self.conn.send(OpenDisk(handle, disk, size, 4096)))
        return await self.expect(DiskOpened)

    def write(self, write: Write) -> None:
        self.writer.write(self.conn.send_write_header(write) + bytes(write.data))

    def tag(self, tag: Tag) -> None:
        self.writer.write(self.conn.send(tag))

    async def wait_ack(self, handle: int, seq: int) -> None:
        while dict((await self.expect(Ack)).acks).get(handle, 0) < seq:
            pass

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), T)
        except (ConnectionError, OSError):
            pass


async def test_source_clock_an_hour_behind_neither_inflates_the_rpo_nor_stalls_points(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blockferry.alerts")
    data = tmp_path / "data"
    cfg: Config = make_config(data, policy={"crash_point_interval_ms": 0, "rpo_threshold_s": 60})
    async with ProcessServer(cfg, control_plane=False) as ps:
        assert ps.applier is not None and ps.connect_info is not None
        monitor = Monitor(cfg, ps.pipeline, ps.applier, interval_s=TICK)
        async with running(monitor):
            raw = await RawAgent.connect(data, ps.connect_info.port)
            try:
                assert (await raw.open_disk(1, "skewed", 1 * MiB)).resume_seq == 0
                seq = 0
                counts: list[int] = []
                for round_, skew_us in enumerate((0, HOUR_US, HOUR_US + 10_000_000)):  # then jumps back an hour
                    source_us = time.time_ns() // 1000 - skew_us
                    for i in range(3):
                        seq += 1
                        raw.write(Write.make(1, seq, (round_ * 3 + i) * 4096, bytes([seq]) * 4096, source_us + i))
                    seq += 1
                    raw.tag(Tag(1, seq, TagKind.CRASH, f"r{round_}", source_us + 3))
                    await raw.wait_ack(1, seq)
                    # the closures bind this round's seq and lags (wait_for polls them before the next round)
                    await wait_for(lambda seq=seq: ps.applier.applied_seq("skewed") == seq, f"round {round_} applied")
                    lags: list[float] = []

                    def settled(lags: list[float] = lags) -> DiskHealth | None:
                        h = health_of(monitor, "skewed")
                        lags.append(h.recoverable_lag_s)
                        return h if h.recoverable_lag_s == 0 and h.stage is None else None

                    h = await wait_for(settled, "the RPO to settle at 0 once everything is applied", 2)
                    assert max(lags) < 1.0, lags  # never anywhere near the hour the source clock is behind
                    assert h.ingest_lag_s == 0 and h.pending_blobs == 0, h
                    assert h.last_point_seq == seq, "a new recovery point despite the older source time"
                    assert abs(h.last_point_source_us - (source_us + 3)) < 1_000_000, "source time is shown as is"
                    counts.append(len(ps.applier.points("skewed")))
                assert counts[0] < counts[1] < counts[2], counts
                seqs = [p.seq for p in ps.applier.points("skewed")]
                assert seqs == sorted(seqs) and seqs[-1] == seq
                await asyncio.sleep(4 * TICK)
                assert alert_events(caplog) == [], "an hour-old source clock is not an hour of RPO"
                assert monitor.healthy() == (True, [])
            finally:
                await raw.close()
