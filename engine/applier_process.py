"""serve's applier as its own process: started, watched, restarted and stopped by the server.

Why a process: under load ingest (TLS, framing, batching) and apply (decrypt,
decompress, undo journal, seed writes) each want most of a core. On one event
loop and one GIL the applier starved — it applied 32 MB/s while ingest ran at
400 MB/s, though alone it drains a backlog at 500 MB/s — and every apply group
it did run showed up as ack latency. In its own process each side gets a core and
the kernel shares the machine, ingest first: the child runs ``applier.nice``
steps nicer than serve, because an agent waits for its acks and a recovery point
can come a little later (at 1000 agents the applier otherwise took the CPU that
ingest needed: 154 against 187 MB/s acknowledged, measured).

The channel is two pipes:

- the child's **stdin** carries the pickled config once (so credentials never
  touch the disk or the command line), then one byte per "new blobs stored"
  wake-up. **EOF means the server is gone**: the child stops, so a kill -9 of
  ``serve`` leaves no orphan applier holding the seed lock;
- a **report pipe** from the child carries JSON lines: ``ready``, then the
  applied sequence per disk after every apply group, a disk's failure and a
  committed failover, so the server can drain, refuse a committed disk (wherever
  the seed lives) and measure the whole recoverable lag without reading the seed.

The child is ``blockferry apply`` in all but its start: the same ApplierService,
its own control plane on ``applier.http_port`` (recovery commands find it through
the seed lock, as for a separate apply process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import re
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from engine.aio import run_loop
from engine.config import Config
from engine.memory import limit_malloc_arenas

log = logging.getLogger(__name__)

RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
STOP_TIMEOUT_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that ran this long restarts with the shortest delay again
_LENGTH = struct.Struct("<I")


class ApplierProcessError(RuntimeError):
    """The applier process could not start (its own error is in the log just before)."""


class ApplierProcess:
    """The server side: one child at a time, restarted with back-off if it dies."""

    def __init__(self, config: Config, *, on_applied: Callable[[str, int], None],
                 on_failed: Callable[[str, str], None]) -> None:
        """``on_applied(disk, seq)`` and ``on_failed(disk, reason)`` hear what the child reports (the
        server keeps it with each disk's stream: Pipeline.note_applied / note_apply_failure)."""
        self._on_applied = on_applied
        self._on_failed = on_failed
        http = config.http.model_copy(update={"port": config.applier.http_port})
        self._child_config = config.model_copy(update={"http": http})
        self.committed: set[str] = set()  # disks whose failover was committed: replication has stopped
        self.restarts = 0
        self._released = False  # the server let it apply (release): a restarted child is woken to, too
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        """Start the child and wait until it holds the seed lock and serves its API."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._supervise(ready), name="applier-process")
        await ready

    def release(self) -> None:
        """Let the child apply: it opens its seeds and reports what they hold, but applies nothing until the
        server knows where each disk resumes (Pipeline.start); its first wake-up is the signal."""
        self._released = True
        self.notify()

    def notify(self) -> None:
        """New blobs are in the cache store: wake the child now instead of at its next poll."""
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        transport = proc.stdin.transport
        if transport.is_closing() or transport.get_write_buffer_size():  # a wake-up is already on its way
            return
        proc.stdin.write(b"\x01")

    async def close(self) -> None:
        """EOF on the child's stdin, then wait for it to finish its group; kill it after STOP_TIMEOUT_S
        (safe: a kill at any point is recovered by the undo journal)."""
        self._closing = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.error("applier process %d did not stop within %.0fs; killing it", proc.pid, STOP_TIMEOUT_S)
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _supervise(self, ready: asyncio.Future[None]) -> None:
        delay = RESTART_MIN_S
        while not self._closing:
            started = time.monotonic()
            try:
                code = await self._run_once(ready)
            except OSError as exc:  # could not even spawn it (e.g. out of processes or memory)
                if not ready.done():
                    ready.set_exception(exc)
                    return
                code = str(exc)
            if self._closing:
                return
            if not ready.done():
                ready.set_exception(ApplierProcessError(f"the applier process exited ({code}) before it was ready"))
                return
            if time.monotonic() - started > HEALTHY_AFTER_S:
                delay = RESTART_MIN_S
            self.restarts += 1
            log.error("applier process exited (%s); restarting it in %.0fs", code, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _run_once(self, ready: asyncio.Future[None]) -> int:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "engine.applier_process", str(write_fd),
                stdin=asyncio.subprocess.PIPE, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._proc, self.pid = proc, proc.pid
        assert proc.stdin is not None
        payload = pickle.dumps((self._child_config, logging.getLogger().getEffectiveLevel()))
        proc.stdin.write(_LENGTH.pack(len(payload)) + payload)
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(read_fd, "rb", buffering=0))
        try:
            async for line in reader:  # ends when the child exits
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("applier process: unreadable report %r", line[:200])
                    continue
                self._on_report(message, ready)
        finally:
            transport.close()
        return await proc.wait()

    def _on_report(self, message: dict[str, Any], ready: asyncio.Future[None]) -> None:
        if "ready" in message:
            if not ready.done():
                ready.set_result(None)
            elif self._released:  # a restarted child waits for a wake-up before it applies, as the first did
                self.notify()
        elif "applied" in message:
            self._on_applied(message["disk"], message["applied"])
        elif "committed" in message:
            self.committed.add(message["disk"])
        elif "failed" in message:
            self._on_failed(message["disk"], message["failed"])


# ---------------------------------------------------------------- the child

ROLE = "applier process, server pid"  # how the child names itself in the seed lock


def orphaned(holder: str) -> bool:
    """Whether the seed lock's holder is the applier process of a server that is gone.

    It stops by itself after its current group (its stdin is closed), so a restarted server's applier
    waits for it; any other holder — ``blockferry apply``, a live server's applier — is a configuration
    error that must fail the start, not hang it.
    """
    match = re.search(re.escape(ROLE) + r" (\d+)", holder)
    if match is None:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _read_config(fd: int) -> tuple[Config, int]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = os.read(fd, n - len(data))
            if not chunk:
                raise SystemExit("applier process: the server closed the pipe before sending the config")
            data += chunk
        return data

    (size,) = _LENGTH.unpack(exactly(_LENGTH.size))
    config, level = pickle.loads(exactly(size))  # from our own parent, over a private pipe
    return config, level


class _Report:
    """What the applier process tells serve: JSON lines down the pipe, buffered by the transport (never
    blocking the loop). Once the pipe is gone — serve killed, or closed first — nothing is reported any
    more: the write would raise inside an apply group's listener and fail that disk's group, while this
    process is about to see its stdin's EOF and stop anyway."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def send(self, message: dict[str, object]) -> None:
        if not self._transport.is_closing():
            self._transport.write(json.dumps(message).encode() + b"\n")

    def close(self) -> None:
        self._transport.close()


async def _child(config: Config, report_fd: int) -> None:
    from engine.applier_service import ApplierService

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server decides
    report = _Report((await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(report_fd, "wb", buffering=0)))[0])

    # serve alerts on the whole path (this process reports what it applies): alerting here too would double them
    service = ApplierService(config, f"blockferry serve ({ROLE} {os.getppid()})", alerts=False)
    await service.start(wait_while=orphaned, run=False)  # the server's first wake-up starts it (see below)
    applier = service.applier
    assert applier is not None
    applier.applied_listeners.append(lambda disk, seq: report.send({"disk": disk, "applied": seq}))
    applier.failure_listeners.append(lambda failure: report.send({"disk": failure.disk, "failed": failure.reason}))
    applier.committed_listeners.append(lambda disk: report.send({"disk": disk, "committed": True}))
    for disk, d in applier.disks.items():
        report.send({"disk": disk, "applied": applier.applied_seq(disk)})
        if d.state.committed_failover:
            report.send({"disk": disk, "committed": True})
    report.send({"ready": os.getpid()})

    def on_wake() -> None:
        if not os.read(0, 4096):  # EOF: the server closed us or died
            loop.remove_reader(0)
            stop.set()
        elif service.runner is None:  # the server knows where its disks resume (Pipeline.start): apply now
            service.run()
            service.runner.add_done_callback(lambda _: stop.set())
        else:
            applier.notify()

    loop.add_reader(0, on_wake)
    try:
        await stop.wait()
    finally:
        await service.close()
        report.close()


def main() -> None:
    config, level = _read_config(0)
    os.nice(config.applier.nice)  # before any thread starts: a Linux thread takes its niceness from its creator
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s (applier process): %(message)s")
    limit_malloc_arenas()
    run_loop(_child(config, int(sys.argv[1])))


if __name__ == "__main__":
    main()
