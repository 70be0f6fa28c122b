"""A hit served in the other form (a stored stream for a non-streamed request, a stored body as a stream) is the
upstream's answer exactly, or a miss: never content, calls, reasoning or usage that differ from what the upstream
sends in that form. End to end with the mock upstream's odd answers and the `openai` SDK; then the conversion's
edges (fields the mock does not send, entries that are not answers) directly and through Redis.
"""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
import redis

from gateway.cache.entry import Entry, decode_entry, encode_entry
from gateway.cache.replay import ReplaySource, Unconvertible, assemble_body, split_body
from gateway.cache.service import ResponseCache
from gateway.policy import compile_text
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk, UsageReport
from gateway.schemas.openai import Usage
from gateway.store.memory import MemoryStore
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.processes import running
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy

# Answers the other form carries exactly: a hit must be served.
EXACT = ["mock-model", "fault-cached-reasoning", "fault-usage-riding", "fault-interleaved-tools",
         "fault-odd-arguments", "fault-echo-tool", "fault-echo-refusal", "fault-no-usage"]
# Answers it does not (custom and legacy calls, content parts, object arguments, reasoning details): a miss.
INEXACT = ["fault-custom-tool", "fault-legacy-call", "fault-content-parts", "fault-object-arguments",
           "fault-echo-reasoning"]
KINDS = EXACT + INEXACT
MODELS = "".join(f"c{i}: {{provider: mock, model: {kind}, cache: {{}}}}\nr{i}: {{provider: mock, model: {kind}}}\n"
                 for i, kind in enumerate(KINDS))


@pytest.fixture(scope="module")
def forms() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        running = RunningGateway(cache_policy(mock.base_url, models=MODELS), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
        running.start()
        yield running, mock
        running.stop()


def fold(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's answer, whatever its chunking: each choice's strings joined, tool calls joined by index, other
    lists concatenated (empty values dropped), and every usage object it carried, in order."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            _merge(choices.setdefault(choice["index"], {}), {k: v for k, v in choice.items() if k != "index"})
    return {"choices": choices, "usage": [chunk["usage"] for chunk in chunks if chunk.get("usage")]}


def _merge(into: dict[Any, Any], piece: dict[str, Any]) -> None:
    for name, value in piece.items():
        if value in (None, "", [], {}):
            continue
        if isinstance(value, str) and name not in ("id", "type", "role", "finish_reason"):
            into[name] = into.get(name, "") + value
        elif isinstance(value, dict):
            _merge(into.setdefault(name, {}), value)
        elif isinstance(value, list) and all(isinstance(item, dict) and "index" in item for item in value):
            calls = into.setdefault(name, {})
            for item in value:
                _merge(calls.setdefault(item["index"], {}), {k: v for k, v in item.items() if k != "index"})
        elif isinstance(value, list):
            into.setdefault(name, []).extend(value)
        else:
            into[name] = value


def ask(api: openai.OpenAI, alias: str, text: str, stream: bool) -> tuple[str, Any]:
    """The cache's verdict, and the answer as the client got it: a body's JSON (but its id and time), or a stream's
    `fold`. The SDK must read either."""
    messages: Any = [{"role": "user", "content": text}]
    if not stream:
        raw = api.chat.completions.with_raw_response.create(model=alias, messages=messages, temperature=0)
        raw.parse()
        body = json.loads(raw.http_response.content)
        return raw.headers.get("x-gateway-cache", ""), {k: v for k, v in body.items() if k not in ("id", "created")}
    streamed = api.chat.completions.with_raw_response.create(model=alias, messages=messages, temperature=0,
                                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk.to_dict(warnings=False) for chunk in streamed.parse()]
    return streamed.headers.get("x-gateway-cache", ""), fold(chunks)


@pytest.mark.parametrize(("stored", "served"), [(True, False), (False, True), (True, True)],
                         ids=["stream-served-whole", "body-served-streamed", "stream-replayed"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_hit_in_either_form_is_the_upstreams_answer_or_a_miss(
    forms: tuple[RunningGateway, MockUpstream], kind: str, stored: bool, served: bool,
) -> None:
    gw, _ = forms
    api = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0)
    alias = KINDS.index(kind)
    text = f"Please note: {kind} {stored} {served} {uuid.uuid4().hex[:6]}"
    assert ask(api, f"c{alias}", text, stored)[0] == "miss"
    time.sleep(0.1)  # the entry is written after the answer
    status, got = ask(api, f"c{alias}", text, served)
    direct = ask(api, f"r{alias}", text, served)[1]  # what the upstream sends in that form
    assert got == direct
    assert status == ("hit" if kind in EXACT or stored == served else "miss")  # the same form: no conversion
    if status == "miss":  # the new answer replaced the entry in its own form: the next one in that form hits
        time.sleep(0.1)
        assert ask(api, f"c{alias}", text, served) == ("hit", direct)


# -- the conversion's edges, on entries the mock does not make -----------------------------------------------

CHAT = Endpoint.CHAT


def body(message: dict[str, Any], **top: Any) -> bytes:
    return msgspec.json.encode({"id": "x", "object": "chat.completion", "created": 1, "model": "m", **top,
                                "choices": [{"index": 0, "message": {"role": "assistant", **message},
                                             "logprobs": None, "finish_reason": "stop"}]})


def chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> bytes:
    return msgspec.json.encode({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", **top,
                                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
         "prompt_tokens_details": {"cached_tokens": 1, "audio_tokens": 7},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 4}}


@pytest.mark.parametrize("message", [
    {"content": "hi", "audio": {"id": "a1", "data": "UklGRg==", "transcript": "hi", "expires_at": 1}},
    {"content": "hi", "annotations": [{"type": "url_citation", "url_citation": {"url": "https://x"}}]},
    {"content": [{"type": "text", "text": "hi"}]},
    {"content": None, "function_call": {"name": "f", "arguments": "{}"}},
    {"content": None, "tool_calls": [{"id": "t", "type": "custom", "custom": {"name": "f", "input": "x"}}]},
    {"content": None, "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": {}}}]},
    {"content": "hi", "reasoning_details": [{"type": "reasoning.text", "text": "because"}]},
    {"content": "hi", "some_new_field": "value"},
])
def test_a_body_that_a_stream_would_not_carry_exactly_is_not_converted(message: dict[str, Any]) -> None:
    with pytest.raises(Unconvertible):
        ReplaySource(Entry("body", 0, body=body(message)), CHAT)


@pytest.mark.parametrize("delta", [
    {"audio": {"id": "a1", "data": "UklGRg=="}},
    {"annotations": [{"type": "url_citation"}]},
    {"content": [{"type": "text", "text": "hi"}]},
    {"function_call": {"name": "f", "arguments": "{}"}},
    {"tool_calls": [{"index": 0, "id": "t", "type": "custom", "custom": {"name": "f", "input": "x"}}]},
    {"tool_calls": [{"index": 0, "id": "t", "type": "function", "function": {"name": "f", "arguments": {}}}]},
    {"reasoning_details": [{"type": "reasoning.text", "text": "because"}]},
])
def test_a_stream_that_a_body_would_not_carry_exactly_is_not_assembled(delta: dict[str, Any]) -> None:
    with pytest.raises(Unconvertible):
        assemble_body(Entry("stream", 0, chunks=[chunk({"role": "assistant", "content": ""}), chunk(delta),
                                                 chunk({}, "stop")]), CHAT)


def test_what_both_forms_carry_crosses_over_whole() -> None:
    """The service tier, reasoning text, empty annotations and null fields, and the usage object with every
    field the upstream put in it."""
    message = {"content": "Done.", "refusal": None, "reasoning_content": "because", "annotations": [],
               "audio": None, "function_call": None}
    source = ReplaySource(Entry("body", 0, body=body(message, service_tier="priority", usage=USAGE),
                                usage=Usage(3, 2, 5)), CHAT)
    events = source._events or []
    chunks = [msgspec.json.decode(e.payload) for e in events if isinstance(e, Chunk)]
    reports = [e for e in events if isinstance(e, UsageReport)]
    assert all(c["service_tier"] == "priority" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["reasoning_content"] == "because"
    assert len(reports) == 1 and msgspec.json.decode(reports[0].payload or b"")["usage"] == USAGE
    stream = Entry("stream", 0, chunks=[chunk({"role": "assistant", "content": ""}, service_tier="priority"),
                                        chunk({"reasoning_content": "be"}), chunk({"reasoning_content": "cause"}),
                                        chunk({"content": "Done."}, obfuscation="xyz"), chunk({}, "stop")],
                   usage=Usage(3, 2, 5), usage_chunk=msgspec.json.encode({"id": "c", "choices": [], "usage": USAGE}))
    whole = msgspec.json.decode(assemble_body(stream, CHAT))
    assert whole["service_tier"] == "priority" and "obfuscation" not in whole
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Done.", "refusal": None,
                                              "reasoning_content": "because"}
    assert whole["usage"] == USAGE  # the upstream's object, `audio_tokens` and all


def test_usage_is_replayed_once_and_never_an_estimate() -> None:
    riding = [chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop", usage=USAGE)]
    events = ReplaySource(Entry("stream", 0, chunks=riding, usage=Usage(3, 2, 5)), CHAT)._events or []
    assert [e.payload for e in events if isinstance(e, UsageReport)] == [None]  # it rode the last chunk: not again
    estimated = Entry("body", 0, body=body({"content": "hi"}), usage=Usage(9, 9, 18), usage_estimated=True)
    assert not [e for e in ReplaySource(estimated, CHAT)._events or [] if isinstance(e, UsageReport)]
    assert "usage" not in msgspec.json.decode(
        assemble_body(Entry("stream", 0, chunks=riding[:1], usage=Usage(9, 9, 18), usage_estimated=True), CHAT))


@pytest.mark.parametrize("payload", [b"[1, 2]", b"null", b'"text"', b'{"choices": [null]}',
                                     b'{"choices": {"0": 1}}', b"not json"])
def test_an_entry_that_is_not_an_answer_is_not_converted(payload: bytes) -> None:
    with pytest.raises(Unconvertible):
        split_body(payload, CHAT)
    with pytest.raises(Unconvertible):
        assemble_body(Entry("stream", 0, chunks=[payload]), CHAT)


@pytest.fixture
def redis_gateway(upstream: MockUpstream) -> Iterator[tuple[RunningGateway, redis.Redis, str]]:
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
        gw = RunningGateway(cache_policy(upstream.base_url, state=state),
                            {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url}).start()
        client = redis.Redis.from_url(url)
        try:
            yield gw, client, prefix
        finally:
            gw.stop()
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


@pytest.mark.parametrize("stored", [Entry("stream", 0, chunks=[b"[1, 2]"]),
                                    Entry("stream", 0, chunks=[b'{"choices": [null]}']),
                                    Entry("body", 0, body=b"[]"), Entry("body", 0, body=b'{"choices": [null]}')])
def test_a_decodable_entry_that_is_not_an_answer_is_a_miss_not_a_500(
    redis_gateway: tuple[RunningGateway, redis.Redis, str], stored: Entry,
) -> None:
    gw, client, prefix = redis_gateway
    request = {"model": "chat", "messages": [{"role": "user", "content": "odd entry"}], "temperature": 0,
               "stream": stored.kind == "body"}  # served in the other form: converted
    assert httpx.post(f"{gw.base_url}/chat/completions", json=request, headers=AUTH, timeout=20).status_code == 200
    time.sleep(0.2)
    (key,) = client.scan_iter(match=prefix + "cache:entry:*")
    client.set(key, encode_entry(stored, 1 << 20) or b"")
    answer = httpx.post(f"{gw.base_url}/chat/completions", json=request, headers=AUTH, timeout=20)
    assert answer.status_code == 200 and answer.headers["x-gateway-cache"] == "miss"


# -- the stored form's size, and what a hit saved ---------------------------------------------------------------

async def _worst_stall(seconds: float) -> float:
    """The longest the event loop this runs on went without a turn, over `seconds`."""
    loop = asyncio.get_running_loop()
    worst, last, end = 0.0, loop.time(), loop.time() + seconds
    while loop.time() < end:
        await asyncio.sleep(0.005)
        now = loop.time()
        worst, last = max(worst, now - last - 0.005), now
    return worst


def test_a_large_answer_is_compressed_off_the_event_loop() -> None:
    """A 7.6 MB embeddings answer: past `max_entry_bytes` (1 MiB) it is given up as soon as its compressed size
    passes the limit, within 16 MiB it is stored; neither holds the gateway's event loop (on the loop, its
    compression stalled every request of the process for over a second). The mock runs in a process of its own:
    in this one, its own JSON encoding would hold the interpreter."""
    port = free_port()
    models = "big: {provider: mock, model: text-embedding-3-small, cache: {max_entry_bytes: 16777216}}\n"
    command = [sys.executable, "-m", "tests.support.mock_upstream", "--port", str(port), "--api-key", UPSTREAM_KEY]
    with running(command, cwd=Path(__file__).parent.parent) as mock:
        assert mock.wait_for_output("listening", 20)
        gw = RunningGateway(cache_policy(f"http://127.0.0.1:{port}/v1", models=models),
                            {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        try:
            loop = gw.gateway.loop
            assert loop is not None
            body: dict[str, Any] = {"input": [f"text {i}" for i in range(120)], "dimensions": 3072}
            for alias, status in (("embed", "miss"), ("big", "miss"), ("big", "hit")):
                watch = asyncio.run_coroutine_threadsafe(_worst_stall(2.5), loop)
                time.sleep(0.05)
                answer = httpx.post(f"{gw.base_url}/embeddings", json={"model": alias, **body}, headers=AUTH,
                                    timeout=30)
                assert answer.status_code == 200 and len(answer.content) > 7_000_000
                assert answer.headers["x-gateway-cache"] == status
                assert watch.result() < 0.3, (alias, status)
            metrics = gw.metrics()
            assert 'gateway_cache_stores_total{model="embed",outcome="too_large"} 1.0' in metrics
            assert 'gateway_cache_stores_total{model="big",outcome="stored"} 1.0' in metrics
        finally:
            gw.stop()


async def test_a_large_entry_is_packed_and_unpacked_in_a_thread_and_a_small_one_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1.2 MB that compress to a few KiB: inflated inline on every hit (too large to keep decoded), it would hold
    the loop. A small entry stays on the loop: a thread hop costs more than its work."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def spy(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(func.__name__)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers: {mock: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE}}
        models: {chat: {provider: mock, model: m, cache: {}}}
        """), "p.yaml", {"NONE": "x"})
    cache = ResponseCache(policy, MemoryStore(), {}, Metrics(), TokenCounter())
    small, large = Entry("body", 1.0, body=b'{"a": 1}'), Entry("body", 1.0, body=b'{"a": "' + b"xyz" * 400_000 + b'"}')
    await cache.write("chat", "small", small, 60, None, 1 << 20)
    assert hops == []
    await cache.write("chat", "large", large, 60, None, 1 << 20)
    assert len(hops) == 1
    assert await cache.read("small", None, "chat") == small and len(hops) == 1
    assert await cache.read("large", None, "chat") == large and len(hops) == 2


def test_an_entry_is_never_larger_than_its_limit_and_compression_stops_past_it() -> None:
    text = b'{"v": "' + bytes(range(32, 127)) * 40_000 + b'"}'  # 3.8 MB, compresses about 100:1
    entry = Entry("body", 0, body=text)
    packed = encode_entry(entry, 1024, 1 << 20)
    assert packed is not None and len(packed) <= 1 << 20 and decode_entry(packed) == entry
    assert encode_entry(entry, 1024, 1024) is None  # compressed, still past 1 KiB
    assert encode_entry(Entry("body", 0, body=b"x" * 2_000_000), 1024, 1024) is None  # past what zlib could do
    small = Entry("body", 0, body=b'{"a": 1}')
    assert encode_entry(small, 1024, 256) is not None and encode_entry(small, 1024, 8) is None


PRICED = ("priced: {cache: {}, targets: [{provider: mock, model: fault-cached-reasoning, price: {input_per_mtok: 3, "
          "output_per_mtok: 12, cached_input_per_mtok: 0.3, reasoning_per_mtok: 20}}]}\n")


def test_a_hit_saves_what_accounting_charged_for_the_answer(upstream: MockUpstream) -> None:
    """The alias's own price (not the price table's), cached and reasoning tokens at their own rates."""
    gw = RunningGateway(cache_policy(upstream.base_url, models=PRICED), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        body = {"model": "priced", "messages": [{"role": "user", "content": "What does this cost me?"}],
                "temperature": 0}
        miss = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
        charged = float(miss.headers["x-gateway-cost-usd"])
        usage = miss.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] and charged > 0
        time.sleep(0.1)
        assert httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH).headers[
            "x-gateway-cache"] == "hit"
        saved = [line for line in gw.metrics().splitlines()
                 if line.startswith('gateway_cache_saved_usd_total{model="priced"}')]
        assert saved and float(saved[0].split()[-1]) == pytest.approx(charged, rel=1e-6)
    finally:
        gw.stop()


def test_every_miss_meant_to_be_stored_ends_in_one_store_outcome(upstream: MockUpstream) -> None:
    """An upstream's error, a refusal the gateway made upstream of no answer: `uncacheable`, as a cut stream is."""
    gw = RunningGateway(cache_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        body = {"model": "chat", "messages": [{"role": "user", "content": "fail me"}], "temperature": 0}
        for fault in ("fault-status-500", "fault-context-length"):
            upstream.override = fault
            assert httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH).status_code >= 400
        upstream.override = None
        metrics = gw.metrics()
        assert 'gateway_cache_lookups_total{model="chat",result="miss"} 2.0' in metrics
        assert 'gateway_cache_stores_total{model="chat",outcome="uncacheable"} 2.0' in metrics
    finally:
        gw.stop()
