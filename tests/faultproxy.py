"""A misbehaving reverse proxy for fault-injection tests: put it between a client and Azurite.

Each request draws from a seeded RNG and, within a bounded fault rate, gets one of

* ``busy``: HTTP 503 with ``x-ms-error-code: ServerBusy`` (what a throttled storage account answers),
  the request never reaches the upstream;
* ``throttle``: HTTP 429 Too Many Requests, likewise;
* ``reset_before``: the connection is reset (RST) before the request is forwarded;
* ``reset_after``: the request is forwarded and carried out, then the connection is reset instead of
  answering: the client cannot know its write succeeded and must retry an already applied request;
* ``delay``: the answer is held back for a moment;
* ``stall``: the answer is held back longer than the client's read timeout.

Everything else is forwarded unchanged (headers included, so SharedKey signatures stay valid).
``stats`` counts requests and each fault, so a test can prove the faults were actually hit.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from typing import Self

import aiohttp
from aiohttp import web

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "host", "content-length"}

SERVER_BUSY_BODY = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>ServerBusy</Code>'
                    b"<Message>Operations per second is over the account limit.</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int, busy: float = 0.0, throttle: float = 0.0,
                 reset_before: float = 0.0, reset_after: float = 0.0, delay: float = 0.0, stall: float = 0.0,
                 delay_s: float = 0.2, stall_s: float = 1.5, max_fault_rate: float = 0.35,
                 method_factor: dict[str, float] | None = None) -> None:
        total = busy + throttle + reset_before + reset_after + delay + stall
        if total > max_fault_rate:
            raise ValueError(f"fault rate {total:.2f} exceeds the bound {max_fault_rate}: the client could starve")
        self.upstream = upstream.rstrip("/")
        self.rng = random.Random(seed)
        self.table = [("busy", busy), ("throttle", throttle), ("reset_before", reset_before),
                      ("reset_after", reset_after), ("delay", delay), ("stall", stall)]
        self.method_factor = method_factor or {}  # e.g. {"GET": 0.25}: fewer faults for reads
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.enabled = True
        self.stats: Counter[str] = Counter()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self, host: str = "127.0.0.1") -> int:
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120))
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _draw(self, method: str) -> str | None:
        if not self.enabled:
            return None
        r = self.rng.random()
        factor = self.method_factor.get(method, 1.0)
        for kind, rate in self.table:
            rate *= factor
            if r < rate:
                return kind
            r -= rate
        return None

    @staticmethod
    def _reset(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:  # linger 0: close sends RST, like a dropped middlebox connection
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.stats["requests"] += 1
        fault = self._draw(request.method)
        if fault:
            self.stats[fault] += 1
            self.stats[f"{fault} {request.method}"] += 1
        if fault == "busy":
            return web.Response(status=503, reason="Server Busy", body=SERVER_BUSY_BODY,
                                headers={"x-ms-error-code": "ServerBusy", "Content-Type": "application/xml"})
        if fault == "throttle":
            return web.Response(status=429, reason="Too Many Requests", body=b"",
                                headers={"x-ms-error-code": "TooManyRequests", "Retry-After": "0"})
        if fault == "reset_before":
            self._reset(request)
            return web.Response(status=500)  # never sent: aiohttp drops it quietly on the closed transport
        status, headers, payload = await self._forward(request, body)
        if fault == "reset_after":
            self._reset(request)
            return web.Response(status=500)
        if fault == "delay":
            await asyncio.sleep(self.rng.uniform(0, self.delay_s))
        elif fault == "stall":
            await asyncio.sleep(self.stall_s)
        if request.method == "HEAD":  # keep the upstream Content-Length: it is the blob's size
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = int(headers.get("Content-Length", "0") or 0)
            return response
        headers.pop("Content-Length", None)
        return web.Response(status=status, headers=headers, body=payload)

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(
            request.method, self.upstream + request.rel_url.raw_path_qs, headers=headers, data=body,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent", "Accept"), allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP - {"content-length"}}
            return upstream.status, out, payload
