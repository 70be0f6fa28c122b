"""Which spans go to the collector, and what their `error.type` says, through a real gateway and a real collector.

Sampling follows OpenTelemetry's default sampler, ParentBased(AlwaysOn): a request whose valid `traceparent` says
not sampled (flag 00) exports no span, though its trace context goes upstream and back as before; one with a sampled
parent or none is exported. A span's `error.type` is the error's code as the access log names it, for an error
raised before the answer and for a stream that failed, not the bare status.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import pytest

from tests.conftest import FULL_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.test_trace_context_spec import _attributes, _spans, _traceparent, collector

__all__ = ["collector"]  # the OTLP receiver fixture, shared with the trace context tests

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _exporting(make_gateway: Any, upstream: MockUpstream, endpoint: str, **server: object) -> RunningGateway:
    running: RunningGateway = make_gateway(policy_text(upstream.base_url, **server) + (
        f"telemetry:\n  tracing: {{enabled: true, otlp_endpoint: '{endpoint}', flush_interval_s: 0.1}}\n"))
    return running


def _settled(running: RunningGateway) -> None:
    """Every request has ended (a stream's span is queued at its end hook, which may follow its last byte): a span
    queued later is posted after theirs, so once it arrives, theirs would have."""
    deadline = time.monotonic() + 15
    while "gateway_requests_in_flight 0.0" not in running.metrics():
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)


def test_a_parent_not_sampled_exports_no_span_and_its_flag_goes_on(
    make_gateway: Any, upstream: MockUpstream, collector: tuple[str, list[dict[str, Any]]],
) -> None:
    endpoint, received = collector
    running = _exporting(make_gateway, upstream, endpoint)
    unsampled: list[str] = []
    for body in (CHAT, {**CHAT, "stream": True}, {**CHAT, "model": "nope"}):
        trace, parent_span, parent = _traceparent("00")
        response = httpx.post(f"{running.base_url}/chat/completions", json=body, timeout=20,
                              headers={**AUTH, "traceparent": parent})
        echoed = response.headers["traceparent"]
        version, echoed_trace, echoed_span, flags = echoed.split("-")
        assert (version, echoed_trace, flags) == ("00", trace, "00") and echoed_span != parent_span
        if response.status_code == 200:
            assert upstream.requests[-1].headers["traceparent"] == echoed
        unsampled.append(trace)
    _settled(running)
    sampled, _, parent = _traceparent("01")
    httpx.post(f"{running.base_url}/chat/completions", json=CHAT, headers={**AUTH, "traceparent": parent}, timeout=20)
    rooted = httpx.post(f"{running.base_url}/chat/completions", json=CHAT, headers=AUTH, timeout=20)
    root_trace = rooted.headers["traceparent"].split("-")[1]
    assert rooted.headers["traceparent"].endswith("-01")  # no parent: a new trace, sampled
    spans = _spans(received, 2)
    assert sorted(s["traceId"] for s in spans) == sorted([sampled, root_trace])
    assert not set(unsampled) & {s["traceId"] for s in spans}
    assert 'gateway_spans_exported_total{result="ok"} 2.0' in running.metrics()


def test_error_type_is_the_code_the_access_log_names(
    make_gateway: Any, upstream: MockUpstream, collector: tuple[str, list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint, received = collector
    running = _exporting(make_gateway, upstream, endpoint, access_log="true")
    cases: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for name, body in (("unknown model", {**CHAT, "model": "nope"}),
                           ("upstream 429", {**CHAT, "model": "fault-status-429"}),
                           ("stream cut", {**CHAT, "model": "fault-reset-after-3", "stream": True})):
            trace, _, parent = _traceparent("01")
            with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body, timeout=20,
                              headers={**AUTH, "traceparent": parent}) as response:
                for _ in response.iter_bytes():
                    pass
            cases[trace] = name
        spans = {cases[s["traceId"]]: _attributes(s) for s in _spans(received, len(cases)) if s["traceId"] in cases}
        _settled(running)
    logged = {cases[line["trace"].split("-")[1]]: line for line in
              (r.fields for r in caplog.records if r.name == "gateway.access")  # type: ignore[attr-defined]
              if line["trace"].split("-")[1] in cases}
    assert logged["unknown model"]["error"] == "model_not_found"
    for name in cases.values():
        assert logged[name]["error"], name
        assert spans[name]["error.type"] == logged[name]["error"], name
        assert spans[name]["http.response.status_code"] == str(logged[name]["status"]), name
