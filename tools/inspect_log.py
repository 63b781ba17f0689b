"""Print a log blob's header and records (never the payloads) — for operators debugging a backlog."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from engine.keys import KeyRing
from protocol.logblob import BlobHeader, TagRecord, WriteRecord, iter_records, open_blob


@dataclass(frozen=True)
class BlobReport:
    header: BlobHeader
    lines: list[str]


def _time(us: int) -> str:
    return datetime.datetime.fromtimestamp(us / 1e6, datetime.UTC).isoformat(timespec="microseconds")


def describe_blob(data: bytes, keys: KeyRing | None, *, name: str | None = None,
                  max_records: int | None = None) -> BlobReport:
    """Header always (it is plain text); records only with the key, after authentication."""
    header = BlobHeader.unpack(data, name=name)
    lines = [
        f"disk            {header.disk}",
        f"sequences       {header.first_seq}..{header.last_seq} ({header.record_count} records)",
        f"disk size       {header.disk_size}",
        f"codec / cipher  {header.codec.name} / AES-256-GCM, key id {header.key_id.hex()}",
        (f"sizes           {header.raw_size} raw, {header.payload_size} stored "
         f"({header.raw_size / max(header.payload_size, 1):.2f}x)"),
        f"created         {_time(header.created_us)}",
        f"last source     {_time(header.last_source_us)}",
    ]
    if keys is None:
        lines.append("records         (no key given: pass --key-file or --config to list them)")
        return BlobReport(header, lines)
    header, plain = open_blob(data, keys.lookup, name=name)
    lines.append("records (authenticated):")
    for i, record in enumerate(iter_records(plain, header, name=name)):
        if max_records is not None and i >= max_records:
            lines.append(f"  … {header.record_count - i} more")
            break
        if isinstance(record, WriteRecord):
            lines.append(f"  seq {record.seq:>10}  write  offset {record.offset:>14}  length {len(record.data):>8}"
                         f"  at {_time(record.timestamp_us)}")
        elif isinstance(record, TagRecord):
            lines.append(f"  seq {record.seq:>10}  tag    {record.kind.name.lower():<5} {record.tag_id!r}"
                         f"  at {_time(record.timestamp_us)}")
    return BlobReport(header, lines)
