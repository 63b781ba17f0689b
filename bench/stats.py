"""Small statistics: a mergeable latency histogram, percentiles, sequence logs and lag.

Nothing here needs numpy: the generator processes must stay cheap and the core
bench must run without the optional plotting extra.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_GROWTH = 1.01  # ~1 % relative precision
_INV_LOG = 1.0 / math.log(_GROWTH)


class LogHistogram:
    """Latencies in log-spaced buckets (~1 % wide), like HdrHistogram: O(1) record, mergeable.

    Values are seconds; buckets are kept in microseconds. A percentile is the
    upper edge of the bucket holding it (clamped to the exact max), so reported
    percentiles are never optimistic by more than the bucket width.
    """

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    @staticmethod
    def _index(seconds: float) -> int:
        us = seconds * 1e6
        return 0 if us <= 1.0 else int(math.log(us) * _INV_LOG) + 1

    @staticmethod
    def _upper(index: int) -> float:
        return (_GROWTH ** index) / 1e6

    def record(self, seconds: float) -> None:
        if seconds < 0:
            seconds = 0.0
        i = self._index(seconds)
        counts = self.counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)
        self.min = min(self.min, seconds)

    def merge(self, other: LogHistogram) -> None:
        for i, n in other.counts.items():
            self.counts[i] = self.counts.get(i, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    def percentile(self, q: float) -> float:
        """Value at quantile ``q`` (0..1) in seconds; 0 for an empty histogram."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return min(self._upper(i), self.max)
        return self.max

    def cdf(self) -> list[tuple[float, float]]:
        """(seconds, fraction ≤ it) at every non-empty bucket, for plots."""
        out, seen = [], 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            out.append((min(self._upper(i), self.max), seen / self.count))
        return out

    def summary_ms(self) -> dict[str, float | int]:
        return {
            "count": self.count,
            "p50_ms": self.percentile(0.50) * 1e3,
            "p90_ms": self.percentile(0.90) * 1e3,
            "p99_ms": self.percentile(0.99) * 1e3,
            "p999_ms": self.percentile(0.999) * 1e3,
            "max_ms": self.max * 1e3,
            "mean_ms": (self.total / self.count * 1e3) if self.count else 0.0,
        }

    def to_dict(self) -> dict:
        return {"growth": _GROWTH, "unit": "us-log-bucket", "counts": sorted(self.counts.items()),
                "count": self.count, "total": self.total, "min": self.min if self.count else 0.0, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict) -> LogHistogram:
        h = cls()
        h.counts = {int(i): int(n) for i, n in data["counts"]}
        h.count, h.total, h.max = int(data["count"]), float(data["total"]), float(data["max"])
        h.min = float(data["min"]) if h.count else math.inf
        return h


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of raw values (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


@dataclass
class SeqLog:
    """What one disk's generator issued, by sequence number.

    ``times[i]`` is when sequence ``first_seq + i`` was *meant* to be sent (open
    loop: its scheduled time; closed loop: when the write was called), and
    ``cum_bytes[i]`` the payload bytes issued up to and including it (tags add 0).
    """

    disk: str
    first_seq: int
    times: array = field(default_factory=lambda: array("d"))
    cum_bytes: array = field(default_factory=lambda: array("q"))

    def add(self, t: float, size: int) -> None:
        self.times.append(t)
        self.cum_bytes.append((self.cum_bytes[-1] if self.cum_bytes else 0) + size)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.times) - 1

    def bytes_through(self, seq: int) -> int:
        """Payload bytes issued up to and including ``seq``."""
        i = seq - self.first_seq
        if i < 0 or not self.cum_bytes:
            return 0
        return self.cum_bytes[min(i, len(self.cum_bytes) - 1)]

    def lag(self, t: float, done_seq: int) -> float:
        """Age at ``t`` of the oldest write not yet done (0 if all issued writes are done)."""
        i = done_seq + 1 - self.first_seq
        i = max(i, 0)
        if i >= len(self.times):
            return 0.0
        intended = self.times[i]
        return t - intended if intended <= t else 0.0


def rate_between(points: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Average rate of a cumulative counter between t0 and t1, from (t, value) samples (interpolated)."""
    if t1 <= t0 or len(points) < 2:
        return 0.0
    return (interpolate(points, t1) - interpolate(points, t0)) / (t1 - t0)


def interpolate(points: Sequence[tuple[float, float]], t: float) -> float:
    if not points:
        return 0.0
    times = [p[0] for p in points]
    i = bisect_right(times, t)
    if i == 0:
        return points[0][1]
    if i >= len(points):
        return points[-1][1]
    (ta, va), (tb, vb) = points[i - 1], points[i]
    return va + (vb - va) * (t - ta) / (tb - ta) if tb > ta else vb


def summarize(values: Iterable[float]) -> dict[str, float]:
    vals = list(values)
    return {"p50": percentile(vals, 0.5), "p99": percentile(vals, 0.99), "max": max(vals) if vals else 0.0,
            "samples": len(vals)}
