"""W3C Trace Context and the OpenTelemetry conventions, point by point, through a real gateway.

`tracestate` goes upstream beside `traceparent` for every provider kind (W3C: a vendor receiving it MUST send it
on), validated and bounded as the spec says; two `traceparent` headers start a new trace (the W3C test suite's
`test_traceparent_duplicated`); the reserved trace-flags bits never go out. Spans exported over OTLP follow the HTTP
server span status rules and the GenAI conventions' values. The cases mirror the W3C test suite
(github.com/w3c/trace-context, test/test.py) where it has one.
"""

from __future__ import annotations

import asyncio
import secrets
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.telemetry.tracing import parse_traceparent, parse_tracestate
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, free_port, policy_text
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream

TRACING = "telemetry:\n  tracing: {enabled: true}\n"
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _traceparent(flags: str = "01") -> tuple[str, str, str]:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    return trace, parent, f"00-{trace}-{parent}-{flags}"


@pytest.fixture
def traced(make_gateway: Any, upstream: MockUpstream) -> RunningGateway:
    return make_gateway(policy_text(upstream.base_url) + TRACING)


# ------------------------------------------------------------------------------------------------- tracestate


def test_tracestate_list_members_pass_as_the_spec_reads_them() -> None:
    assert parse_tracestate([b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]) == b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    # several headers are one list, in order; optional whitespace and empty members go
    assert parse_tracestate([b"foo=1,bar=2", b"rojo=1,congo=2", b"baz=3"]) == b"foo=1,bar=2,rojo=1,congo=2,baz=3"
    assert parse_tracestate([b"foo=1 \t , \t bar=2, \t baz=3"]) == b"foo=1,bar=2,baz=3"
    assert parse_tracestate([b"", b"foo=1", b" ,\t"]) == b"foo=1"
    assert parse_tracestate([b""]) is None and parse_tracestate([b" , "]) is None
    # a value's leading space is its own (W3C: "all leading spaces MUST be preserved")
    assert parse_tracestate([b"foo= 1"]) == b"foo= 1"
    every_key_char = b"abcdefghijklmnopqrstuvwxyz0123456789_-*/"
    every_value_char = bytes(c for c in range(0x20, 0x7F) if c not in b",=")
    assert parse_tracestate([every_key_char + b"=" + every_value_char]) == every_key_char + b"=" + every_value_char
    tenant_key = every_key_char + b"@a-z0-9_-*/"
    assert parse_tracestate([tenant_key + b"=1"]) == tenant_key + b"=1"


@pytest.mark.parametrize("headers", [
    [b"foo=1,foo=1"], [b"foo=1,foo=2"], [b"foo=1", b"foo=2"],  # a key twice
    [b"foo =1"], [b"FOO=1"], [b"foo.bar=1"], [b"1foo=1"],  # keys W3C does not allow
    [b"foo@=1,bar=2"], [b"@foo=1,bar=2"], [b"foo@@bar=1,bar=2"], [b"foo@bar@baz=1,bar=2"],
    [b"foo=bar=baz"], [b"foo=,bar=3"], [b"foo=1\x7f"], [b"foo=caf\xc3\xa9"], [b"foo"],  # values it does not
    [b"foo=1", b"z" * 257 + b"=1"], [b"foo=1", b"t" * 242 + b"@v=1"], [b"foo=1", b"t@" + b"v" * 15 + b"=1"],
    [b",".join(b"bar%02d=%02d" % (n, n) for n in range(1, 34))],  # 33 members
])
def test_an_invalid_tracestate_is_dropped_whole(headers: list[bytes]) -> None:
    assert parse_tracestate(headers) is None


def test_the_longest_keys_and_32_members_are_valid() -> None:
    assert parse_tracestate([b"foo=1", b"z" * 256 + b"=1"]) is not None
    assert parse_tracestate([b"foo=1", b"t" * 241 + b"@" + b"v" * 14 + b"=1"]) is not None
    members = [b"bar%02d=%02d" % (n, n) for n in range(1, 33)]
    assert parse_tracestate([b",".join(members[:10]), b",".join(members[10:])]) == b",".join(members)


def test_a_tracestate_over_512_characters_loses_whole_members_long_ones_first() -> None:
    """W3C "tracestate Limits": truncate whole entries; those over 128 characters first, then from the end."""
    long_member = b"long=" + b"x" * 200
    shorts = [b"k%02d=" % n + b"v" * 40 for n in range(12)]  # 44 characters each: 12 of them, 539 with commas
    kept = parse_tracestate([shorts[0], long_member, b",".join(shorts[1:])])
    assert kept == b",".join(shorts[:11])  # the long one, then the last one, went
    assert len(kept) <= 512
    exactly = [b"k%02d=" % n + b"v" * 59 for n in range(8)]  # 8 x 63 + 7 commas = 511
    assert parse_tracestate([b",".join(exactly)]) == b",".join(exactly)


def test_tracestate_goes_upstream_beside_traceparent(traced: RunningGateway, upstream: MockUpstream) -> None:
    trace, _, parent = _traceparent()
    response = httpx.post(f"{traced.base_url}/chat/completions", json=CHAT, timeout=20,
                          headers=[*AUTH.items(), ("traceparent", parent), ("tracestate", "congo=t61rcWkgMzE"),
                                   ("TraceState", "rojo=00f067aa0ba902b7 ,, baz=3")])
    assert response.status_code == 200
    sent = upstream.requests[-1].headers
    assert sent["traceparent"] == response.headers["traceparent"] and sent["traceparent"].split("-")[1] == trace
    assert sent["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,baz=3"
    assert "tracestate" not in response.headers  # the answer echoes `traceparent` alone


def test_tracestate_goes_upstream_only_with_a_trace_that_goes_on(traced: RunningGateway,
                                                                 upstream: MockUpstream) -> None:
    """W3C: a vendor that failed to parse `traceparent` MUST NOT parse `tracestate`; a restart cleans it up."""
    valid = _traceparent()[2]
    for traceparent, forwarded in ((valid, "foo=1"), (None, None), ("00-xyz-00f067aa0ba902b7-01", None),
                                   (f"00-{'0' * 32}-00f067aa0ba902b7-01", None)):
        headers = {**AUTH, "tracestate": "foo=1"}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        response = httpx.post(f"{traced.base_url}/chat/completions", json=CHAT, headers=headers, timeout=20)
        assert response.status_code == 200
        sent = upstream.requests[-1].headers
        assert "traceparent" in sent and sent.get("tracestate") == forwarded, traceparent


def test_an_invalid_tracestate_leaves_the_trace_going_on(traced: RunningGateway, upstream: MockUpstream) -> None:
    """W3C: failure to parse `tracestate` MUST NOT affect the parsing of `traceparent`."""
    for tracestate, forwarded in (("foo=1,bar=2", "foo=1,bar=2"), ("foo=1,foo=2", None), ("foo=1,BAR=2", None)):
        trace, _, parent = _traceparent()
        response = httpx.post(f"{traced.base_url}/chat/completions", json=CHAT, timeout=20,
                              headers={**AUTH, "traceparent": parent, "tracestate": tracestate})
        sent = upstream.requests[-1].headers
        assert response.headers["traceparent"].split("-")[1] == trace and sent["traceparent"].split("-")[1] == trace
        assert sent.get("tracestate") == forwarded, tracestate


def test_tracing_off_forwards_no_trace_context(make_gateway: Any, upstream: MockUpstream) -> None:
    on, off = make_gateway(policy_text(upstream.base_url) + TRACING), make_gateway(policy_text(upstream.base_url))
    _, _, parent = _traceparent()
    headers = {**AUTH, "traceparent": parent, "tracestate": "congo=t61rcWkgMzE"}
    httpx.post(f"{on.base_url}/chat/completions", json=CHAT, headers=headers, timeout=20)
    assert upstream.requests[-1].headers.get("tracestate") == "congo=t61rcWkgMzE"
    httpx.post(f"{off.base_url}/chat/completions", json=CHAT, headers=headers, timeout=20)
    assert "traceparent" not in upstream.requests[-1].headers and "tracestate" not in upstream.requests[-1].headers


@pytest.fixture(scope="module")
def other_kinds() -> Iterator[tuple[MockAnthropic, MockGemini, MockUpstream]]:
    with MockAnthropic("sk-ant-trace") as claude, MockGemini("gemini-trace") as gemini, \
            MockUpstream(api_key=UPSTREAM_KEY) as azure:
        yield claude, gemini, azure


def test_every_provider_kind_forwards_the_trace_context(other_kinds: tuple[MockAnthropic, MockGemini, MockUpstream],
                                                        make_gateway: Any) -> None:
    claude, gemini, azure = other_kinds
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANT_KEY}}
          gem: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEM_KEY}}
          az: {{kind: azure, base_url: {azure.base_url.removesuffix("/v1")}, api_key_env: MOCK_UPSTREAM_KEY,
               azure: {{api_version: "2024-10-21"}}}}
        models:
          claude: {{provider: claude, model: claude-mock}}
          gem: {{provider: gem, model: gemini-mock}}
          az: {{provider: az, model: mock-model}}
        """) + TRACING
    running = make_gateway(text, env={"ANT_KEY": "sk-ant-trace", "GEM_KEY": "gemini-trace"})
    for model, mock in (("claude", claude), ("gem", gemini), ("az", azure)):
        trace, _, parent = _traceparent()
        response = httpx.post(f"{running.base_url}/chat/completions", timeout=20,
                              json={**CHAT, "model": model, "max_tokens": 16},
                              headers={**AUTH, "traceparent": parent, "tracestate": "congo=t61rcWkgMzE"})
        assert response.status_code == 200, (model, response.text)
        sent = mock.requests[-1].headers
        assert sent["traceparent"] == response.headers["traceparent"] and trace in sent["traceparent"], model
        assert sent["tracestate"] == "congo=t61rcWkgMzE", model


# ------------------------------------------------------------------------------------------------ traceparent


def test_two_traceparent_headers_start_a_new_trace(traced: RunningGateway, upstream: MockUpstream) -> None:
    """The W3C test suite's `test_traceparent_duplicated`: which of the two is the parent is unknowable."""
    first, _, one = _traceparent()
    second, _, other = _traceparent()
    response = httpx.post(f"{traced.base_url}/chat/completions", json=CHAT, timeout=20,
                          headers=[*AUTH.items(), ("traceparent", one), ("traceparent", other),
                                   ("tracestate", "foo=1")])
    echoed = response.headers["traceparent"]
    assert echoed.split("-")[1] not in (first, second)
    assert upstream.requests[-1].headers["traceparent"] == echoed and "tracestate" not in upstream.requests[-1].headers


@pytest.mark.parametrize(("flags", "sent"), [("ff", "01"), ("fe", "00"), ("09", "01"), ("02", "00")])
def test_reserved_trace_flags_are_zero_in_what_goes_out(traced: RunningGateway, upstream: MockUpstream,
                                                        flags: str, sent: str) -> None:
    """W3C "Other Flags": their behaviour is not defined, and vendors MUST set them to zero."""
    trace, span, parent = _traceparent(flags)
    assert parse_traceparent(parent.encode()) == (trace.encode(), span.encode(), sent.encode())
    response = httpx.post(f"{traced.base_url}/chat/completions", json=CHAT, headers={**AUTH, "traceparent": parent},
                          timeout=20)
    assert response.headers["traceparent"].endswith(f"-{sent}") and trace in response.headers["traceparent"]
    assert upstream.requests[-1].headers["traceparent"] == response.headers["traceparent"]


# ------------------------------------------------------------------------------------------------- OTLP spans


@pytest.fixture
def collector() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OTLP/HTTP receiver (JSON) on a real port, in a thread."""
    received: list[dict[str, Any]] = []
    port = free_port()

    async def traces(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
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


def _spans(received: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        spans = [s for r in received for rs in r["resourceSpans"] for ss in rs["scopeSpans"] for s in ss["spans"]]
        if len(spans) >= count:
            return spans
        assert time.monotonic() < deadline, f"{len(spans)} of {count} spans arrived"
        time.sleep(0.05)


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    return {a["key"]: next(iter(a["value"].values())) for a in span["attributes"]}


def test_spans_follow_the_http_server_status_rules_and_the_gen_ai_values(
    make_gateway: Any, upstream: MockUpstream, collector: tuple[str, list[dict[str, Any]]],
) -> None:
    endpoint, received = collector
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  tracing: {{enabled: true, otlp_endpoint: '{endpoint}', flush_interval_s: 0.1}}\n"))
    cases: dict[str, tuple[str, int]] = {}
    for name, path, body, key in (
        ("ok", "chat/completions", CHAT, FULL_KEY),
        ("400", "chat/completions", {**CHAT, "model": "fault-status-400"}, FULL_KEY),
        ("429", "chat/completions", {**CHAT, "model": "fault-status-429"}, FULL_KEY),
        ("500", "chat/completions", {**CHAT, "model": "fault-status-500"}, FULL_KEY),
        ("404", "chat/completions", {**CHAT, "model": "nope"}, FULL_KEY),
        ("401", "chat/completions", CHAT, "gw-not-a-key-0123456789abcdef"),
        ("responses", "responses", {"model": "chat", "input": "hello"}, FULL_KEY),
        ("embeddings", "embeddings", {"model": "embed", "input": "hello"}, FULL_KEY),
        ("completions", "completions", {"model": "chat", "prompt": "hello"}, FULL_KEY),
    ):
        trace, _, parent = _traceparent()
        response = httpx.post(f"{running.base_url}/{path}", json=body, timeout=20,
                              headers={"Authorization": f"Bearer {key}", "traceparent": parent})
        cases[trace] = (name, response.status_code)
    spans = {cases[s["traceId"]][0]: s for s in _spans(received, len(cases)) if s["traceId"] in cases}
    assert {name: code for name, code in cases.values()}["500"] >= 500
    for name in ("ok", "400", "429", "404", "401", "responses", "embeddings", "completions"):
        assert spans[name]["status"].get("code", 0) == 0, (name, spans[name]["status"])  # unset: no error, no OK
    assert spans["500"]["status"]["code"] == 2  # STATUS_CODE_ERROR
    assert all(_attributes(spans[name]).get("error.type") for name in ("400", "429", "404", "401", "500"))
    ok = _attributes(spans["ok"])
    assert ok["gen_ai.provider.name"] == "openai"  # the provider `mock` is `kind: openai`
    assert ok["gateway.provider"] == "mock" and ok["gateway.endpoint"] == "chat"
    responses = _attributes(spans["responses"])
    assert responses["gen_ai.operation.name"] == "chat" and responses["gateway.endpoint"] == "responses"
    assert spans["responses"]["name"] == "chat chat"
    assert _attributes(spans["embeddings"])["gen_ai.operation.name"] == "embeddings"
    assert _attributes(spans["completions"])["gen_ai.operation.name"] == "text_completion"


def test_a_stream_the_client_left_leaves_the_span_status_unset(
    make_gateway: Any, upstream: MockUpstream, collector: tuple[str, list[dict[str, Any]]],
) -> None:
    endpoint, received = collector
    running = make_gateway(policy_text(upstream.base_url) + (
        f"telemetry:\n  tracing: {{enabled: true, otlp_endpoint: '{endpoint}', flush_interval_s: 0.1}}\n"))
    trace, _, parent = _traceparent()
    body = {"model": "fault-slow-stream-250", "stream": True,
            "messages": [{"role": "user", "content": "a b c d e f g h i j k"}]}
    with httpx.stream("POST", f"{running.base_url}/chat/completions", json=body, timeout=20,
                      headers={**AUTH, "traceparent": parent}) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break
    span = next(s for s in _spans(received, 1) if s["traceId"] == trace)
    assert _attributes(span)["http.response.status_code"] == "499"
    assert span["status"].get("code", 0) == 0
