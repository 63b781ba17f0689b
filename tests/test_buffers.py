"""The per-thread buffers the seal threads reuse."""

from __future__ import annotations

import threading

from engine.buffers import ThreadBuffer


def test_a_thread_gets_its_own_buffer_back_and_grown_only_when_too_small() -> None:
    buffers = ThreadBuffer()
    first = buffers.take(8)
    first[:] = b"abcdefgh"
    again = buffers.take(4)
    assert bytes(again) == b"abcd" and again.obj is first.obj  # reused: no fresh memory per blob
    grown = buffers.take(16)
    assert len(grown) == 16 and grown.obj is not first.obj
    assert buffers.take(8).obj is grown.obj  # it keeps its largest size


def test_threads_never_share_a_buffer() -> None:
    """A seal thread's records must not be overwritten by another seal thread gathering its own."""
    buffers = ThreadBuffer()
    mine = buffers.take(8)
    mine[:] = b"\x01" * 8
    other: list[memoryview] = []

    def take_and_fill() -> None:
        view = buffers.take(8)
        view[:] = b"\x02" * 8
        other.append(view)

    thread = threading.Thread(target=take_and_fill)
    thread.start()
    thread.join()
    assert bytes(mine) == b"\x01" * 8 and other[0].obj is not mine.obj
