"""Workload profiles: what each simulated disk writes, and when.

A profile is a comma-separated list of *kinds* (each with an optional byte
share) and *modifiers*:

==============  =============================================================
``random64k``   uniform random 64 KiB writes over the whole disk
``db8k``        database-like 8 KiB writes; offsets from a zipf-distributed hot set
``seq1m``       sequential 1 MiB writes (wrapping at the end of the disk)
``burst``       on/off shaping: writes only during ``duty`` of every ``period``
                seconds (open loop: the same average rate, ``1/duty`` × in a burst)
``tags``        an application-consistent tag on every disk every ``tag_interval`` s
==============  =============================================================

``random64k:0.5,seq1m:0.5,tags`` mixes the two kinds half and half *by bytes*.
Every generator is deterministic from its seed, so the ceiling and the borg
peer can replay exactly the bytes the agents send (:func:`sample_batches`).
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from engine.workload import ContentMix, ContentPool
from protocol.logblob import write_record_header

KiB = 1024
MiB = 1024 * 1024

KINDS: dict[str, int] = {"random64k": 64 * KiB, "db8k": 8 * KiB, "seq1m": 1 * MiB}
MODIFIERS = ("burst", "tags")


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    kinds: tuple[tuple[str, float], ...] = (("random64k", 1.0),)
    burst: bool = False
    burst_period_s: float = 2.0
    burst_duty: float = 0.25
    tags: bool = False
    tag_interval_s: float = 1.0
    zipf_s: float = 1.1
    hot_set_blocks: int = 16384  # 8 KiB blocks in the db8k hot set (128 MiB), capped at the disk
    mix: tuple[float, float, float] = (0.35, 0.50, 0.15)  # random, text-like, zeros
    pool_bytes: int = 64 * MiB
    pool_seed: int = 1

    @property
    def name(self) -> str:
        parts = [k if len(self.kinds) == 1 else f"{k}:{w:g}" for k, w in self.kinds]
        if self.burst:
            parts.append("burst")
        if self.tags:
            parts.append("tags")
        return ",".join(parts)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["name"] = self.name
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        data = {k: v for k, v in data.items() if k != "name"}
        data["kinds"] = tuple((str(k), float(w)) for k, w in data["kinds"])
        data["mix"] = tuple(data["mix"])
        return cls(**data)

    def make_pool(self) -> ContentPool:
        return ContentPool(self.pool_bytes, ContentMix(*self.mix), seed=self.pool_seed)


def parse_mix(text: str) -> tuple[float, float, float]:
    """``35/50/15`` (percent random / text-like / zeros) → fractions."""
    try:
        parts = [float(p) for p in text.replace(",", "/").split("/")]
    except ValueError:
        raise ProfileError(f"mix {text!r}: expected R/T/Z percentages, e.g. 35/50/15") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ProfileError(f"mix {text!r}: expected three non-negative percentages, e.g. 35/50/15")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


def parse_profile(text: str, **options: object) -> Profile:
    kinds: list[tuple[str, float]] = []
    burst = tags = False
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        if name in KINDS:
            try:
                share = float(weight) if weight else 1.0
            except ValueError:
                raise ProfileError(f"profile item {item!r}: the share after ':' must be a number") from None
            if share <= 0:
                raise ProfileError(f"profile item {item!r}: the share must be positive")
            kinds.append((name, share))
        elif name == "burst" and not weight:
            burst = True
        elif name == "tags" and not weight:
            tags = True
        else:
            raise ProfileError(f"unknown profile item {item!r}; kinds: {', '.join(KINDS)}; "
                               f"modifiers: {', '.join(MODIFIERS)}")
    if not kinds:
        kinds = [("random64k", 1.0)]
    total = sum(w for _, w in kinds)
    opts = {k: v for k, v in options.items() if v is not None}
    profile = Profile(kinds=tuple((k, w / total) for k, w in kinds), burst=burst, tags=tags, **opts)  # type: ignore[arg-type]
    if not 0 < profile.burst_duty <= 1:
        raise ProfileError("burst duty must be in (0, 1]")
    return profile


@dataclass
class DiskWorkload:
    """The endless, deterministic write stream of one disk under a profile."""

    profile: Profile
    pool: ContentPool
    disk_size: int
    seed: int
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._view = memoryview(self.pool.data)
        self._pool_sectors = len(self.pool.data) // 512
        # Pick a kind per write with probability ∝ share / size, so the *byte* shares match.
        kinds = [(k, w / KINDS[k]) for k, w in self.profile.kinds]
        total = sum(p for _, p in kinds)
        self._kinds = [k for k, _ in kinds]
        self._kind_cum = list(itertools.accumulate(p / total for _, p in kinds))
        self._seq_offset = self._rng.randrange(0, max(1, self.disk_size // MiB)) * MiB
        blocks = max(1, self.disk_size // (8 * KiB))
        hot = min(self.profile.hot_set_blocks, blocks)
        weights = [1.0 / (rank + 1) ** self.profile.zipf_s for rank in range(hot)]
        self._zipf_cum = list(itertools.accumulate(weights))
        # Scatter the hot ranks over the disk (an affine map is a permutation mod `blocks`).
        self._hot_a = self._rng.randrange(1, blocks) | 1 if blocks > 2 else 1
        while blocks > 1 and _gcd(self._hot_a, blocks) != 1:
            self._hot_a += 2
        self._hot_b = self._rng.randrange(0, blocks)
        self._blocks = blocks

    def _data(self, size: int) -> memoryview:
        sectors = size // 512
        start = self._rng.randrange(0, self._pool_sectors - sectors + 1) * 512
        return self._view[start:start + size]

    def next(self) -> tuple[int, memoryview]:
        rng = self._rng
        kind = self._kinds[0] if len(self._kinds) == 1 else self._kinds[
            min(bisect_left(self._kind_cum, rng.random()), len(self._kinds) - 1)]
        size = min(KINDS[kind], self.disk_size)
        if kind == "random64k":
            offset = rng.randrange(0, (self.disk_size - size) // 4096 + 1) * 4096
        elif kind == "db8k":
            rank = bisect_left(self._zipf_cum, rng.random() * self._zipf_cum[-1])
            block = (self._hot_a * rank + self._hot_b) % self._blocks
            offset = min(block * 8 * KiB, self.disk_size - size)
        else:  # seq1m
            if self._seq_offset + size > self.disk_size:
                self._seq_offset = 0
            offset = self._seq_offset
            self._seq_offset += size
        return offset, self._data(size)

    def __iter__(self) -> Iterator[tuple[int, memoryview]]:
        while True:
            yield self.next()


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def disk_seed(agent_index: int, disk_index: int) -> int:
    """The workload seed of one disk: the same in the generator and in the ceiling/borg replay."""
    return 1_000_003 * (agent_index + 1) + 7919 * (disk_index + 1)


class BurstClock:
    """Maps 'busy time' (as if writing without pause) to wall time under the burst shaping."""

    def __init__(self, profile: Profile) -> None:
        self.enabled = profile.burst
        self.period = profile.burst_period_s
        self.on = profile.burst_period_s * profile.burst_duty

    def wall(self, busy: float) -> float:
        if not self.enabled:
            return busy
        cycles, rest = divmod(busy, self.on)
        return cycles * self.period + rest

    def off_until(self, elapsed: float) -> float:
        """0 if ``elapsed`` (since the start) is inside a burst, else seconds until the next one."""
        if not self.enabled:
            return 0.0
        pos = elapsed % self.period
        return 0.0 if pos < self.on else self.period - pos


def sample_batches(profile: Profile, seeds: list[int], total_bytes: int, batch_bytes: int,
                   disk_size: int) -> list[bytes]:
    """The first ``total_bytes`` that the generator's disks (given by their seeds) write, in batches.

    Disks are taken round-robin; each batch is the concatenation of write records
    (record header + payload) of one disk up to ``batch_bytes`` of payload, as the
    engine's batcher builds them. These are the bytes the ceiling seals and borg stores.
    """
    pool = profile.make_pool()
    streams = [DiskWorkload(profile, pool, disk_size, seed) for seed in seeds or [disk_seed(0, 0)]]
    batches: list[bytes] = []
    produced = 0
    seq = itertools.count(1)
    for stream in itertools.cycle(streams):
        if produced >= total_bytes:
            break
        pieces: list[bytes | memoryview] = []
        payload = 0
        while payload < batch_bytes and produced + payload < total_bytes:
            offset, data = stream.next()
            pieces.append(write_record_header(next(seq), 0, offset, len(data)))
            pieces.append(data)
            payload += len(data)
        batches.append(b"".join(pieces))
        produced += payload
    return batches
