"""What a client or an upstream sends, or a store holds, never makes a cached key answer 500, and a hit spends and
is cut by nothing.

- An upstream stream whose usage has negative counts: stored with the gateway's estimate (as a complete answer
  is), so its hits, in either form, are hits and not 500s (a counter of saved tokens cannot go down).
- A stored entry that decodes but holds figures no answer has (an infinite `created`, a negative or NaN cost,
  usage that is not `usable`): a corrupt entry, a miss, replaced by the new answer (in Redis, written there as
  another program would).
- `Cache-Control: max-age=` with hundreds or thousands of digits: read as 2^31 seconds (RFC 9111), not a 500.
- A streamed hit for a key with a small budget: replayed whole, never cut off by a budget it does not spend.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import redis
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.cache.entry import decode_entry, encode_entry
from gateway.schemas.openai import Usage
from tests.conftest import FULL_KEY, LIMITED_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.support.threaded_app import ThreadedApp
from tests.test_cache import ASK, AUTH, cache_policy, chat, post, upstream_calls

BUDGETED = {"Authorization": f"Bearer {LIMITED_KEY}"}
STREAM = {"model": "chat", "messages": ASK, "temperature": 0, "stream": True}


# -- an upstream stream with negative usage -------------------------------------------------------------------------

ODD_USAGE = {"prompt_tokens": -3, "completion_tokens": -2, "total_tokens": -5}


class OddUsage(ThreadedApp):
    """Streams an answer whose usage-only chunk has negative counts (a buggy OpenAI-compatible server)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        base = {"id": "chatcmpl-odd", "object": "chat.completion.chunk", "created": 1, "model": "odd"}
        if not (await request.json()).get("stream"):
            return web.json_response({**base, "object": "chat.completion", "usage": ODD_USAGE, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in (
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**base, "choices": [], "usage": ODD_USAGE},
        ):
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def odd_policy(port: int) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          odd: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: ODD_KEY}}
        prices:
          odd: {{input_per_mtok: 2.5, output_per_mtok: 10}}
        models:
          chat: {{provider: odd, model: odd, cache: {{}}}}
        """)


def test_a_stream_with_negative_usage_is_stored_with_an_estimate_and_its_hits_are_hits() -> None:
    body = {**STREAM, "messages": [{"role": "user", "content": "hello"}], "stream_options": {"include_usage": True}}
    with OddUsage() as odd:
        gw = RunningGateway(odd_policy(odd.port), {"ODD_KEY": "k"}).start()
        try:
            url = f"{gw.base_url}/chat/completions"
            with httpx.stream("POST", url, json=body, headers=AUTH, timeout=20) as miss:
                assert miss.status_code == 200 and miss.headers["x-gateway-cache"] == "miss"
                sent = miss.read()
            assert b'"prompt_tokens": -3' in sent and b"[DONE]" in sent
            time.sleep(0.3)  # the entry is written after the answer
            whole = httpx.post(url, json={**body, "stream": False}, headers=AUTH, timeout=20)
            assert whole.status_code == 200, whole.text
            assert whole.headers["x-gateway-cache"] == "hit"
            assert whole.json()["choices"][0]["message"]["content"] == "hi"
            streamed = httpx.post(url, json=body, headers=AUTH, timeout=20)
            assert streamed.status_code == 200, streamed.text
            assert streamed.headers["x-gateway-cache"] == "hit"
            assert streamed.content == sent  # the upstream's own chunks, its usage chunk as it sent it included
            assert odd.calls == 1
            metrics = gw.metrics()
            assert 'gateway_cache_lookups_total{model="chat",result="hit"} 2.0' in metrics
            assert 'gateway_cache_errors_total{reason="corrupt"}' not in metrics
            saved = re.search(r'gateway_cache_saved_tokens_total\{kind="prompt",model="chat"\} (\S+)', metrics)
            assert saved is not None and float(saved.group(1)) > 0  # the estimate's, as for a complete answer
        finally:
            gw.stop()


# -- an entry with impossible figures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"gwtest:hardening:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=name + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.mark.parametrize("change", [
    {"created": float("-inf")},
    {"created": float("nan")},
    {"cost_usd": -1.0},
    {"cost_usd": float("nan")},
    {"usage": Usage(prompt_tokens=-3, completion_tokens=-2, total_tokens=-5)},
    {"usage": Usage(prompt_tokens=10**12, completion_tokens=1, total_tokens=10**12 + 1)},
], ids=["created-minus-inf", "created-nan", "negative-cost", "nan-cost", "negative-usage", "absurd-usage"])
def test_an_entry_with_impossible_figures_is_a_corrupt_miss_and_is_replaced(
    redis_url: str, prefix: str, upstream: MockUpstream, change: dict[str, Any],
) -> None:
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
    gw = RunningGateway(cache_policy(upstream.base_url, state=state),
                        {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}).start()
    client = redis.Redis.from_url(redis_url)
    try:
        assert post(gw, chat()).headers["x-gateway-cache"] == "miss"
        time.sleep(0.3)  # the entry is written after the answer
        (key,) = list(client.scan_iter(match=prefix + "cache:entry:*"))
        entry = decode_entry(client.get(key))
        assert entry is not None
        for stream in (False, True):  # served in neither form
            client.set(key, encode_entry(msgspec.structs.replace(entry, **change), 1 << 30))
            answer = post(gw, chat(stream=stream))
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-gateway-cache"] == "miss"
            time.sleep(0.3)  # the new answer replaces the entry
        assert 'gateway_cache_errors_total{reason="corrupt"} 2.0' in gw.metrics()
        assert post(gw, chat()).headers["x-gateway-cache"] == "hit"
        assert upstream_calls(upstream) == 3
    finally:
        client.close()
        gw.stop()


# -- a huge max-age ---------------------------------------------------------------------------------------------------


@pytest.fixture
def make_cached(make_gateway: Callable[..., RunningGateway], upstream: MockUpstream) -> RunningGateway:
    return make_gateway(cache_policy(upstream.base_url))


@pytest.mark.parametrize(("max_age", "status"), [
    ("9" * 400, "hit"),  # past what a float holds
    ("1" + "0" * 5000, "hit"),  # past what `int` parses
    ("0" * 400 + "5", "hit"),
    ('"' + "9" * 400 + '"', "hit"),
    ("-" + "9" * 400, "miss"),  # not a delta-seconds: nothing stale
])
def test_a_huge_max_age_reads_as_2_to_the_31_not_a_500(make_cached: RunningGateway, max_age: str,
                                                       status: str) -> None:
    assert post(make_cached, chat()).headers["x-gateway-cache"] == "miss"
    time.sleep(0.1)
    answer = post(make_cached, chat(), {"Cache-Control": f"max-age={max_age}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-gateway-cache"] == status


# -- a streamed hit and a budget ---------------------------------------------------------------------------------


def budget_policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: budgeted, tenant: acme, hash: "{hash_key(LIMITED_KEY)}", budget: {{usd: 0.0001, period: day}}}}
        accounting: {{default_max_tokens: 5}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 2.5, output_per_mtok: 10}}
        models:
          chat: {{provider: mock, model: mock-model, cache: {{}}}}
        """)


def test_a_streamed_hit_is_not_cut_by_a_budget_it_does_not_spend(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    gw = make_gateway(budget_policy(upstream.base_url))
    url = f"{gw.base_url}/chat/completions"
    with httpx.stream("POST", url, json=STREAM, headers=AUTH, timeout=20) as miss:  # stored by a key with no budget
        assert miss.status_code == 200 and miss.headers["x-gateway-cache"] == "miss"
        stored = miss.read()
    assert b"[DONE]" in stored
    time.sleep(0.3)  # the entry is written after the answer
    whole = httpx.post(url, json={**STREAM, "stream": False}, headers=BUDGETED, timeout=20)
    assert whole.status_code == 200 and whole.headers["x-gateway-cache"] == "hit"
    for _ in range(3):  # the same tenant's budgeted key: a hit spends nothing, however often
        with httpx.stream("POST", url, json=STREAM, headers=BUDGETED, timeout=20) as hit:
            assert hit.status_code == 200 and hit.headers["x-gateway-cache"] == "hit"
            raw = hit.read()
        assert b"budget_exceeded" not in raw, raw[-700:]
        assert raw == stored  # replayed whole, as the miss streamed it
    assert upstream_calls(upstream) == 1
