"""Recovery points: what they are, how one is chosen, and which are retained.

A point is the state of a disk right after an apply group; the undo entry of
that group names it (protocol.journal.EntryName), so listing the journal lists
the points. Order is by sequence number only; source timestamps are shown and
used to pick "the point at time T", never to order points, so a source clock
that jumps back cannot stall or reorder them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from protocol.journal import EntryName

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class PointNotFound(LookupError):
    """The requested recovery point does not exist or is no longer retained."""


@dataclass(frozen=True)
class Point:
    disk: str
    seq: int
    kind: str  # "crash" or "app"
    source_us: int
    recorded_us: int
    tag_id: str = ""

    @property
    def id(self) -> str:
        return str(self.seq)

    @property
    def source_time(self) -> datetime.datetime:
        return _EPOCH + datetime.timedelta(microseconds=self.source_us)  # exact: no float rounding

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "disk": self.disk, "seq": self.seq, "kind": self.kind,
                "source_time": self.source_time.isoformat(), "source_us": self.source_us,
                "recorded_us": self.recorded_us, "tag_id": self.tag_id}


def points_of(disk: str, entries: list[EntryName]) -> list[Point]:
    return [Point(disk, e.seq_to, "app" if e.app else "crash", e.source_us, e.recorded_us, e.tag_id)
            for e in sorted(entries, key=lambda e: e.seq_to)]


def select_point(points: list[Point], spec: str, *, latest_seq: int) -> int:
    """The sequence a failover spec names: latest | latest-processed | latest-app | ID | ISO-TIME.

    ``latest`` and ``latest-processed`` both mean the applied state here; the
    difference (apply the backlog first or not) is the caller's.
    """
    if spec in ("latest", "latest-processed"):
        return latest_seq
    if spec == "latest-app":
        app = [p for p in points if p.kind == "app"]
        if not app:
            raise PointNotFound("no application-consistent point is retained")
        return app[-1].seq
    if spec.isdigit():
        seq = int(spec)
        if seq == latest_seq or any(p.seq == seq for p in points):
            return seq
        raise PointNotFound(f"no retained point with id {spec}")
    try:
        moment = datetime.datetime.fromisoformat(spec)
    except ValueError:
        raise PointNotFound(f"{spec!r} is not latest, latest-processed, latest-app, a point id or an ISO time") \
            from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    limit = (moment - _EPOCH) // datetime.timedelta(microseconds=1)
    candidates = [p for p in points if p.source_us <= limit]
    if not candidates:
        raise PointNotFound(f"no retained point at or before {moment.isoformat()}")
    return max(candidates, key=lambda p: p.seq).seq


def prune_horizon(entries: list[EntryName], *, now_us: int, retention_us: int, pinned: list[int],
                  applied_seq: int) -> int:
    """Entries ending before the returned sequence are no longer needed.

    The oldest retained point is the oldest entry recorded within the retention
    window (or the current state if none is); entries ending at or after it are
    kept, as is everything a running failover has pinned.
    """
    recent = [e.seq_to for e in entries if e.recorded_us >= now_us - retention_us]
    horizon = min(recent) if recent else applied_seq
    return min([horizon, *pinned])
