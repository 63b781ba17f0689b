"""RandomNonces: bulk-drawn nonces that are exactly what os.urandom(12) per seal would be."""

from __future__ import annotations

import os

import pytest

import engine.nonces
from engine.nonces import RandomNonces
from protocol.logblob import NONCE_SIZE


def test_nonces_are_distinct_across_refills_and_drawn_a_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    draws: list[int] = []
    real_urandom = os.urandom

    def counting_urandom(size: int) -> bytes:
        draws.append(size)
        return real_urandom(size)

    monkeypatch.setattr(engine.nonces.os, "urandom", counting_urandom)
    nonces = RandomNonces(batch=4)
    taken = [nonces() for _ in range(10)]
    assert all(len(nonce) == NONCE_SIZE and isinstance(nonce, bytes) for nonce in taken)
    assert len(set(taken)) == 10
    assert draws == [4 * NONCE_SIZE] * 3


def test_a_batch_must_hold_a_nonce() -> None:
    with pytest.raises(ValueError, match="batch"):
        RandomNonces(batch=0)
