"""The write-ahead log's commit, on its own: latency alone and beside a busy Python thread.

An acknowledgement waits for a commit (encrypt the chunk, write it, sync it), which runs in the log's
own thread while serve's event loop runs Python. Every call in the commit that releases the GIL must
win it back, and beside a thread that keeps running Python that costs up to a switch interval (5 ms)
each: the commit's latency is then its number of such calls times the switch interval, not its CPU
time. The busy thread here stands for the event loop under load; the figure to compare is the ratio
of the two latencies, measured in the same run.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.stats import percentile
from engine.wal import WriteAheadLog
from protocol.logblob import RECORD_HEADER
from protocol.wal import WalSealer


def _commit_latencies(directory: Path, pieces: list[bytes], commits: int, *, busy: bool) -> list[float]:
    wal = WriteAheadLog(directory, WalSealer(os.urandom(32)))
    stop = threading.Event()

    def keep_running_python() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=keep_running_python, daemon=True) if busy else None
    if spinner is not None:
        spinner.start()
        time.sleep(0.05)  # running before the first commit
    latencies = []
    try:
        for seq in range(1, commits + 1):
            started = time.perf_counter()
            wal.append(pieces, {"bench": seq})
            latencies.append(time.perf_counter() - started)
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
        wal.close()
    return latencies


def measure_commit(records: int, record_bytes: int, commits: int, directory: Path | None = None) -> dict:
    """p50/p99 commit latency (ms) of ``commits`` chunks of ``records`` records each, alone and beside a
    busy Python thread, in a fresh log under ``directory`` (a temporary one by default)."""
    body = os.urandom(record_bytes)
    pieces = [piece for _ in range(records) for piece in (bytes(RECORD_HEADER.size), body)]
    results: dict = {"records": records, "record_bytes": record_bytes, "commits": commits}
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        for label, busy in (("alone", False), ("beside_busy_thread", True)):
            latencies = _commit_latencies(Path(scratch) / label, pieces, commits, busy=busy)
            results[label] = {"p50_ms": percentile(latencies, 0.5) * 1e3, "p99_ms": percentile(latencies, 0.99) * 1e3}
    results["switch_interval_ms"] = sys.getswitchinterval() * 1e3
    results["switch_intervals_per_commit"] = results["beside_busy_thread"]["p50_ms"] / results["switch_interval_ms"]
    return results
