"""Each way a coalesced miss's leader ends without storing frees its waiters at once: none waits out the alias's
`coalesce_timeout_s` (30 s here) for a leader that is gone. Real gateways on real ports, the scripted mock upstream
of test_cache_leader_failure (its first call misbehaves as scripted, later ones answer well), httpx as the client.

These ways passed before this change too (test_cache_leader_failure covers an upstream error, a non-streamed
leader's client leaving and a cut stream): they hold the rest of the claim in place. A leader whose upstream
answers a 200 that is not an answer is in test_cache_non_answers.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy
from tests.test_cache_leader_failure import COUNT, NO_BREAKER, ScriptedUpstream, ask, gateway

WAITERS = COUNT - 1
PROMPTLY_S = 5.0  # far below the aliases' 30 s coalesce timeout


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    mock = ScriptedUpstream()
    with mock:
        yield mock


@pytest.fixture
def shared() -> Iterator[tuple[str, str]]:
    """A Redis URL and a key prefix of this test's own (its keys are deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        try:
            yield url, prefix
        finally:
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def served_by_the_next_leader(replies: list[httpx.Response]) -> None:
    assert all(r.status_code == 200 for r in replies)
    assert sorted(r.headers["x-gateway-cache"] for r in replies) == ["hit"] * (WAITERS - 1) + ["miss"]


async def lead_and_leave(leader_url: str, urls: list[str], body: dict[str, Any]) -> tuple[list[httpx.Response], float]:
    """The leader's client reads two events of its streamed answer, the waiters come, and the leader's client
    leaves: their replies, and how long after it left the last came."""
    async with httpx.AsyncClient(timeout=60) as client:
        read = asyncio.Event()

        async def leader() -> None:
            async with client.stream("POST", leader_url, json={**body, "stream": True}, headers=AUTH) as reply:
                assert reply.status_code == 200 and reply.headers["x-gateway-cache"] == "miss"
                seen = 0
                async for line in reply.aiter_lines():
                    seen += line.startswith("data:")
                    if seen >= 2:
                        break
                read.set()
                await asyncio.sleep(0.3)  # the waiters wait for it now

        leading = asyncio.ensure_future(leader())
        await asyncio.wait_for(read.wait(), 10)
        began = time.monotonic()
        waiters = asyncio.gather(*(client.post(url, json=body, headers=AUTH) for url in urls))
        await leading  # its client leaves here
        left = time.monotonic()
        replies = await waiters
        assert left - began >= 0.3  # they did wait for the leader (one key, whichever form)
        return replies, time.monotonic() - left


@pytest.mark.parametrize("fault", ["fault-slow-stream-250", "fault-stall-after-3"], ids=["slow", "stalled"])
def test_a_streamed_leader_whose_client_leaves_mid_stream_frees_its_waiters(
    scripted: ScriptedUpstream, fault: str,
) -> None:
    """Its answer streams for 12.5 s, or stalls for a minute; its client leaves after two chunks: one waiter leads
    next at once, and the others are served its answer."""
    scripted.script = [fault]
    gw = gateway(scripted)
    url = f"{gw.base_url}/chat/completions"
    try:
        replies, took = asyncio.run(lead_and_leave(url, [url] * WAITERS, ask("flaky", f"leaves mid-stream {fault}")))
    finally:
        gw.stop()
    assert took < PROMPTLY_S
    served_by_the_next_leader(replies)
    assert len(scripted.started) == 2


def test_across_replicas_a_streamed_leader_whose_client_leaves_frees_its_waiters(
    scripted: ScriptedUpstream, shared: tuple[str, str],
) -> None:
    scripted.script = ["fault-slow-stream-250"]
    a, b = gateway(scripted, shared), gateway(scripted, shared)
    urls = [f"{url}/chat/completions" for url in [a.base_url, b.base_url] * 4 + [a.base_url]]
    try:
        replies, took = asyncio.run(lead_and_leave(f"{b.base_url}/chat/completions", urls,
                                                   ask("flaky", "a replica's streamed leader leaves")))
    finally:
        a.stop()
        b.stop()
    assert took < PROMPTLY_S
    served_by_the_next_leader(replies)
    assert len(scripted.started) == 2


async def together(url: str, body: dict[str, Any]) -> tuple[list[httpx.Response], float]:
    """The leader, then (while its upstream call is under way) the waiters: their replies, and how long the last
    waiter took."""
    async with httpx.AsyncClient(timeout=60) as client:
        leading = asyncio.ensure_future(client.post(url, json=body, headers=AUTH))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        replies = await asyncio.gather(*(client.post(url, json=body, headers=AUTH) for _ in range(WAITERS)))
        await leading
        return replies, time.monotonic() - started


@pytest.mark.parametrize("fault", ["fault-end-after-2", "fault-empty-stream", "fault-error-first",
                                   "fault-malformed-json", "fault-echo-secrets-midstream"])
def test_a_streamed_leader_that_ends_unfinished_hands_its_key_over(scripted: ScriptedUpstream, fault: str) -> None:
    """A stream that ends early, empty, with an error event or an unreadable one: one waiter leads next."""
    scripted.script, scripted.delay_s = [fault], 0.5
    gw = gateway(scripted)
    try:
        replies, took = asyncio.run(together(f"{gw.base_url}/chat/completions", ask("flaky", fault, True)))
    finally:
        gw.stop()
    assert took < PROMPTLY_S
    served_by_the_next_leader(replies)
    assert len(scripted.started) == 2


GUARDED = ("blocked: {provider: mock, model: mock-model, cache: {}}\n"
           "redacted: {provider: mock, model: mock-model, cache: {}}\n")
GUARDS = """\
guards:
  models:
    blocked: {deny: {kind: denylist, terms: [canned], action: block, places: [output]}}
    redacted: {deny: {kind: denylist, terms: [canned], action: redact, places: [output]}}
"""


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("alias", ["blocked", "redacted"])
def test_a_leader_whose_answer_a_guard_changes_lets_its_waiters_all_go(
    scripted: ScriptedUpstream, alias: str, stream: bool,
) -> None:
    """Every waiter's answer would be changed alike (the mock's answer holds `canned`): all go upstream at once,
    at the leader's end, not at their timeout."""
    scripted.delay_s = 0.5
    gw = RunningGateway(cache_policy(scripted.base_url, models=GUARDED, extra=NO_BREAKER + GUARDS),
                        {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        replies, took = asyncio.run(together(f"{gw.base_url}/chat/completions", ask(alias, alias, stream)))
    finally:
        gw.stop()
    assert took < PROMPTLY_S
    assert [(r.status_code, r.headers["x-gateway-cache"]) for r in replies] == [(200, "miss")] * WAITERS
    assert len(scripted.started) == COUNT
