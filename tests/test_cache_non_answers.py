"""An upstream 200 whose body is not an answer the cache can replay (`{}`, an object without `choices`, embeddings
without `data`, a stream with no choice in any chunk) is not stored: counted `uncacheable`, and the next identical
request goes upstream again, as a miss, not as a `corrupt` entry. Before, it was stored, and every later request
of its key read it back as corrupt (`gateway_cache_errors_total{reason="corrupt"}`) until it expired. The mock
upstream answers as scripted, the gateway stores in a real Redis, the `openai` SDK's transport is the client.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy


class OddUpstream(MockUpstream):
    """The mock upstream; while `odd` holds a (content type, body), calls are answered 200 with it (only the first
    `odd_calls` of them when that is set), each after `delay_s`."""

    def __init__(self) -> None:
        super().__init__(api_key=UPSTREAM_KEY)
        self.odd: tuple[str, bytes] | None = None
        self.odd_calls: int | None = None
        self.delay_s = 0.0
        self.calls = 0

    def _route(self, build: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handle = super()._route(build)

        async def odd(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            await asyncio.sleep(self.delay_s)
            if self.odd is None or (self.odd_calls is not None and self.calls > self.odd_calls):
                return await handle(request)
            content_type, body = self.odd
            return web.Response(body=body, content_type=content_type)

        return odd


@pytest.fixture(scope="module")
def odd_upstream() -> Iterator[OddUpstream]:
    mock = OddUpstream()
    with mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(odd_upstream: OddUpstream) -> Iterator[RunningGateway]:
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
        gw = RunningGateway(cache_policy(odd_upstream.base_url, state=state),
                            {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url}).start()
        try:
            yield gw
        finally:
            gw.stop()
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def counter(gw: RunningGateway, line: str) -> float:
    found = re.search("^" + re.escape(line) + r" (\S+)$", gw.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


SSE = "text/event-stream"
# (`"choices": "none"` is no 200 now but a malformed answer's 502, never stored: tests/test_undeliverable_answers.py)
NON_ANSWERS: dict[str, tuple[str, str, bytes]] = {  # endpoint, content type, body
    "empty-object": ("chat/completions", "application/json", b"{}"),
    "no-choices": ("chat/completions", "application/json", b'{"id":"x","object":"chat.completion"}'),
    "null-choice": ("chat/completions", "application/json", b'{"id":"x","choices":[null]}'),
    "embeddings-without-data": ("embeddings", "application/json", b'{"object":"list","model":"m"}'),
    "stream-without-a-choice": ("chat/completions", SSE,
                                b'data: {"id":"x","object":"chat.completion.chunk","choices":[]}\n\n'
                                b"data: [DONE]\n\n"),
}


@pytest.mark.parametrize("name", list(NON_ANSWERS))
def test_an_upstream_200_that_is_not_an_answer_is_not_stored(
    gateway: RunningGateway, odd_upstream: OddUpstream, name: str,
) -> None:
    endpoint, content_type, body = NON_ANSWERS[name]
    text = f"not an answer {name} {uuid.uuid4().hex}"
    if endpoint == "embeddings":
        request: dict[str, Any] = {"model": "embed", "input": text}
    else:
        request = {"model": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0,
                   "stream": content_type == SSE}
    stores = 'gateway_cache_stores_total{model="' + request["model"] + '",outcome="%s"}'
    corrupt_line = 'gateway_cache_errors_total{reason="corrupt"}'
    stored, uncacheable = counter(gateway, stores % "stored"), counter(gateway, stores % "uncacheable")
    corrupt = counter(gateway, corrupt_line)
    odd_upstream.odd = (content_type, body)
    try:
        first = httpx.post(f"{gateway.base_url}/{endpoint}", json=request, headers=AUTH, timeout=10)
        assert first.headers.get("x-gateway-cache") == "miss"
        calls = odd_upstream.calls
        again = httpx.post(f"{gateway.base_url}/{endpoint}", json=request, headers=AUTH, timeout=10)
    finally:
        odd_upstream.odd = None
    assert again.headers.get("x-gateway-cache") == "miss" and odd_upstream.calls == calls + 1
    outcomes = (stores % "stored", stores % "uncacheable")
    settled(lambda: sum(counter(gateway, line) for line in outcomes) == stored + uncacheable + 2)  # (after the reply)
    assert counter(gateway, corrupt_line) == corrupt  # before: +1, the stored non-answer read back as corrupt
    assert (counter(gateway, outcomes[0]), counter(gateway, outcomes[1])) == (stored, uncacheable + 2)
    # the upstream answers again: that answer is stored, and served
    good = httpx.post(f"{gateway.base_url}/{endpoint}", json=request, headers=AUTH, timeout=10)
    assert good.status_code == 200 and good.headers["x-gateway-cache"] == "miss"
    settled(lambda: counter(gateway, stores % "stored") == stored + 1)
    calls = odd_upstream.calls
    hit = httpx.post(f"{gateway.base_url}/{endpoint}", json=request, headers=AUTH, timeout=10)
    assert hit.headers["x-gateway-cache"] == "hit" and odd_upstream.calls == calls


def settled(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not done():
        assert time.monotonic() < deadline, "the cache's write never ended so"
        time.sleep(0.02)


def test_a_leader_whose_answer_is_not_one_hands_its_key_to_one_waiter(
    gateway: RunningGateway, odd_upstream: OddUpstream,
) -> None:
    """Ten identical misses at once; the leader's upstream answers 200 `{}`. Before, it was stored and released
    its waiters to a corrupt entry: all nine went upstream at once (ten calls). Now nothing is stored and the key
    is handed over, as for an upstream error: one waiter leads next and serves the eight others (two calls)."""
    text = f"a leader's non-answer {uuid.uuid4().hex}"
    request = {"model": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0}
    corrupt_line = 'gateway_cache_errors_total{reason="corrupt"}'
    corrupt, calls = counter(gateway, corrupt_line), odd_upstream.calls

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(f"{gateway.base_url}/chat/completions", json=request,
                                                      headers=AUTH) for _ in range(10)))

    odd_upstream.odd, odd_upstream.odd_calls, odd_upstream.delay_s = ("application/json", b"{}"), calls + 1, 0.5
    try:
        replies = asyncio.run(together())
    finally:
        odd_upstream.odd, odd_upstream.odd_calls, odd_upstream.delay_s = None, None, 0.0
    assert odd_upstream.calls == calls + 2
    answers = [r for r in replies if r.status_code == 200 and r.json().get("choices")]
    assert sorted(r.headers["x-gateway-cache"] for r in answers) == ["hit"] * 8 + ["miss"]
    assert counter(gateway, corrupt_line) == corrupt
