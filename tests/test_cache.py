"""The response cache end to end: a real gateway, the mock upstream counting requests, the `openai` SDK.

Memory backend here; Redis (shared replicas, outages, corrupt entries) in test_cache_redis.py.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.app import Gateway
from gateway.auth.keys import hash_key
from gateway.cache import CacheStage
from gateway.policy import PolicyError, compile_text
from tests.conftest import FULL_KEY, OTHER_TENANT_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}
ASK = [{"role": "user", "content": "What is the capital of France?"}]


def cache_policy(upstream_url: str, models: str = "", extra: str = "", state: str = "") -> str:
    """Two tenants; `chat` caches with the defaults, `fresh` for one second, `ro`/`wo` in one mode each."""
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: other, tenant: globex, hash: "{hash_key(OTHER_TENANT_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 2.5, output_per_mtok: 10}}
        models:
          chat: {{provider: mock, model: mock-model, cache: {{}}}}
          seeded: {{provider: mock, model: mock-model, cache: {{when: {{max_temperature: 0, seed: true}}}}}}
          fresh: {{provider: mock, model: mock-model, cache: {{ttl_s: 1}}}}
          ro: {{provider: mock, model: mock-model, cache: {{mode: read-only}}}}
          wo: {{provider: mock, model: mock-model, cache: {{mode: write-only}}}}
          tiny: {{provider: mock, model: mock-model, cache: {{max_entry_bytes: 256}}}}
          echo: {{provider: mock, model: fault-echo, cache: {{}}}}
          embed: {{provider: mock, model: text-embedding-3-small, cache: {{}}}}
          nocache: {{provider: mock, model: mock-model}}
        """) + textwrap.indent(textwrap.dedent(models), "  ") + state + extra


@pytest.fixture
def cached(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(cache_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def post(gw: RunningGateway, body: dict[str, Any], headers: dict[str, str] | None = None,
         path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{gw.base_url}/{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=20)


def chat(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": ASK, "temperature": 0, **extra}


def upstream_calls(upstream: MockUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path.endswith(("/completions", "/embeddings")))


def test_an_identical_request_is_answered_from_the_cache(cached: RunningGateway, upstream: MockUpstream) -> None:
    first = post(cached, chat())
    second = post(cached, chat(user="someone-else", metadata={"a": "b"}))  # fields left out of the key
    assert first.status_code == second.status_code == 200
    assert first.headers["x-gateway-cache"] == "miss" and "age" not in first.headers
    assert second.headers["x-gateway-cache"] == "hit" and int(second.headers["age"]) >= 0
    assert second.json() == first.json()
    assert "x-gateway-target" not in second.headers  # no target was chosen for a hit
    assert upstream_calls(upstream) == 1
    metrics = cached.metrics()
    assert 'gateway_cache_lookups_total{model="chat",result="hit"} 1.0' in metrics
    assert 'gateway_cache_saved_tokens_total{kind="completion",model="chat"} 20.0' in metrics
    assert 'gateway_cache_saved_usd_total{model="chat"}' in metrics
    assert 'gateway_tokens_total{kind="completion",model="chat"} 20.0' in metrics  # the hit spent none


def test_what_changes_the_answer_changes_the_key(cached: RunningGateway, upstream: MockUpstream) -> None:
    variants = [chat(), chat(max_tokens=5), chat(stop=["x"]), chat(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {}}}]), chat(response_format={"type": "json_object"}), chat(n=2),
        chat(unknown_field=1), chat(model="fresh"), {**chat(), "messages": [{"role": "user", "content": "Other?"}]}]
    for body in variants:
        assert post(cached, body).headers["x-gateway-cache"] == "miss"
    assert upstream_calls(upstream) == len(variants)
    # field order does not matter
    assert post(cached, {"temperature": 0, "messages": ASK, "model": "chat"}).headers["x-gateway-cache"] == "hit"


def test_sampled_requests_bypass_unless_seeded(cached: RunningGateway, upstream: MockUpstream) -> None:
    body = {"model": "chat", "messages": ASK}  # temperature absent: 1, sampled
    assert [post(cached, body).headers["x-gateway-cache"] for _ in range(2)] == ["bypass", "bypass"]
    seeded = {"model": "seeded", "messages": ASK, "temperature": 0.7, "seed": 7}
    assert [post(cached, seeded).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "hit"]
    assert upstream_calls(upstream) == 3


def test_tenants_never_share_entries(cached: RunningGateway, upstream: MockUpstream) -> None:
    assert post(cached, chat()).headers["x-gateway-cache"] == "miss"
    assert post(cached, chat(), OTHER).headers["x-gateway-cache"] == "miss"
    assert post(cached, chat(), OTHER).headers["x-gateway-cache"] == "hit"
    assert upstream_calls(upstream) == 2


def test_an_alias_without_cache_and_a_policy_without_any(cached: RunningGateway, upstream: MockUpstream) -> None:
    assert "x-gateway-cache" not in post(cached, chat(model="nocache")).headers
    plain = compile_text(policy_text(upstream.base_url), "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    stages = Gateway(plain).runtime.pipeline.stages
    assert not any(isinstance(stage, CacheStage) for stage in stages)  # off costs nothing: not even a stage
    assert any(isinstance(stage, CacheStage) for stage in cached.gateway.runtime.pipeline.stages)


def test_cache_control_no_cache_no_store_and_max_age(cached: RunningGateway, upstream: MockUpstream) -> None:
    assert post(cached, chat(), {"Cache-Control": "no-store"}).headers["x-gateway-cache"] == "miss"
    assert post(cached, chat()).headers["x-gateway-cache"] == "miss"  # no-store stored nothing
    assert post(cached, chat()).headers["x-gateway-cache"] == "hit"
    assert post(cached, chat(), {"Cache-Control": "no-cache"}).headers["x-gateway-cache"] == "miss"  # refresh
    assert post(cached, chat(), {"Cache-Control": "max-age=3600"}).headers["x-gateway-cache"] == "hit"
    assert post(cached, chat(), {"Cache-Control": "max-age=0, no-store"}).headers["x-gateway-cache"] == "miss"
    assert post(cached, chat(), {"Cache-Control": "no-cache, no-store"}).headers["x-gateway-cache"] == "bypass"
    assert upstream_calls(upstream) == 5


def test_modes_read_only_and_write_only(cached: RunningGateway, upstream: MockUpstream) -> None:
    assert [post(cached, chat(model="ro")).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "miss"]
    assert [post(cached, chat(model="wo")).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "miss"]
    assert upstream_calls(upstream) == 4


def test_ttl_expires(cached: RunningGateway, upstream: MockUpstream) -> None:
    assert [post(cached, chat(model="fresh")).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "hit"]
    time.sleep(1.3)
    assert post(cached, chat(model="fresh")).headers["x-gateway-cache"] == "miss"


def test_errors_truncated_streams_and_oversized_answers_are_never_stored(
    cached: RunningGateway, upstream: MockUpstream,
) -> None:
    upstream.override = "fault-status-500"
    assert post(cached, chat()).status_code == 502
    upstream.override = "fault-reset-after-3"
    with httpx.stream("POST", f"{cached.base_url}/chat/completions", json=chat(stream=True), headers=AUTH) as cut:
        text = "".join(cut.iter_text())
    assert '"error"' in text
    upstream.override = None
    assert post(cached, chat()).headers["x-gateway-cache"] == "miss"  # neither the error nor the cut stream
    assert [post(cached, chat(model="tiny")).headers["x-gateway-cache"] for _ in range(2)] == ["miss", "miss"]
    metrics = cached.metrics()
    assert 'gateway_cache_stores_total{model="tiny",outcome="too_large"} 2.0' in metrics
    assert 'gateway_cache_stores_total{model="chat",outcome="uncacheable"}' in metrics


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its `data:` payloads, checking the framing byte by byte."""
    assert raw.endswith(b"data: [DONE]\n\n")
    frames = raw.split(b"\n\n")
    assert frames[-1] == b""
    payloads = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame
        payloads.append(frame[6:].decode())
    return payloads


def test_a_stream_is_replayed_as_valid_sse_the_sdk_reassembles(cached: RunningGateway, upstream: MockUpstream) -> None:
    api = openai.OpenAI(base_url=cached.base_url, api_key=FULL_KEY, max_retries=0)
    kwargs: dict[str, Any] = {"model": "chat", "messages": ASK, "temperature": 0, "stream": True,
                              "stream_options": {"include_usage": True}}
    first = list(api.chat.completions.create(**kwargs))
    replay = api.chat.completions.with_raw_response.create(**kwargs)
    assert replay.headers["x-gateway-cache"] == "hit"
    again = list(replay.parse())
    text = "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    assert text == upstream.reply_text
    assert [c.model_dump() for c in again] == [c.model_dump() for c in first]  # the original chunking, usage too
    assert again[-1].usage is not None and again[-1].usage.completion_tokens == 20
    raw = httpx.post(f"{cached.base_url}/chat/completions", json=kwargs | {"stream_options": None}, headers=AUTH)
    payloads = sse_events(raw.content)
    assert payloads[-1] == "[DONE]" and not any('"usage":{' in p for p in payloads)  # no usage unasked
    assert upstream_calls(upstream) == 1


def test_streams_and_complete_answers_serve_each_other(cached: RunningGateway, upstream: MockUpstream) -> None:
    api = openai.OpenAI(base_url=cached.base_url, api_key=FULL_KEY, max_retries=0)
    streamed = list(api.chat.completions.create(model="chat", messages=ASK, temperature=0, stream=True))
    whole = api.chat.completions.with_raw_response.create(model="chat", messages=ASK, temperature=0)
    assert whole.headers["x-gateway-cache"] == "hit"
    answer = whole.parse()
    assert answer.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in streamed)
    assert answer.choices[0].finish_reason == "stop" and answer.usage is not None and answer.usage.total_tokens > 0
    other = [{"role": "user", "content": "And of Spain?"}]
    complete = api.chat.completions.create(model="chat", messages=other, temperature=0, n=2)
    replay = api.chat.completions.with_raw_response.create(model="chat", messages=other, temperature=0, n=2,
                                                           stream=True, stream_options={"include_usage": True})
    assert replay.headers["x-gateway-cache"] == "hit"
    chunks = list(replay.parse())
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == complete.choices[index].message.content
    assert complete.usage is not None and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == complete.usage.total_tokens
    assert upstream_calls(upstream) == 2


def test_completions_and_embeddings_are_cached(cached: RunningGateway, upstream: MockUpstream) -> None:
    body = {"model": "chat", "prompt": "Say hi", "temperature": 0}
    assert [post(cached, body, path="completions").headers["x-gateway-cache"] for _ in range(2)] == ["miss", "hit"]
    api = openai.OpenAI(base_url=cached.base_url, api_key=FULL_KEY, max_retries=0)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="chat", prompt="Say hi", temperature=0, stream=True) if c.choices)
    assert streamed == post(cached, body, path="completions").json()["choices"][0]["text"]
    embedding = {"model": "embed", "input": "hello"}
    assert [post(cached, embedding, path="embeddings").headers["x-gateway-cache"] for _ in range(2)] == ["miss", "hit"]
    assert upstream_calls(upstream) == 2


async def test_concurrent_identical_misses_send_one_upstream_request(
    cached: RunningGateway, upstream: MockUpstream,
) -> None:
    upstream.override = "fault-slow-first-byte-400"
    async with httpx.AsyncClient(timeout=30) as client:
        replies = await asyncio.gather(*(client.post(f"{cached.base_url}/chat/completions", json=chat(),
                                                     headers=AUTH) for _ in range(20)))
    assert all(r.status_code == 200 for r in replies)
    assert upstream_calls(upstream) == 1
    assert sorted(r.headers["x-gateway-cache"] for r in replies) == ["hit"] * 19 + ["miss"]
    assert len({r.content for r in replies}) == 1


def guarded_policy(upstream_url: str) -> str:
    return cache_policy(upstream_url, extra=textwrap.dedent("""\
        guards:
          models:
            echo:
              deny: {kind: denylist, terms: [forbidden], action: redact, places: [output]}
        """))


def test_a_guarded_alias_never_stores_an_answer_a_guard_changed(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    gw = make_gateway(guarded_policy(upstream.base_url))
    changed = {"model": "echo", "messages": [{"role": "user", "content": "say forbidden words"}], "temperature": 0}
    answers = [post(gw, changed) for _ in range(2)]
    assert [a.headers["x-gateway-cache"] for a in answers] == ["miss", "miss"]
    assert "forbidden" not in answers[0].text and "deny.redact=1" in answers[0].headers["x-gateway-guards"]
    clean = {"model": "echo", "messages": [{"role": "user", "content": "say nice words"}], "temperature": 0}
    hit = [post(gw, clean) for _ in range(2)][1]
    assert hit.headers["x-gateway-cache"] == "hit" and "x-gateway-guards" in hit.headers  # a hit passed the guards
    api = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0)
    for _ in range(2):
        parts = api.chat.completions.with_raw_response.create(stream=True, **changed)
        assert parts.headers["x-gateway-cache"] == "miss"
        assert "forbidden" not in "".join(c.choices[0].delta.content or "" for c in parts.parse() if c.choices)


@pytest.mark.parametrize(("cache", "message"), [
    ("{semantic: {embeddings: nope}}", "models.chat.cache.semantic.embeddings: unknown embeddings alias `nope`"),
    ("{semantic: {model_dir: /nonexistent}}", "models.chat.cache.semantic.model_dir: no all-MiniLM-L6-v2 model"),
    ("{mode: sometimes}", "models.chat.cache.mode: unknown value `sometimes`"),
    ("{ttl_s: 0}", "models.chat.cache.ttl_s:"),
    ("{colour: red}", "models.chat.cache.colour: unknown field `colour`"),
    ("{semantic: {threshold: 1.5}}", "models.chat.cache.semantic.threshold:"),
])
def test_bad_cache_policies_are_load_errors_with_file_line_and_field(cache: str, message: str) -> None:
    text = textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          demo: {{kind: demo}}
        models:
          embed: {{provider: demo, model: demo-1}}
          chat:
            provider: demo
            model: demo-1
            cache: {cache}
        """)
    with pytest.raises(PolicyError) as error:
        compile_text(text, "cache.yaml", {})
    assert any(str(issue).startswith(f"cache.yaml:10: {message}") for issue in error.value.issues), error.value
