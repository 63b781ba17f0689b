"""The applier's capacity: how fast a backlog drains.

During normal running the applier only ever applies what arrives, so its rate
equals the ingest rate and says nothing about headroom. Here a backlog is built
on purpose: a closed-loop phase with ``applier.enabled = false`` (the one
setting this phase must change), until every acknowledged write is in the cache
store; then the server is restarted on the same data directory with the
default configuration (embedded applier on, no agents connected) and the probe
times the drain. applied MB/s = payload bytes applied / time from the first to
the last applied blob.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from bench.phases import Display, PhaseSpec, release_space, run_phase
from bench.serverproc import BenchServer, Probe

MB = 1e6


def run_drain(base: PhaseSpec, workdir: Path, console: Console | None = None, timeout: float = 300.0) -> dict:
    overrides = {k: dict(v) for k, v in base.overrides.items()}
    overrides.setdefault("applier", {})["enabled"] = False
    fill = replace(base, name="drain-fill", mode="closed", overrides=overrides, wait_for="stored", keep_server=True)
    filled = run_phase(fill, workdir, console)
    server: BenchServer = filled.pop("_server")
    server.stop()
    backlog_bytes = filled["acked_bytes_total"]
    agents = len(filled["acked_bytes_by_agent"])
    data_dir = server.data_dir
    disk_names = sorted(p.stem for p in (data_dir / "state" / "disks").glob("*.json"))
    blobs = sorted((data_dir / "cache").glob("*/*.bflog"))
    backlog_blob_bytes = sum(p.stat().st_size for p in blobs)
    targets = _final_seqs(blobs)

    again = BenchServer(data_dir, agents=0, overrides=base.overrides, log_path=workdir / "drain" / "server.log",
                        env=base.server_env)
    (workdir / "drain").mkdir(parents=True, exist_ok=True)
    result = {"name": "drain", "backlog_bytes": backlog_bytes, "backlog_blobs": len(blobs),
              "backlog_blob_bytes": backlog_blob_bytes, "disks": len(disk_names), "agents": agents,
              "fill": {k: filled[k] for k in ("acked_mbps", "stored_mbps", "compression_ratio", "duration_s",
                                                "server_peak_rss", "blobs_seen")},
              "server_config_toml": again.toml}
    spawn = time.monotonic()
    again.start()
    probe = Probe(again, disk_names, interval=0.05)
    probe.start()
    done_at = None
    try:
        with Display(console) as display:
            display.add("drain", float(backlog_bytes) or 1.0)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                s = probe.sample_now()
                if s is not None:
                    display.update(s.applied_bytes, f"applied {s.applied_bytes / MB:9.0f} of "
                                                    f"{backlog_bytes / MB:.0f} MB")
                    if all(s.applied_seq.get(d, 0) >= seq for d, seq in targets.items()):
                        done_at = s.t
                        break
                if not again.alive():
                    raise RuntimeError(f"the server died while draining:\n{again.log_tail()}")
                time.sleep(0.05)
    finally:
        probe.stop()
        again.stop()
    samples = [s for s in probe.samples if s.applied_bytes > 0]
    applied_total = probe.samples[-1].applied_bytes if probe.samples else 0
    if done_at is not None and len(samples) >= 2:
        first = samples[0]
        rate = (applied_total - first.applied_bytes) / max(done_at - first.t, 1e-6)
    else:
        rate = 0.0
    result.update({
        "drained": done_at is not None,
        "applied_bytes": applied_total,
        "applied_mbps": rate / MB,
        "applied_mbps_from_spawn": (applied_total / (done_at - spawn) / MB) if done_at else 0.0,
        "seconds": (done_at - spawn) if done_at else None,
        "server_peak_rss": probe.peak_hwm,
        "server_cpu_s": probe.samples[-1].cpu_s if probe.samples else 0.0,
        "series": {"t": [round(s.t - spawn, 3) for s in probe.samples],
                   "applied_mb": [s.applied_bytes / MB for s in probe.samples]},
    })
    if not base.keep_data:
        release_space(data_dir)
    return result


def _final_seqs(blobs: list[Path]) -> dict[str, int]:
    from protocol.logblob import parse_blob_name

    out: dict[str, int] = {}
    for path in blobs:
        parsed = parse_blob_name(f"{path.parent.name}/{path.name}")
        if parsed:
            disk, _first, last = parsed
            out[disk] = max(out.get(disk, 0), last)
    return out
