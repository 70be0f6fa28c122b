"""`state.max_connections` bounds the store's operations, not its subscriptions; a busy pool is not an outage.

A store's pub/sub subscriptions (breaker sync always, the revocations of run-time keys with `dynamic_keys`, the
semantic cache's vectors) each hold a Redis connection for as long as they live. They took them from the pool of
the operations: with `max_connections` at or below their number, every operation waited `op_timeout_s` for a
connection, failed as an outage and marked Redis down, for good (503 for every limited request with
`on_unavailable: closed`; limits unenforced with `open`) while Redis was healthy. Subscriptions now have
connections of their own. And an operation that finds every pooled connection busy fails alone, not sent, without
marking Redis down: the process is short of connections, Redis is fine.

Real Redis servers throughout: the suite's (`GATEWAY_TEST_REDIS_URL`), and private ones for Cluster and Sentinel.
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

from gateway.auth.keys import hash_key
from gateway.store import RedisStore, StoreConfig, StoreUnavailable
from gateway.store.redis_client import open_client
from gateway.store.redis_url import parse_redis_url
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url

KEY = "gw-test-pool-subscriptions-key-0000000000"
ADMIN_TOKEN = "admin-token-for-pool-subscription-tests-0"
WAIT_S = 15.0
PATIENT: dict[str, Any] = {"connect_timeout_s": 5.0, "op_timeout_s": 1.0, "backoff_min_s": 0.05,
                           "backoff_max_s": 0.2}
CHANNELS = ("routing:breakers", "keys:changes", "cache:semantic")  # every subscription a runtime may hold


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(scope="module", params=["standalone", "cluster", "sentinel"])
def any_url(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """A store URL of each deployment: the pools differ (standalone blocks for a connection, the others refuse)."""
    if request.param == "standalone":
        yield redis_url
    elif request.param == "cluster":
        with RedisServer(cluster=True) as server:
            yield f"redis+cluster://127.0.0.1:{server.port}"
    else:
        with RedisServer() as master, RedisServer(sentinel_of=master) as sentinel:
            yield f"redis+sentinel://127.0.0.1:{sentinel.port}/gwmaster/0"


def new_prefix() -> str:
    return f"gwtest-pool:{uuid.uuid4().hex[:12]}:"


async def one_connection_store(url: str, prefix: str) -> RedisStore:
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=prefix, max_connections=1, **PATIENT))
    await store.start()
    assert store.healthy
    return store


async def delete_prefixed(store: RedisStore, prefix: str) -> None:
    handle = store._handle
    assert handle is not None
    client: Any = handle.client
    keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
    for key in keys:  # one by one: a cluster refuses a DEL of keys in different slots
        await client.delete(key)


async def test_subscriptions_leave_the_only_pooled_connection_to_the_operations(any_url: str) -> None:
    prefix = new_prefix()
    store = await one_connection_store(any_url, prefix)
    try:
        channels = [await store.subscribe(name) for name in CHANNELS]
        for _ in range(5):  # before: each waited `op_timeout_s` for the connection the subscriptions held
            assert (await store.incr_window("rpm", 1, 60.0)).count >= 1
        assert (await store.incr_window("rpm", 1, 60.0)).count == 6
        assert store.healthy
        for name, channel in zip(CHANNELS, channels, strict=True):  # and the subscriptions do receive
            await store.publish(name, name.encode())
            assert await asyncio.wait_for(anext(channel), WAIT_S) == name.encode()
        assert store.healthy
        await delete_prefixed(store, prefix)
    finally:
        await store.aclose()


async def test_a_busy_pool_fails_the_operation_but_does_not_mark_redis_down(any_url: str) -> None:
    prefix = new_prefix()
    store = await one_connection_store(any_url, prefix)
    handle = store._handle
    assert handle is not None
    client: Any = handle.client
    held = asyncio.create_task(client.blpop([prefix + "held"], timeout=30))  # takes the one pooled connection
    try:
        await asyncio.sleep(0.3)  # (the BLPOP sent)
        assert not held.done()
        with pytest.raises(StoreUnavailable) as refused:
            await store.get("k")
        assert refused.value.maybe_applied is False  # never sent
        assert store.healthy  # before: marked down, and every operation failed fast until a probe answered
        assert await store.ping()  # (readiness, the store watch) nor does a PING that finds no connection
        assert store.healthy
    finally:
        await _release(any_url, prefix, held)
    try:
        assert await store.get("k") is None
        assert store.healthy
        await delete_prefixed(store, prefix)
    finally:
        await store.aclose()


async def _release(url: str, prefix: str, held: asyncio.Task[Any]) -> None:
    """Ends the BLPOP that holds the pool's connection by pushing to its list, from a client of its own."""
    handle = open_client(parse_redis_url(url), StoreConfig(backend="redis", url=url, **PATIENT))
    try:
        other: Any = handle.client
        await other.rpush(prefix + "held", b"go")
        await asyncio.wait_for(held, WAIT_S)
    finally:
        await handle.aclose()


def policy(upstream_url: str, prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: GW_ADMIN_TOKEN, watch_policy: false}}
        state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", on_unavailable: closed,
                 max_connections: 1, op_timeout_s: 1.0}}
        auth: keys
        keys:
          - {{name: limited, tenant: acme, hash: "{hash_key(KEY)}", limits: {{rpm: 3}}}}
        dynamic_keys: {{enabled: true}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """)


def wait_for_subscribers(client: redis.Redis, channels: list[str]) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        counts = dict(client.pubsub_numsub(*channels))
        if all(counts.get(name.encode(), 0) >= 1 for name in channels):
            return
        assert time.monotonic() < deadline, f"subscriptions not established: {counts}"
        time.sleep(0.1)


def store_up(running: RunningGateway) -> str:
    """The gauge's line, once the gateway's store watch has set it."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lines = [line for line in running.metrics().splitlines() if line.startswith("gateway_store_up")]
        if lines or time.monotonic() > deadline:
            return lines[0] if lines else ""
        time.sleep(0.1)


def test_a_gateway_with_one_redis_connection_enforces_its_limits(upstream: MockUpstream, redis_url: str) -> None:
    prefix = new_prefix()
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
    client = redis.Redis.from_url(redis_url)
    running = RunningGateway(policy(upstream.base_url, prefix), env).start()
    try:
        wait_for_subscribers(client, [prefix + "routing:breakers", prefix + "keys:changes"])
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        statuses = [httpx.post(running.base_url + "/chat/completions", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {KEY}"}).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]  # before: 503 each (the store marked down: `closed`)
        assert store_up(running) == 'gateway_store_up{backend="redis"} 1.0'  # before: 0.0
        ready = httpx.get(running.url + "/readyz", timeout=30)
        assert ready.json()["store"]["healthy"] is True, ready.text
    finally:
        running.stop()
        stale = list(client.scan_iter(match=prefix + "*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()
