"""Backpressure: ingest pauses at the in-flight limit and resumes only below three quarters of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from support import make_config, running_pipeline

from engine.pipeline import Pipeline
from protocol import Write

MiB = 1024 * 1024
LIMIT = 8 * MiB


class Recorder:
    """A flow listener (what every agent connection is) that notes the bytes held at each call."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.events: list[tuple[str, int]] = []

    def pause_reading(self) -> None:
        self.events.append(("pause", self.pipeline.held_bytes))

    def resume_reading(self) -> None:
        self.events.append(("resume", self.pipeline.held_bytes))


async def test_reading_pauses_at_the_limit_and_resumes_below_three_quarters(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", batch={"max_bytes": 1 * MiB, "linger_ms": 1},
                         pipeline={"max_inflight_bytes": LIMIT})
    async with running_pipeline(config, disk_size=256 * MiB) as pipeline:
        recorder = Recorder(pipeline)
        pipeline.flow_listeners.add(recorder)
        stream = pipeline.streams["d"]
        payload = bytes(range(256)) * 256  # 64 KiB
        for seq in range(1, 1025):  # 64 MiB: eight times the limit
            while pipeline.paused:  # what a paused connection does: read nothing until resumed
                await asyncio.sleep(0.001)
            pipeline.accept_write(stream, Write.make(1, seq, (seq - 1) * len(payload), payload, 0))
        await pipeline.drain()
    pauses = [inflight for event, inflight in recorder.events if event == "pause"]
    resumes = [inflight for event, inflight in recorder.events if event == "resume"]
    assert len(pauses) >= 2 and len(resumes) >= 2, recorder.events
    assert all(inflight >= LIMIT for inflight in pauses), pauses
    assert all(inflight < LIMIT * 3 // 4 for inflight in resumes), resumes
    assert [event for event, _ in recorder.events] == ["pause", "resume"] * len(pauses), "strictly alternating"
