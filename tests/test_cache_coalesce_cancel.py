"""A request that leaves while it coalesces (its client gave up, a shutdown) leaves nothing behind: no promise its
replica's later requests wait out, no lock other replicas wait out. And an answer whose write is under way when the
gateway closes is stored, not cut by the close.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from gateway.cache.coalesce import LOCK, Flights
from gateway.cache.entry import Entry
from gateway.cache.service import ENTRY, ResponseCache
from gateway.policy import compile_text
from gateway.store.memory import MemoryStore
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy

SLOW = ("slow: {provider: mock, model: fault-slow-first-byte-1500, cache: {coalesce_timeout_s: 6}}\n"
        "brief: {provider: mock, model: fault-slow-first-byte-1000, cache: {coalesce_timeout_s: 6, ttl_s: 1}}\n")


@pytest.fixture
def shared() -> Iterator[tuple[str, str, redis.Redis]]:
    """A Redis URL, a key prefix of this test's own, and a client (the prefix's keys are deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        client = redis.Redis.from_url(url)
        try:
            yield url, prefix, client
        finally:
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def replica(upstream: MockUpstream, url: str, prefix: str) -> RunningGateway:
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
    return RunningGateway(cache_policy(upstream.base_url, models=SLOW, state=state),
                          {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url}).start()


def test_a_client_that_gives_up_while_another_replica_leads_leaves_no_waiter_behind(
    upstream: MockUpstream, shared: tuple[str, str, redis.Redis],
) -> None:
    """Replica B leads a slow miss (its lock in Redis); on replica A a client waits for it and gives up. Once B's
    entry expired (1 s), A's next request for it is a miss that must lead at once (the upstream takes 1 s), not
    wait A's coalesce timeout (6 s) for the promise of a request that left."""
    url, prefix, _ = shared
    a, b = replica(upstream, url, prefix), replica(upstream, url, prefix)
    try:
        body = {"model": "brief", "messages": [{"role": "user", "content": "coalesce and leave"}], "temperature": 0}

        async def scene() -> float:
            async with httpx.AsyncClient(timeout=20) as client:
                leader = asyncio.ensure_future(client.post(f"{b.base_url}/chat/completions", json=body, headers=AUTH))
                for _ in range(200):  # B holds the lock once its upstream call began (a fixed 0.4 s lost the race on a
                    if any(r.path.endswith("/chat/completions") for r in upstream.requests):  # slow machine)
                        break
                    await asyncio.sleep(0.01)
                with pytest.raises(httpx.ReadTimeout):  # A's client gives up while A polls for B's answer
                    await client.post(f"{a.base_url}/chat/completions", json=body, headers=AUTH, timeout=0.4)
                assert (await leader).headers["x-gateway-cache"] == "miss"
                await asyncio.sleep(1.3)  # B's entry expired
                started = time.monotonic()
                again = await client.post(f"{a.base_url}/chat/completions", json=body, headers=AUTH)
                assert again.status_code == 200 and again.headers["x-gateway-cache"] == "miss"
                return time.monotonic() - started

        assert asyncio.run(scene()) < 3.0
        assert sum(1 for r in upstream.requests if r.path.endswith("/chat/completions")) == 2
    finally:
        a.stop()
        b.stop()


class _Hanging(MemoryStore):
    """A shared store whose reads (`get`) or compare-and-sets hang: a round trip a client leaves during."""

    hang_get = False
    hang_cas = False

    async def get(self, key: str) -> bytes | None:
        if self.hang_get:
            await asyncio.Event().wait()
        return await super().get(key)

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl_s: float | None) -> bool:
        taken = await super().compare_and_set(key, expected, new, ttl_s)
        if self.hang_cas:  # the lock is taken, its answer lost with the request that left
            await asyncio.Event().wait()
        return taken


async def _absent_from(store: MemoryStore) -> bool:
    return await store.get("cache:entry:k") is not None


@pytest.mark.parametrize("where", ["present", "compare_and_set"])
async def test_a_leader_that_leaves_while_deciding_frees_its_key_and_its_lock(where: str) -> None:
    store = _Hanging()
    tasks: list[asyncio.Task[Any]] = []
    flights = Flights(store, True, lambda work: tasks.append(asyncio.ensure_future(work)))
    store.hang_get, store.hang_cas = where == "present", where == "compare_and_set"
    leaving = asyncio.ensure_future(flights.lead_or_wait("k", 30.0, lambda: _absent_from(store)))
    await asyncio.sleep(0.05)
    waiter = asyncio.ensure_future(flights.lead_or_wait("k", 30.0, lambda: _absent_from(store)))
    await asyncio.sleep(0.05)
    leaving.cancel()  # its client left
    store.hang_get = store.hang_cas = False
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await asyncio.wait_for(waiter, 1.0) is None  # woken at once, to read the cache again
    await asyncio.gather(*tasks)
    assert "k" not in flights.local
    assert await store.get(LOCK + "k") is None  # its lock went with it
    nxt = await asyncio.wait_for(flights.lead_or_wait("k", 30.0, lambda: _absent_from(store)), 1.0)
    assert nxt is not None and nxt.locked  # the next request leads
    nxt.release()
    await asyncio.gather(*tasks)


class _SlowWrites(MemoryStore):
    """A store whose writes take a while (a busy or distant Redis)."""

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        await asyncio.sleep(0.2)
        await super().set(key, value, ttl_s)


async def test_an_answer_completing_while_the_gateway_closes_is_stored() -> None:
    """A miss's answer went out and its write is under way when the gateway closes (the end of a shutdown's drain):
    the close lets it finish (bounded), rather than cancel it."""
    policy = compile_text(textwrap.dedent("""\
        version: 1
        auth: none
        providers: {mock: {kind: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: NONE}}
        models: {chat: {provider: mock, model: m, cache: {}}}
        """), "p.yaml", {"NONE": "x"})
    store = _SlowWrites()
    cache = ResponseCache(policy, store, {}, Metrics(), TokenCounter())
    cache.spawn(cache.write("chat", "k", Entry("body", 1.0, body=b'{"a":1}'), 60, None, 1 << 20))
    await asyncio.sleep(0)
    await cache.aclose()
    assert await store.get(ENTRY + "k") is not None
