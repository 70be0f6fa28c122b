"""The span exporter follows no redirect: a 3xx from the collector's address (a moved collector, an ingress) would
re-post the spans, and the `otlp_headers_env` credentials with them (aiohttp drops only `Authorization` across
hosts), to wherever it points. The post is a failed export, counted as one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from gateway.policy.telemetry_schema import TracingSpec
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import SpanExporter

SECRET = "b8-collector-api-key-0123456789"


@asynccontextmanager
async def _site(app: web.Application) -> AsyncIterator[int]:
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirecting_collector_gets_the_spans_once_and_nowhere_else(status: int) -> None:
    async def main() -> tuple[list[str | None], int, float, float]:
        elsewhere: list[str | None] = []
        posts = 0

        async def other(request: web.Request) -> web.Response:
            await request.read()
            elsewhere.append(request.headers.get("x-honeycomb-team"))
            return web.json_response({})

        other_app = web.Application()
        other_app.router.add_route("*", "/v1/traces", other)  # (a 301/302 is followed as a GET)
        async with _site(other_app) as other_port:

            async def redirect(request: web.Request) -> web.Response:
                nonlocal posts
                await request.read()
                posts += 1
                return web.Response(status=status, headers={"Location": f"http://localhost:{other_port}/v1/traces"})

            front_app = web.Application()
            front_app.router.add_post("/v1/traces", redirect)
            async with _site(front_app) as front_port:
                spec = TracingSpec(enabled=True, otlp_endpoint=f"http://127.0.0.1:{front_port}/v1/traces",
                                   otlp_headers_env={"x-honeycomb-team": "B8_COLLECTOR_KEY"})
                metrics = Metrics()
                exporter = SpanExporter(spec, metrics, env={"B8_COLLECTOR_KEY": SECRET})
                await exporter.start()
                exporter.add({"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "1", "name": "chat x"})
                exporter.add({"traceId": "0" * 31 + "1", "spanId": "0" * 15 + "2", "name": "chat x"})
                await exporter.aclose()
        sample = metrics.registry.get_sample_value
        return (elsewhere, posts, sample("gateway_spans_exported_total", {"result": "failed"}) or 0.0,
                sample("gateway_spans_exported_total", {"result": "ok"}) or 0.0)

    elsewhere, posts, failed, ok = asyncio.run(main())
    assert elsewhere == []  # neither the spans nor the collector's credential went where the redirect pointed
    assert posts == 1
    assert (failed, ok) == (2.0, 0.0)
