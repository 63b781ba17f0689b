"""Synthetic disk content and churn, shared by the demo, the tests and the bench.

Payloads are slices of one pre-generated pool, so producing a write costs no
random-number generation per byte and no copy (slices are memoryviews of an
immutable ``bytes``). The default content mix is the one behind the figures in
shared/reference/ANCHORS.md: 35 % random, 50 % text-like, 15 % zeros.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from protocol import SECTOR_SIZE

_WORDS = (b"replication block sector journal recovery point applier process server cache storage account "
          b"failover commit retention snapshot consistent agent disk write sequence checksum batch linger "
          b"the of and to in is that for it as with was on be by at this are from or have an but not").split()


@dataclass(frozen=True)
class ContentMix:
    random: float = 0.35
    text: float = 0.50
    zeros: float = 0.15


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(_WORDS, k=64)) + b".\n"
    return bytes(out[:size])


class ContentPool:
    """A pool of mixed content built from 64 KiB pieces in the requested proportions."""

    PIECE = 64 * 1024

    def __init__(self, size: int = 32 * 1024 * 1024, mix: ContentMix = ContentMix(), seed: int = 1) -> None:
        rng = random.Random(seed)
        pieces = []
        for _ in range(max(1, size // self.PIECE)):
            roll = rng.random()
            if roll < mix.random:
                pieces.append(rng.randbytes(self.PIECE))
            elif roll < mix.random + mix.text:
                pieces.append(_text(rng, self.PIECE))
            else:
                pieces.append(bytes(self.PIECE))
        self.data = b"".join(pieces)
        self._view = memoryview(self.data)
        self._rng = rng

    def take(self, size: int) -> memoryview:
        start = self._rng.randrange(0, (len(self.data) - size) // SECTOR_SIZE + 1) * SECTOR_SIZE
        return self._view[start:start + size]


@dataclass(frozen=True)
class RandomWrite:
    offset: int
    data: memoryview


def random_writes(pool: ContentPool, disk_size: int, *, min_size: int = 4096, max_size: int = 1024 * 1024,
                  seed: int = 2) -> Iterator[RandomWrite]:
    """Endless overlapping writes of mixed sizes (powers of two between the bounds), 4 KiB aligned."""
    rng = random.Random(seed)
    sizes = [s for s in (1 << k for k in range(9, 31)) if min_size <= s <= max_size]
    while True:
        size = rng.choice(sizes)
        offset = rng.randrange(0, (disk_size - size) // 4096 + 1) * 4096
        yield RandomWrite(offset, pool.take(size))
