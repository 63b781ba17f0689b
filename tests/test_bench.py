"""Smoke test of the benchmark instrument: the real generator against a real server subprocess.

About two seconds of closed-loop load with tiny settings, then the figures must
be sane, non-zero and consistent with each other. No mocks: a `blockferry
serve` process, agents over TLS in a spawned generator process, the probe,
the ceiling and the report writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.ceiling import measure_ceiling
from bench.compare import compare
from bench.floor import measure_floor
from bench.loadgen import disk_seeds, plan_agents
from bench.phases import PhaseSpec, release_space, run_phase
from bench.profiles import parse_profile, sample_batches
from bench.report import markdown
from bench.serverproc import AgentCreds
from bench.stats import LogHistogram, SeqLog
from bench.suite import ratios, targets

MiB = 1024 * 1024


def test_bench_smoke(tmp_path: Path) -> None:
    profile = parse_profile("random64k:0.7,db8k:0.3,tags", pool_bytes=4 * MiB, tag_interval_s=0.5)
    spec = PhaseSpec(name="smoke", mode="closed", agents=2, disks_per_agent=2, profile=profile, duration=2.0,
                     warmup=0.5, disk_size=64 * MiB, window=4 * MiB, catch_up_timeout=30.0, flush_timeout=30.0)
    r = run_phase(spec, tmp_path)
    r.pop("_server")

    # the generator's side: every acknowledged byte is accounted to one agent, and was sent
    assert r["acked_bytes_total"] > 0
    assert r["acked_bytes_total"] == sum(r["acked_bytes_by_agent"].values())
    assert len(r["acked_bytes_by_agent"]) == 2
    assert r["acked_bytes_total"] == r["sent_bytes_total"]  # flushed: everything sent was acknowledged
    assert 0 < r["acked_bytes_window"] <= r["acked_bytes_total"]
    assert r["writes"] > 0 and r["tags"] > 0
    assert r["generator"]["flushed"] and r["generator"]["failed_acks"] == 0 and not r["generator"]["errors"]
    assert r["acked_mbps"] > 0
    first, second = r["acked_mbps_halves"]  # the window's two halves average to the whole window's rate
    assert first > 0 and second > 0 and abs((first + second) / 2 - r["acked_mbps"]) < 0.1 * r["acked_mbps"]

    # latency percentiles are ordered and plausible
    lat = r["latency"]
    assert lat["count"] > 0
    assert 0 < lat["p50_ms"] <= lat["p99_ms"] <= lat["p999_ms"] <= lat["max_ms"] + 1e-9
    assert lat["max_ms"] < 30_000

    # the server's side, seen from outside: it stored and applied what was acknowledged
    assert r["caught_up"], "the applier did not catch up with the acknowledged writes"
    assert r["server_peak_rss"] > 10 * MiB
    assert r["server_cpu_s_total"] > 0 and r["server_cpu_s_per_gb"] > 0
    assert r["blobs_seen"] > 0
    assert r["compression_ratio"] > 1.0  # 35/50/15 content compresses
    assert r["lag_s"]["samples"] > 0 and 0 <= r["lag_s"]["p50"] <= r["lag_s"]["p99"] <= r["lag_s"]["max"]
    series = r["series"]
    assert len(series["t"]) == len(series["acked_mbps"]) == len(series["applied_mbps"]) > 0
    assert max(series["acked_mbps"]) > 0
    threads = r["server_threads"]  # who ran and who waited for a CPU, by the names serve gives its threads
    assert {"serve:loop", "serve:wal-commit", "serve:seal", "applier:loop", "applier:apply"} <= threads.keys()
    assert threads["serve:loop"]["cores"] > 0 and all(row["waiting"] >= 0 for row in threads.values())

    # the ceiling over the same bytes, same thread count as the engine's default
    plans = plan_agents([AgentCreds("x0", ""), AgentCreds("x1", "")], 2)
    batches = sample_batches(profile, disk_seeds(plans), 8 * MiB, 1 * MiB, 64 * MiB)
    assert sum(len(b) for b in batches) >= 8 * MiB
    ceiling = measure_ceiling(batches, threads=2, min_seconds=0.2)
    assert ceiling["mbps"] > 0 and ceiling["compression_ratio"] > 1.0
    # and the floor: every step an acknowledged byte takes, each timed alone
    floor = measure_floor(batches, min_seconds=0.2, cores=2)
    assert all(cost > 0 for cost in floor["cpu_s_per_gb"].values())
    assert floor["bound_acked_mbps"] == pytest.approx(2 / floor["cpu_s_per_gb_acked"] * 1000)
    # the steps the mission requires are a part of this design's; the applier's work comes on top
    assert floor["bound_applied_mbps"] < floor["bound_acked_mbps"] < floor["bound_required_mbps"]
    assert floor["tls"].startswith("TLSv1.3")  # the engine's own contexts negotiated it

    # ratios, targets and the reports are computed from these figures without error
    result = {"phases": {"max": r}, "ceiling": ceiling, "floor": floor, "borg": {"available": False, "mbps": None}}
    result["ratios"] = ratios(result)
    result["targets"] = targets(result)
    assert result["ratios"]["engine_over_ceiling"] == r["acked_mbps"] / ceiling["mbps"]
    assert result["ratios"]["engine_over_floor_bound"] == r["acked_mbps"] / floor["bound_acked_mbps"]
    assert result["ratios"]["floor_bound_over_ceiling"] == floor["bound_acked_mbps"] / ceiling["mbps"]
    assert result["ratios"]["engine_over_borg"] is None  # no borg, no number
    step = {"agents": 2, "acked_mbps": 10.0, "stored_mbps": 4.0, "carried": 1.0, "latency": r["latency"],
            "server_peak_rss": r["server_peak_rss"], "server_cpu_s_per_gb": 1.0, "window_per_agent": MiB,
            "connect_s": 0.1, "blob_mean_bytes": 1024, "acked_mbps_halves": [12.0, 8.0],
            "server_threads": r["server_threads"]}
    result["scaling"] = {"offered_mbps": 10.0, "steps": [step]}
    text = markdown(json.loads(json.dumps(result, default=str)))
    assert "| max | closed |" in text and "borg**: no figure" in text
    assert f"this design sustains at most **{floor['bound_acked_mbps']:.0f} MB/s** acknowledged on 2 cores" in text
    assert "threads (cores on a CPU / waiting for one): serve:" in text
    step_lines = [line for line in text.splitlines() if line.startswith("- 2 agents: threads (cores on a CPU")]
    assert len(step_lines) == 1 and "serve:loop " in step_lines[0], "each step says who waited for a CPU"
    assert "| 2 | 10.0 | 12 / 8 | 4.0 | 100% |" in text, "a step shows how its rate held and what it stored"
    rows = compare(result, result)
    assert rows and all(row["change"] in (0.0, None) for row in rows)
    faster = json.loads(json.dumps(result, default=str))
    faster["phases"]["max"]["acked_mbps"] = 2 * r["acked_mbps"]
    changed = [row for row in compare(result, faster) if row["change"]]
    assert [(row["metric"], row["change"], row["better"]) for row in changed if "acked" in row["metric"]] == [
        ("max: acked MB/s", 1.0, True)], changed


def test_the_report_names_the_throughput_targets_the_floor_puts_out_of_reach() -> None:
    """Only where the measured floor's bound is below what a target needs, saying whose bound it is."""
    profile = parse_profile("random64k", pool_bytes=4 * MiB)
    batches = sample_batches(profile, disk_seeds(plan_agents([AgentCreds("x0", "")], 1)), 4 * MiB, MiB, 64 * MiB)
    floor = measure_floor(batches, min_seconds=0.1, cores=2)
    ceiling = measure_ceiling(batches, threads=2, min_seconds=0.1)
    design, anyone = floor["bound_acked_mbps"], floor["bound_required_mbps"]

    def report(ceiling_mbps: float | None, borg_mbps: float | None = None) -> str:
        result = {"phases": {}, "floor": floor, "ceiling": {**ceiling, "mbps": ceiling_mbps} if ceiling_mbps else None,
                  "borg": {"mbps": borg_mbps, "version": "borg 1", "bytes": MiB, "seconds": 1.0, "cpu_s": 1.0}}
        result["ratios"] = ratios(result)
        result["targets"] = targets(result)
        return markdown(result)

    assert "Out of reach" not in report(design)  # 0.6 × the ceiling is within this design's bound
    assert "Out of reach" not in report(None)  # no ceiling, no claim
    between = (design + anyone) / 2
    assert (f"- acknowledged ingest ≥ 0.6 × the ceiling needs {between:.0f} MB/s sustained: more than this design "
            f"can do on this machine (the floor: at most {design:.0f} MB/s).") in report(between / 0.6)
    text = report(2.5 * anyone)
    assert (f"- acknowledged ingest ≥ 0.6 × the ceiling needs {1.5 * anyone:.0f} MB/s sustained: more than any "
            f"implementation on these libraries can do on this machine (the floor: at most {anyone:.0f} MB/s).") in text
    assert "× borg" not in text  # no borg figure, no claim about it
    assert (f"- acknowledged ingest ≥ 2 × borg needs {2 * design:.0f} MB/s sustained: more than any implementation on"
            in report(None, borg_mbps=design)) == (2 * design > anyone)


def test_a_byte_budget_ends_the_window_when_it_is_sent(tmp_path: Path) -> None:
    """With --bytes the duration is only a cap: the window must end with the load, not at the cap (it
    reported 0 MB/s, and a catch-up 594 s before the end)."""
    profile = parse_profile("random64k", pool_bytes=4 * MiB)
    spec = PhaseSpec(name="budget", mode="closed", agents=1, disks_per_agent=2, profile=profile, duration=600.0,
                     warmup=0.2, disk_size=64 * MiB, window=4 * MiB, budget_bytes=320 * MiB, flush_timeout=30.0)
    r = run_phase(spec, tmp_path)
    r.pop("_server")
    assert r["acked_bytes_total"] >= 320 * MiB and not r["generator"]["errors"]
    assert 0 < r["measure_window_s"] < 60 and r["duration_s"] < 60
    assert 0 < r["acked_bytes_window"] <= r["acked_bytes_total"] and r["acked_mbps"] > 0
    assert r["server_cpu_s_per_gb"] > 0 and r["caught_up"] and abs(r["caught_up_s"]) < 30  # not 594 s early


def test_a_byte_budget_sent_within_the_warm_up_is_refused_by_name(tmp_path: Path) -> None:
    profile = parse_profile("random64k", pool_bytes=4 * MiB)
    spec = PhaseSpec(name="tiny", mode="closed", agents=1, disks_per_agent=1, profile=profile, duration=600.0,
                     warmup=30.0, disk_size=64 * MiB, window=4 * MiB, budget_bytes=1 * MiB, flush_timeout=30.0)
    with pytest.raises(RuntimeError, match=r"tiny: nothing to measure, the byte budget was sent within the warm-up \(30 s\)"):
        run_phase(spec, tmp_path)


def test_histogram_and_seqlog() -> None:
    h = LogHistogram()
    for i in range(1, 10001):
        h.record(i / 1e5)  # 10 µs .. 100 ms
    assert h.count == 10000
    p50, p99, p999 = h.percentile(0.5), h.percentile(0.99), h.percentile(0.999)
    assert p50 <= p99 <= p999 <= h.max
    assert abs(p50 - 0.05) / 0.05 < 0.02 and abs(p99 - 0.099) / 0.099 < 0.02
    merged = LogHistogram.from_dict(json.loads(json.dumps(h.to_dict())))
    merged.merge(h)
    assert merged.count == 20000 and merged.percentile(0.5) == p50

    log = SeqLog("d", first_seq=1)
    for k in range(5):
        log.add(10.0 + k, 4096)
    assert log.bytes_through(0) == 0 and log.bytes_through(3) == 3 * 4096 and log.bytes_through(99) == 5 * 4096
    assert log.lag(12.5, done_seq=1) == 1.5  # the oldest write not done is seq 2, meant for t=11.0
    assert log.lag(12.5, done_seq=5) == 0.0


def test_a_finished_phase_gives_its_space_back_without_freeing_inodes(tmp_path: Path) -> None:
    """Deleting thousands of files would make the next phase's file creations scan past them."""
    data = tmp_path / "data"
    (data / "cache" / "d").mkdir(parents=True)
    files = [data / "d.img", data / "cache" / "d" / "blob"]
    for path in files:
        path.write_bytes(b"x" * 100_000)
    inodes = [path.stat().st_ino for path in files]
    release_space(data)
    assert [path.stat().st_size for path in files] == [0, 0]
    assert [path.stat().st_ino for path in files] == inodes


def test_the_commit_bench_reports_both_latencies(tmp_path: Path) -> None:
    from bench.commit import measure_commit

    result = measure_commit(1, 4096, 5, tmp_path)
    for label in ("alone", "beside_busy_thread"):
        assert 0 < result[label]["p50_ms"] <= result[label]["p99_ms"]
    assert result["switch_intervals_per_commit"] == result["beside_busy_thread"]["p50_ms"] / result["switch_interval_ms"]
    assert list(tmp_path.iterdir()) == [], "the log went with its temporary directory"


def test_the_group_commit_bench_runs_every_part_on_real_volumes(tmp_path: Path) -> None:
    from bench.groupcommit import PARTS, measure_group_commit

    result = measure_group_commit(3, 12, 2, tmp_path)  # each part raises if a volume refuses what it is given
    assert list(result["ms_per_group"]) == list(PARTS)
    assert all(ms >= 0 for ms in result["ms_per_group"].values())
    assert list(tmp_path.iterdir()) == [], "the volumes went with their temporary directory"
