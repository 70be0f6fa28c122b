"""Telemetry through a real gateway: bounded labels, quality signals, feedback, tracing, the access log.

A gateway on a real port in front of the mock upstream, driven with HTTP; the
exposition is read with prometheus_client's own parser and checked by promtool.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FULL_KEY, OTHER_TENANT_KEY, RunningGateway, free_port, policy_text

TELEMETRY = """\
telemetry:
  quality: {enabled: true}
  feedback: {enabled: true, labels: [helpful, wrong]}
  tracing: {enabled: true}
"""
Make = Callable[..., RunningGateway]


def _headers(key: str = FULL_KEY, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def _chat(content: str, model: str = "fault-echo", **body: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **body}


def _value(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample (0 when the series does not exist)."""
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _series(metrics: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in text_string_to_metric_families(metrics) for s in family.samples}


@pytest.fixture
def telemetry_gateway(make_gateway: Make, upstream: Any) -> RunningGateway:
    return make_gateway(policy_text(upstream.base_url) + TELEMETRY)


def test_exposition_parses_and_passes_promtool(telemetry_gateway: RunningGateway) -> None:
    url = telemetry_gateway.base_url
    with httpx.Client(headers=_headers()) as client:
        assert client.post(f"{url}/chat/completions", json=_chat("hello there")).status_code == 200
        assert client.post(f"{url}/chat/completions", json=_chat("hi", stream=True)).status_code == 200
        assert client.post(f"{url}/chat/completions", json=_chat("x", model="nope")).status_code == 404
    metrics = telemetry_gateway.metrics()
    names = {family.name for family in text_string_to_metric_families(metrics)}
    for expected in ("gateway_gen_ai_client_token_usage", "gateway_gen_ai_client_operation_duration_seconds",
                     "gateway_gen_ai_server_time_to_first_token_seconds", "gateway_tenant_requests",
                     "gateway_quality_checked", "gateway_errors"):
        assert expected in names
    assert _value(metrics, "gateway_tenant_requests_total", tenant="acme", key="full", model="fault-echo",
                  status="200") == 2
    assert _value(metrics, "gateway_errors_total", model="unknown", code="model_not_found") == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`); tests/run.sh installs it as root")
    checked = subprocess.run([promtool, "check", "metrics"], input=metrics.encode(), capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_client_values_never_add_series(telemetry_gateway: RunningGateway) -> None:
    """Thousands of distinct model strings, users, headers and keys: the series count stays flat."""
    url = telemetry_gateway.base_url

    def traffic(client: httpx.Client, salt: str) -> None:
        client.post(f"{url}/chat/completions", json=_chat("hi", model=f"model-{salt}"), headers=_headers())
        client.post(f"{url}/chat/completions", json=_chat("hi", user=f"user-{salt}"),
                    headers=_headers(**{"x-request-id": f"id-{salt}", "x-custom": salt,
                                        "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}))
        client.post(f"{url}/chat/completions", json=_chat("hi"), headers=_headers(key=f"gw-{salt}"))
        client.post(f"{url}/chat/completions", json=_chat("hi", model=f"fault-{salt}"), headers={})

    with httpx.Client() as client:
        traffic(client, "warm-up")
        before = _series(telemetry_gateway.metrics())
        for n in range(750):  # 3,000 requests with distinct client values
            traffic(client, f"{n}-{secrets.token_hex(4)}")
    after = _series(telemetry_gateway.metrics())
    assert after == before, sorted(after - before)[:10]


def test_feedback_counts_own_requests_and_rejects_foreign_ones(telemetry_gateway: RunningGateway) -> None:
    url = telemetry_gateway.base_url
    with httpx.Client() as client:
        answered = client.post(f"{url}/chat/completions", json=_chat("hello"), headers=_headers())
        request_id = answered.headers["x-request-id"]
        feedback = {"request_id": request_id, "score": 1, "label": "helpful"}
        foreign = client.post(f"{url}/feedback", json=feedback, headers=_headers(key=OTHER_TENANT_KEY))
        assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "request_not_found"
        assert client.post(f"{url}/feedback", json=feedback).status_code == 401  # no key at all
        unknown = client.post(f"{url}/feedback", json={**feedback, "request_id": "req_never_seen"}, headers=_headers())
        assert unknown.status_code == 404
        for bad in ({"request_id": request_id, "score": 7}, {"request_id": request_id, "score": -1},
                    {"request_id": request_id}, {"score": 1},
                    {"request_id": "has spaces", "score": 1}, {**feedback, "extra": 1}):
            response = client.post(f"{url}/feedback", json=bad, headers=_headers())
            assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        assert client.post(f"{url}/feedback", content=b"{not json", headers=_headers()).status_code == 400
        taken = client.post(f"{url}/feedback", json=feedback, headers=_headers())
        assert taken.status_code == 200, taken.text
        assert taken.json()["model"] == "fault-echo" and taken.json()["target"] == "mock-fast/fault-echo"
        again = client.post(f"{url}/feedback", json=feedback, headers=_headers())
        assert again.status_code == 404  # one feedback per request
        streamed = client.post(f"{url}/chat/completions", json=_chat("hi", stream=True), headers=_headers())
        odd = {"request_id": streamed.headers["x-request-id"], "score": 0, "label": "some free text"}
        assert client.post(f"{url}/feedback", json=odd, headers=_headers()).status_code == 200
    metrics = telemetry_gateway.metrics()
    target = "mock-fast/fault-echo"
    assert _value(metrics, "gateway_feedback_total", model="fault-echo", target=target, label="helpful") == 1
    assert _value(metrics, "gateway_feedback_total", model="fault-echo", target=target, label="other") == 1
    assert _value(metrics, "gateway_feedback_score_count", model="fault-echo", target=target) == 2
    assert _value(metrics, "gateway_feedback_score_sum", model="fault-echo", target=target) == 1


def test_feedback_is_off_unless_the_policy_turns_it_on(gateway: RunningGateway) -> None:
    response = httpx.post(f"{gateway.base_url}/feedback", json={"request_id": "r", "score": 1}, headers=_headers())
    assert response.status_code == 404 and "telemetry.feedback" in response.json()["error"]["message"]


_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
_TOOLS = [{"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]}}}]


def _assert_each_signal_counted_once(metrics: str, cases: list[tuple[dict[str, Any], str]]) -> None:
    """Each case's signal once on its own alias; six `fault-echo` answers checked (the cases' four and two fine
    ones), of which only the four cases raised a signal; the tool case ended with `tool_calls`."""
    for body, signal in cases:
        model = body["model"]
        target = f"mock-fast/{model}"
        assert _value(metrics, "gateway_quality_signals_total", model=model, target=target, signal=signal) == 1, signal
    assert _value(metrics, "gateway_quality_checked_total", model="fault-echo", target="mock-fast/fault-echo") == 6
    assert _value(metrics, "gateway_quality_finish_reasons_total", model="fault-echo-tool",
                  target="mock-fast/fault-echo-tool", reason="tool_calls") == 1
    total_signals = sum(_value(metrics, "gateway_quality_signals_total", model="fault-echo",
                               target="mock-fast/fault-echo", signal=s)
                        for s in ("refusal", "empty", "invalid_json", "schema_violation", "truncated"))
    assert total_signals == 4  # the two fine answers raised nothing


@pytest.mark.parametrize("stream", [False, True])
def test_quality_signals_per_alias_and_target(telemetry_gateway: RunningGateway, stream: bool) -> None:
    url = telemetry_gateway.base_url
    json_object = {"type": "json_object"}
    json_schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": _SCHEMA}}
    cases = [
        (_chat("I'm sorry, but I can't help with that request."), "refusal"),
        (_chat(""), "empty"),
        (_chat("not json at all", response_format=json_object), "invalid_json"),
        (_chat('{"n": "seven"}', response_format=json_schema), "schema_violation"),
        (_chat("hello", model="fault-echo-tool", tools=_TOOLS), "malformed_tool_call"),
    ]
    fine = [_chat('{"n": 7}', response_format=json_schema), _chat("Sure, here it is.")]
    with httpx.Client(headers=_headers()) as client:
        for body, _ in cases:
            assert client.post(f"{url}/chat/completions", json={**body, "stream": stream}).status_code == 200
        for body in fine:
            assert client.post(f"{url}/chat/completions", json={**body, "stream": stream}).status_code == 200
    _assert_each_signal_counted_once(telemetry_gateway.metrics(), cases)


def _responses(given: str, model: str = "fault-echo", **body: Any) -> dict[str, Any]:
    return {"model": model, "input": given, **body}


@pytest.mark.parametrize("stream", [False, True])
def test_quality_signals_of_responses_answers(telemetry_gateway: RunningGateway, stream: bool) -> None:
    """The same checks on `/v1/responses`: its text parts, its `text.format` and its function tools."""
    url = telemetry_gateway.base_url
    schema_format = {"format": {"type": "json_schema", "name": "n", "schema": _SCHEMA}}
    tools = [{"type": "function", "name": "echo", "parameters": _TOOLS[0]["function"]["parameters"]}]
    cases = [
        (_responses("I'm sorry, but I can't help with that request."), "refusal"),
        (_responses(""), "empty"),
        (_responses("not json at all", text={"format": {"type": "json_object"}}), "invalid_json"),
        (_responses('{"n": "seven"}', text=schema_format), "schema_violation"),
        (_responses("hello", model="fault-echo-tool", tools=tools), "malformed_tool_call"),
    ]
    fine = [_responses('{"n": 7}', text=schema_format), _responses("Sure, here it is.")]
    with httpx.Client(headers=_headers(), timeout=15) as client:
        for body in [b for b, _ in cases] + fine:
            response = client.post(f"{url}/responses", json={**body, "stream": stream})
            assert response.status_code == 200, response.text
    metrics = telemetry_gateway.metrics()
    _assert_each_signal_counted_once(metrics, cases)
    assert _value(metrics, "gateway_quality_finish_reasons_total", model="fault-echo",
                  target="mock-fast/fault-echo", reason="stop") == 6


def test_quality_off_reads_no_stream_and_counts_nothing(gateway: RunningGateway) -> None:
    assert not any(stage.name == "quality" for stage in gateway.gateway.runtime.pipeline.stages)
    assert all(getattr(stage, "quality", None) is None for stage in gateway.gateway.runtime.pipeline.stages)
    httpx.post(f"{gateway.base_url}/chat/completions", json=_chat("I'm sorry, but I can't"), headers=_headers())
    assert "gateway_quality_signals_total{" not in gateway.metrics()


def test_traceparent_is_forwarded_upstream_and_echoed(telemetry_gateway: RunningGateway, upstream: Any) -> None:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(f"{telemetry_gateway.base_url}/chat/completions", json=_chat("hi"),
                          headers=_headers(traceparent=f"00-{trace}-{parent}-01"))
    echoed = response.headers["traceparent"]
    version, trace_id, span_id, flags = echoed.split("-")
    assert (version, trace_id, flags) == ("00", trace, "01") and span_id != parent
    assert upstream.requests[-1].headers["traceparent"] == echoed  # the gateway's span is the upstream's parent
    for bad in ("garbage", f"00-{'0' * 32}-{parent}-01", f"00-{trace}-{parent}"):
        fresh = httpx.post(f"{telemetry_gateway.base_url}/chat/completions", json=_chat("hi"),
                           headers=_headers(traceparent=bad))
        assert fresh.headers["traceparent"].split("-")[1] not in (trace, "0" * 32)  # a new trace
    refused = httpx.post(f"{telemetry_gateway.base_url}/chat/completions", json=_chat("hi", model="nope"),
                         headers=_headers(traceparent=f"00-{trace}-{parent}-01"))
    assert refused.status_code == 404 and refused.headers["traceparent"].split("-")[1] == trace


def test_no_trace_header_when_tracing_is_off(gateway: RunningGateway, upstream: Any) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=_chat("hi", model="chat"),
                          headers=_headers(traceparent=f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"))
    assert "traceparent" not in response.headers
    assert "traceparent" not in upstream.requests[-1].headers


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A tiny OTLP/HTTP receiver (JSON) on a real port, in a thread."""
    received: list[dict[str, Any]] = []
    port = free_port()

    async def traces(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    import asyncio

    loop = asyncio.new_event_loop()
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/v1/traces", received
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def test_spans_are_exported_over_otlp_with_gen_ai_attributes(
    make_gateway: Make, upstream: Any, otlp_receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    endpoint, received = otlp_receiver
    text = policy_text(upstream.base_url) + (
        f"telemetry:\n  tracing: {{enabled: true, otlp_endpoint: '{endpoint}', flush_interval_s: 0.1}}\n")
    running = make_gateway(text)
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    httpx.post(f"{running.base_url}/chat/completions", json=_chat("hello world", model="chat"),
               headers=_headers(traceparent=f"00-{trace}-{parent}-01"))
    httpx.post(f"{running.base_url}/chat/completions", json=_chat("hi", model="chat", stream=True), headers=_headers())
    import time

    deadline = time.monotonic() + 15
    while sum(len(r["resourceSpans"][0]["scopeSpans"][0]["spans"]) for r in received) < 2:
        assert time.monotonic() < deadline, "no spans arrived"
        time.sleep(0.05)
    spans = [s for r in received for s in r["resourceSpans"][0]["scopeSpans"][0]["spans"]]
    first = next(s for s in spans if s["traceId"] == trace)
    assert first["parentSpanId"] == parent
    attributes = {a["key"]: next(iter(a["value"].values())) for a in first["attributes"]}
    assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == "chat"
    assert attributes["gen_ai.response.model"] == "mock-model" and int(attributes["gen_ai.usage.input_tokens"]) > 0
    assert "hello" not in json.dumps(spans)  # no prompt text in a span
    assert 'gateway_spans_exported_total{result="ok"}' in running.metrics()


def test_access_log_has_every_field_and_no_text(
    make_gateway: Make, upstream: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(policy_text(upstream.base_url, access_log="true") + TELEMETRY)
    secret_words = "purple-elephant-sentence"
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for stream in (False, True):
            response = httpx.post(f"{running.base_url}/chat/completions",
                                  json=_chat(secret_words, model="chat", stream=stream), headers=_headers())
            assert response.status_code == 200
        httpx.post(f"{running.base_url}/chat/completions", json=_chat(secret_words, model="nope"), headers=_headers())
    lines = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert len(lines) == 3
    required = {"request_id", "endpoint", "model", "tenant", "key", "provider", "target", "status", "error",
                "total_ms", "upstream_ms", "overhead_ms", "first_chunk_ms", "prompt_tokens", "completion_tokens",
                "cost_usd", "cache", "guards", "attempts", "policy_version", "trace", "stream"}
    for line in lines:
        assert required <= set(line), required - set(line)
        assert secret_words not in json.dumps(line)
    plain, streamed, missing = lines
    assert plain["tenant"] == "acme" and plain["key"] == "full" and plain["target"] == "mock/mock-model"
    assert plain["prompt_tokens"] > 0 and plain["completion_tokens"] > 0 and plain["status"] == 200
    assert streamed["first_chunk_ms"] is not None and streamed["stream"] is True
    assert missing["status"] == 404 and missing["error"] == "model_not_found" and missing["model"] == "unknown"
    assert plain["trace"].startswith("00-")


def test_metrics_off_record_nothing_and_keep_the_access_log(
    make_gateway: Make, upstream: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """`server.metrics: false`: no /metrics, and the per-request metrics and quality signals are not recorded
    (a feature that is off costs nothing); the access log stays."""
    running = make_gateway(policy_text(upstream.base_url, access_log="true", metrics="false") + TELEMETRY)
    assert not any(stage.name == "quality" for stage in running.gateway.runtime.pipeline.stages)
    assert all(getattr(stage, "quality", None) is None for stage in running.gateway.runtime.pipeline.stages)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for stream in (False, True):
            response = httpx.post(f"{running.base_url}/chat/completions",
                                  json=_chat("I'm sorry, but I can't", model="chat", stream=stream),
                                  headers=_headers())
            assert response.status_code == 200
    assert httpx.get(f"{running.url}/metrics").status_code == 404
    exposition = running.gateway.metrics.render().decode()
    for name in ("gateway_requests_total{", "gateway_request_duration_seconds_count{", "gateway_tenant_requests_total{",
                 "gateway_quality_checked_total{", "gateway_cost_usd_total{", "gateway_tokens_total{"):
        assert name not in exposition, name
    assert "gateway_requests_in_flight 0.0" in exposition
    lines = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert len(lines) == 2 and lines[0]["prompt_tokens"] > 0 and lines[1]["stream"] is True


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields", [{"completion_tokens": -100_000}, {"prompt_tokens": -7},
                                    {"prompt_tokens_details": {"cached_tokens": -5}}])
def test_usage_an_upstream_gets_wrong_is_estimated_without_accounting_too(
    make_gateway: Make, upstream: Any, monkeypatch: pytest.MonkeyPatch, stream: bool, fields: dict[str, object],
) -> None:
    """No accounting stage: negative usage still never makes a cost below 0 nor takes a token counter down
    (prometheus counters only go up); the answer's tokens are the gateway's estimate, marked as such."""
    from tests.support import mock_upstream

    real = mock_upstream.chat_usage
    monkeypatch.setattr(mock_upstream, "chat_usage",
                        lambda prompt, completion, details=False: {**real(prompt, completion, details), **fields})
    gateway = make_gateway(policy_text(upstream.base_url)
                           + "prices:\n  mock-model: {input_per_mtok: 1000, output_per_mtok: 1000}\n")
    body = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    with httpx.stream("POST", gateway.base_url + "/chat/completions", json=body, headers=_headers(),
                      timeout=20) as response:
        response.read()
    assert response.status_code == 200, response.text
    if not stream:
        assert float(response.headers["x-gateway-cost-usd"]) > 0
    metrics = gateway.metrics()
    for kind in ("prompt", "completion"):
        assert _value(metrics, "gateway_tokens_total", model="chat", kind=kind) > 0
    assert _value(metrics, "gateway_cost_usd_total", model="chat") > 0


def test_access_lines_of_guard_blocks_name_the_guards_and_the_attempt_that_answered(
    make_gateway: Make, upstream: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """A request an input guard blocks logs what the guards did (as the client's `x-gateway-guards` says); an
    answer an output guard blocks (a 200 that ends with `content_filter`) logs them too, and its one attempt `ok`."""
    guards = ("guards:\n  global:\n    words: {kind: denylist, terms: [forbidden-word], action: block}\n"
              "    echoed: {kind: denylist, terms: [echoed-word], action: block, places: [output]}\n")
    running = make_gateway(policy_text(upstream.base_url, access_log="true") + guards)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        blocked_in = httpx.post(f"{running.base_url}/chat/completions", json=_chat("a forbidden-word here"),
                                headers=_headers())
        blocked_out = httpx.post(f"{running.base_url}/chat/completions", json=_chat("say echoed-word"),
                                 headers=_headers())
    assert blocked_in.status_code == 400 and blocked_in.json()["error"]["code"] == "content_policy_violation"
    assert blocked_out.status_code == 200 and blocked_out.json()["choices"][0]["finish_reason"] == "content_filter"
    lines = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    first, second = lines
    assert first["status"] == 400 and first["guards"] == blocked_in.headers["x-gateway-guards"]
    assert "words" in first["guards"] and first["attempts"] == []
    assert second["status"] == 200 and second["guards"] == blocked_out.headers["x-gateway-guards"]
    assert second["attempts"] == [{"target": second["target"], "outcome": "ok"}], second


def test_a_common_stream_is_checked_by_its_finish_and_a_cut_one_is_recorded_unchecked(
        telemetry_gateway: RunningGateway) -> None:
    """The common stream (no JSON asked, no tools, a text no refusal opens with) is read by the provider's decode
    and ended by the telemetry stage (no stream stage of its own): counted once, by its finish reason. A stream
    the upstream cuts is not checked (it has no verdict), and is still counted as a request."""
    url = telemetry_gateway.base_url
    with httpx.Client(headers=_headers()) as client:
        for _ in range(2):
            plain = client.post(f"{url}/chat/completions", json=_chat("Hello there, friend.", stream=True))
            assert plain.status_code == 200 and "[DONE]" in plain.text
        cut = client.post(f"{url}/chat/completions", json=_chat("x", model="fault-reset-after-3", stream=True))
        assert cut.status_code == 200 and "[DONE]" not in cut.text
    metrics = telemetry_gateway.metrics()
    target = "mock-fast/fault-echo"
    assert _value(metrics, "gateway_quality_checked_total", model="fault-echo", target=target) == 2
    assert _value(metrics, "gateway_quality_finish_reasons_total", model="fault-echo", target=target,
                  reason="stop") == 2
    assert _value(metrics, "gateway_quality_signals_total", model="fault-echo", target=target, signal="truncated") == 0
    cut_target = "mock-fast/fault-reset-after-3"
    assert _value(metrics, "gateway_quality_checked_total", model="fault-reset-after-3", target=cut_target) == 0
    requests = sum(_value(metrics, "gateway_tenant_requests_total", tenant="acme", key="full",
                          model="fault-reset-after-3", status=status) for status in ("502", "504", "499"))
    assert requests == 1


def test_a_quality_reader_failing_at_a_streams_end_is_logged_and_the_request_still_recorded(
        telemetry_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the common stream's reader at the end (injected) is logged; the request is recorded all the same
    (the telemetry stage ends the reader in its own end hook, before it records the request)."""
    from gateway.telemetry.quality_reading import PlainStreamQuality

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(PlainStreamQuality, "end", broken)
    url = telemetry_gateway.base_url
    with caplog.at_level(logging.ERROR, logger="gateway.telemetry"):
        response = httpx.post(f"{url}/chat/completions", json=_chat("Hello there.", stream=True), headers=_headers())
    assert response.status_code == 200 and "[DONE]" in response.text
    assert any(r.getMessage() == "quality signals failed at a stream's end" for r in caplog.records)
    metrics = telemetry_gateway.metrics()
    assert _value(metrics, "gateway_quality_checked_total", model="fault-echo") == 0
    assert _value(metrics, "gateway_tenant_requests_total", tenant="acme", key="full", model="fault-echo",
                  status="200") == 1
    assert _value(metrics, "gateway_requests_in_flight") == 0 and "gateway_requests_in_flight" in metrics
