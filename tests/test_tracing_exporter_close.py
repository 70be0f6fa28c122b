"""The span exporter's close, and the `traceparent` of a future version.

A collector that accepts connections and never answers (or answers slowly) must not hold a shutdown: the spans
still queued get `FINAL_DRAIN_S` in all, the rest are dropped and counted (`close_timeout`), a batch cut mid-post
among them, so every span ends counted exactly once. A `traceparent` of a version above 00 keeps its trace
(W3C Trace Context, "Versioning of traceparent"); the gateway forwards and echoes its version-00 form.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.policy.telemetry_schema import TracingSpec
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tracing import FINAL_DRAIN_S, SpanExporter
from tests.conftest import FULL_KEY, policy_text

_HEADERS = {"Authorization": f"Bearer {FULL_KEY}"}


def _span(i: int) -> dict[str, Any]:
    return {"traceId": "0" * 31 + "1", "spanId": f"{i + 1:016x}", "name": "chat demo"}


def _counts(metrics: Metrics) -> dict[str, float]:
    """Every way a span is counted: exported ok or failed, dropped for a full queue or at close."""
    sample = metrics.registry.get_sample_value
    return {
        "ok": sample("gateway_spans_exported_total", {"result": "ok"}) or 0.0,
        "failed": sample("gateway_spans_exported_total", {"result": "failed"}) or 0.0,
        "queue_full": sample("gateway_telemetry_dropped_total", {"sink": "otlp", "reason": "queue_full"}) or 0.0,
        "close_timeout": sample("gateway_telemetry_dropped_total", {"sink": "otlp", "reason": "close_timeout"}) or 0.0,
    }


@asynccontextmanager
async def _collector(delay_s: float | None) -> AsyncIterator[tuple[str, list[int]]]:
    """A real OTLP/HTTP endpoint: answers each post after `delay_s`, or (None) accepts it and never answers."""
    received: list[int] = []

    async def traces(request: web.Request) -> web.Response:
        body = await request.json()
        if delay_s is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(delay_s or 0)
        received.append(len(body["resourceSpans"][0]["scopeSpans"][0]["spans"]))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", received
    finally:
        await runner.cleanup()


async def _close_timed(exporter: SpanExporter) -> float:
    began = time.monotonic()
    await exporter.aclose()
    return time.monotonic() - began


def test_a_hanging_collector_holds_the_close_no_longer_than_the_final_drain() -> None:
    async def main() -> tuple[float, dict[str, float]]:
        async with _collector(None) as (endpoint, _):
            metrics = Metrics()
            exporter = SpanExporter(TracingSpec(enabled=True, otlp_endpoint=endpoint, batch_size=16,
                                                flush_interval_s=60), metrics, env={})
            await exporter.start()
            for i in range(100):
                exporter.add(_span(i))
            took = await _close_timed(exporter)
            exporter.add(_span(100))  # a request that ends after the close: counted too
            return took, _counts(metrics)

    took, counts = asyncio.run(main())
    assert took < FINAL_DRAIN_S + 1, f"closing the span exporter took {took:.1f} s"  # each post may wait 10 s
    assert counts == {"ok": 0, "failed": 0, "queue_full": 0, "close_timeout": 101}


def test_a_batch_being_posted_at_close_is_counted_once() -> None:
    async def main() -> dict[str, float]:
        async with _collector(None) as (endpoint, _):
            metrics = Metrics()
            exporter = SpanExporter(TracingSpec(enabled=True, otlp_endpoint=endpoint, batch_size=16,
                                                flush_interval_s=0.05), metrics, env={})
            await exporter.start()
            for i in range(20):
                exporter.add(_span(i))
            await asyncio.sleep(0.3)  # the first batch is being posted; the collector never answers
            await exporter.aclose()
            return _counts(metrics)

    assert asyncio.run(main()) == {"ok": 0, "failed": 0, "queue_full": 0, "close_timeout": 20}


def test_a_slow_collector_gets_one_deadline_for_all_the_batches_left() -> None:
    """Ten batches queued, each post answered after 0.6 s: what fits in the final drain is posted, the rest is
    dropped, each span counted once (one deadline in all, not one per post)."""
    async def main() -> tuple[float, dict[str, float], list[int]]:
        async with _collector(0.6) as (endpoint, received):
            metrics = Metrics()
            exporter = SpanExporter(TracingSpec(enabled=True, otlp_endpoint=endpoint, batch_size=16,
                                                flush_interval_s=60), metrics, env={})
            await exporter.start()
            for i in range(160):
                exporter.add(_span(i))
            took = await _close_timed(exporter)
            return took, _counts(metrics), received

    took, counts, received = asyncio.run(main())
    assert took < FINAL_DRAIN_S + 1, f"closing the span exporter took {took:.1f} s"
    assert counts["ok"] == sum(received) and 16 <= counts["ok"] < 160
    assert counts["ok"] + counts["close_timeout"] == 160 and counts["failed"] == counts["queue_full"] == 0


def test_a_refusing_collector_at_close_counts_every_batch_failed() -> None:
    """A collector that is down fails each post at once: at close every batch is tried, each counted failed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    async def main() -> dict[str, float]:
        metrics = Metrics()
        exporter = SpanExporter(TracingSpec(enabled=True, otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces",
                                            batch_size=16, flush_interval_s=60), metrics, env={})
        await exporter.start()
        for i in range(40):
            exporter.add(_span(i))
        await exporter.aclose()
        return _counts(metrics)

    assert asyncio.run(main()) == {"ok": 0, "failed": 40, "queue_full": 0, "close_timeout": 0}


@pytest.fixture
def hanging_collector() -> Iterator[str]:
    """A port that accepts connections, reads nothing and never answers, in a thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        listener.close()


def test_the_gateway_stops_promptly_with_a_hanging_collector_and_counts_its_spans(
    make_gateway: Any, upstream: Any, hanging_collector: str,
) -> None:
    text = policy_text(upstream.base_url) + (
        f"telemetry:\n  tracing: {{enabled: true, otlp_endpoint: '{hanging_collector}', flush_interval_s: 0.05}}\n")
    running = make_gateway(text)
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{running.base_url}/chat/completions", headers=_HEADERS, json=body).status_code == 200
    time.sleep(0.3)  # its span is being posted, and the post hangs
    assert httpx.post(f"{running.base_url}/chat/completions", headers=_HEADERS, json=body).status_code == 200
    began = time.monotonic()
    running.stop()  # the server's shutdown closes the runtime, and so the exporter
    took = time.monotonic() - began
    assert not running.thread.is_alive()
    assert took < FINAL_DRAIN_S + 2, f"the gateway took {took:.1f} s to stop"
    assert _counts(running.gateway.metrics) == {"ok": 0, "failed": 0, "queue_full": 0, "close_timeout": 2}


def test_a_future_traceparent_version_keeps_its_trace_in_version_00(make_gateway: Any, upstream: Any) -> None:
    running = make_gateway(policy_text(upstream.base_url) + "telemetry:\n  tracing: {enabled: true}\n")
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    for version, suffix, flags, sent in (("cc", "", "01", "01"), ("02", "-what-the-future-will-be-like", "03", "01"),
                                         ("fe", "-x", "00", "00")):
        trace, parent = secrets.token_hex(16), secrets.token_hex(8)
        answer = httpx.post(f"{running.base_url}/chat/completions", json=body,
                            headers={**_HEADERS, "traceparent": f"{version}-{trace}-{parent}-{flags}{suffix}"})
        assert answer.status_code == 200
        echoed = answer.headers["traceparent"]
        assert len(echoed) == 55
        v, trace_id, span_id, echoed_flags = echoed.split("-")
        assert (v, trace_id, echoed_flags) == ("00", trace, sent) and span_id != parent  # only the sampled flag
        assert upstream.requests[-1].headers["traceparent"] == echoed
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    for bad in (f"ff-{trace}-{parent}-01", f"cc-{trace}-{parent}-01.x", f"00-{trace}-{parent}-01-x"):
        fresh = httpx.post(f"{running.base_url}/chat/completions", json=body, headers={**_HEADERS, "traceparent": bad})
        assert fresh.headers["traceparent"].split("-")[1] != trace, bad  # a new trace
