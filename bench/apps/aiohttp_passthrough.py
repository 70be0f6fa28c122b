"""Bare ``aiohttp.web`` pass-through with an aiohttp client: the reference ceiling.

Same contract as ``litestar_passthrough`` (``BENCH_UPSTREAM``, routing on ``"stream":true``)
but with no ASGI layer at all, so the gap to the litestar variants is the price of
litestar + its ASGI server.

    python -m bench.apps.aiohttp_passthrough --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

from bench.apps.common import (
    JSON_MEDIA,
    JSON_URL,
    POOL_SIZE,
    SSE_MEDIA,
    SSE_URL,
    STREAM_MARK,
    UPSTREAM_HEADERS,
)

SESSION = web.AppKey("session", aiohttp.ClientSession)


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=POOL_SIZE, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        auto_decompress=False,
    )
    yield
    await app[SESSION].close()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    if STREAM_MARK in body:
        async with session.post(SSE_URL, data=body, headers=UPSTREAM_HEADERS) as upstream:
            resp = web.StreamResponse(status=upstream.status, headers={"Content-Type": SSE_MEDIA})
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    async with session.post(JSON_URL, data=body, headers=UPSTREAM_HEADERS) as upstream:
        content = await upstream.read()
        return web.Response(body=content, status=upstream.status, content_type=JSON_MEDIA)


def make_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
