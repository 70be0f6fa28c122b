"""Minimal litestar pass-through: ``POST /v1/chat/completions`` -> upstream -> client.

This is deliberately *not* the gateway: it does no auth, parsing or policy, so that what
``bench/transport.py`` measures is the cost of the ASGI server plus the HTTP client alone.

Environment:

* ``BENCH_CLIENT``   upstream client: ``httpx`` (default transport), ``httpx-aiohttp``
  (httpx API over ``httpx_aiohttp.AiohttpTransport``), ``aiohttp`` (a shared
  ``ClientSession``), or ``none`` (answer canned bytes, no upstream: the server ceiling).
* ``BENCH_UPSTREAM``  upstream base URL, e.g. ``http://127.0.0.1:8081``.
* ``BENCH_GC_FREEZE=1``  ``gc.collect(); gc.freeze()`` once startup is done, moving the
  import-time heap (litestar and its dependencies) out of the collector's sight
  so full collections stop scanning it; tests whether gen-2 pauses drive the p99.

Routing: a body containing the literal bytes ``"stream":true`` goes to
``{upstream}/sse/v1/chat/completions`` and is streamed back chunk by chunk as the upstream
delivers them (a litestar ``Stream`` over the client's chunk iterator); anything else goes
to ``{upstream}/json/v1/chat/completions`` and is returned whole. A byte search instead of
a JSON parse keeps the app's own cost out of the transport comparison.
"""

from __future__ import annotations

import gc
import os
from collections.abc import AsyncIterator
from typing import Any, Protocol

from litestar import Litestar, Request, Response, post
from litestar.response import Stream

from bench import canned
from bench.apps.common import (
    JSON_MEDIA,
    JSON_URL,
    POOL_SIZE,
    SSE_MEDIA,
    SSE_URL,
    STREAM_MARK,
    UPSTREAM_HEADERS,
)


class Forwarder(Protocol):
    """What a client variant must provide; created in the startup hook (needs the loop)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def forward_json(self, body: bytes) -> tuple[int, bytes]: ...
    async def forward_stream(self, body: bytes) -> tuple[int, AsyncIterator[bytes]]: ...


class HttpxForwarder:
    """One shared ``httpx.AsyncClient``; default (httpcore) transport or the aiohttp one."""

    def __init__(self, use_aiohttp_transport: bool) -> None:
        self._use_aiohttp = use_aiohttp_transport
        self._client: Any = None

    async def start(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE, keepalive_expiry=60)
        timeout = httpx.Timeout(60.0, connect=10.0)
        if self._use_aiohttp:
            import aiohttp
            from httpx_aiohttp import AiohttpTransport

            def make_session() -> aiohttp.ClientSession:
                # Called lazily by the transport on first request (inside the loop).
                return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=60))

            transport = AiohttpTransport(limits=limits, client=make_session)
            self._client = httpx.AsyncClient(transport=transport, timeout=timeout)
        else:
            self._client = httpx.AsyncClient(limits=limits, timeout=timeout)

    async def close(self) -> None:
        await self._client.aclose()

    async def forward_json(self, body: bytes) -> tuple[int, bytes]:
        resp = await self._client.post(JSON_URL, content=body, headers=UPSTREAM_HEADERS)
        return resp.status_code, resp.content

    async def forward_stream(self, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        request = self._client.build_request("POST", SSE_URL, content=body, headers=UPSTREAM_HEADERS)
        resp = await self._client.send(request, stream=True)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return resp.status_code, chunks()


class AiohttpForwarder:
    """One shared ``aiohttp.ClientSession`` with a keep-alive ``TCPConnector`` pool."""

    def __init__(self) -> None:
        self._session: Any = None

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self._session.close()

    async def forward_json(self, body: bytes) -> tuple[int, bytes]:
        async with self._session.post(JSON_URL, data=body, headers=UPSTREAM_HEADERS) as resp:
            return resp.status, await resp.read()

    async def forward_stream(self, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        resp = await self._session.post(SSE_URL, data=body, headers=UPSTREAM_HEADERS)

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.content.iter_any():
                    yield chunk
            finally:
                resp.release()

        return resp.status, chunks()


class CannedForwarder:
    """No upstream at all: the ceiling of litestar on the given ASGI server."""

    _json = canned.chat_completion()
    _sse = canned.sse_stream()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def forward_json(self, body: bytes) -> tuple[int, bytes]:
        return 200, self._json

    async def forward_stream(self, body: bytes) -> tuple[int, AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield self._sse

        return 200, chunks()


def make_forwarder(kind: str) -> Forwarder:
    if kind == "httpx":
        return HttpxForwarder(use_aiohttp_transport=False)
    if kind == "httpx-aiohttp":
        return HttpxForwarder(use_aiohttp_transport=True)
    if kind == "aiohttp":
        return AiohttpForwarder()
    if kind == "none":
        return CannedForwarder()
    raise SystemExit(f"unknown BENCH_CLIENT={kind!r}")


FORWARDER = make_forwarder(os.environ.get("BENCH_CLIENT", "aiohttp"))


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    body = await request.body()
    if STREAM_MARK in body:
        status, chunks = await FORWARDER.forward_stream(body)
        return Stream(chunks, media_type=SSE_MEDIA, status_code=status)
    status, content = await FORWARDER.forward_json(body)
    return Response(content, media_type=JSON_MEDIA, status_code=status)


async def freeze_gc() -> None:
    if os.environ.get("BENCH_GC_FREEZE") == "1":
        gc.collect()
        gc.freeze()


app = Litestar(
    route_handlers=[chat_completions],
    on_startup=[FORWARDER.start, freeze_gc],
    on_shutdown=[FORWARDER.close],
    openapi_config=None,
    # No logging config: litestar's default one routes httpx's per-request INFO line
    # ("HTTP Request: POST ...") to stderr, which would bill logging to the httpx variants.
    logging_config=None,
)
