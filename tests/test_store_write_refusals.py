"""A Redis that answers but refuses writes (out of memory under `noeviction`, a read-only replica) keeps the store
down until it takes writes again; and what a store marked down logs (its cause; not a line per flap).

Such a Redis still answers PING and reads: when those marked the store up, its health flapped with every probe
(`gateway_store_up` and /readyz alternating, an alert on them never firing, two log lines per flap). Each test runs
a private redis-server that it reconfigures.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.store import RedisStore, StoreConfig, StoreUnavailable
from gateway.store import redis as redis_store
from tests.support.redis_server import RedisServer

FAST: dict[str, Any] = {"op_timeout_s": 0.25, "connect_timeout_s": 0.5, "backoff_min_s": 0.05, "backoff_max_s": 0.2}
PASSWORD = "s3cret-redis-pw-b31"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
async def admin(server: RedisServer) -> Any:
    client = aioredis.Redis.from_url(server.url)
    yield client
    await client.aclose()


async def started_store(url: str) -> RedisStore:
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=f"gwtest:{uuid.uuid4().hex}:", **FAST))
    await store.start()
    return store


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def stays_down(store: RedisStore, seconds: float) -> None:
    """The store is never healthy for `seconds` (many probes at `FAST`'s back-off), PING-ing readiness checks too."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not store.healthy
        assert await store.ping() is False
        await asyncio.sleep(0.03)


async def refuse_writes_then_recover(store: RedisStore, refuse: Callable[[], Any], allow: Callable[[], Any],
                                     caplog: pytest.LogCaptureFixture) -> None:
    await store.set("k", b"v")
    assert store.healthy
    with caplog.at_level(logging.INFO, logger="gateway.store.redis"):
        await refuse()
        with pytest.raises(StoreUnavailable):
            await store.incr_window("w", 1, 60)
        assert not store.healthy
        await stays_down(store, 1.5)
        await allow()
        await wait_for(lambda: store.healthy)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "redis unavailable" in m]) == 1, messages  # one outage: one warning
    assert len([m for m in messages if "answering again" in m]) == 1, messages
    assert (await store.incr_window("w", 1, 60)).count == 1
    assert await store.get("k") in (b"v", None)  # (a replica that was turned back may have dropped its data)


async def test_out_of_memory_keeps_the_store_down_until_writes_succeed(
        server: RedisServer, admin: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = await started_store(server.url)

    async def refuse() -> None:  # an empty redis-server already uses more than 1 MB: every write is refused
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1mb")

    async def allow() -> None:
        await admin.config_set("maxmemory", "0")

    try:
        await refuse_writes_then_recover(store, refuse, allow, caplog)
    finally:
        await store.aclose()


async def test_a_read_only_replica_keeps_the_store_down_until_writes_succeed(
        server: RedisServer, admin: Any, caplog: pytest.LogCaptureFixture) -> None:
    store = await started_store(server.url)

    async def refuse() -> None:  # a replica of a master that is not there: READONLY to writes, reads served
        await admin.execute_command("REPLICAOF", "127.0.0.1", "1")

    async def allow() -> None:
        await admin.execute_command("REPLICAOF", "NO", "ONE")

    try:
        await refuse_writes_then_recover(store, refuse, allow, caplog)
    finally:
        await admin.execute_command("REPLICAOF", "NO", "ONE")
        await store.aclose()


async def test_a_wrong_password_is_logged_with_its_cause_and_never_the_password(
        server: RedisServer, admin: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    await admin.config_set("requirepass", PASSWORD)
    monkeypatch.setattr(redis_store, "STILL_DOWN_EVERY_S", 0.3)  # the probe's failures: logged now and then
    url = f"redis://:wrong-{PASSWORD}@127.0.0.1:{server.port}/0"
    with caplog.at_level(logging.DEBUG, logger="gateway.store"):
        store = await started_store(url)
        try:
            assert not store.healthy
            await asyncio.sleep(1.0)
        finally:
            await store.aclose()
    messages = [r.getMessage() for r in caplog.records]
    start = next(m for m in messages if "did not answer at start" in m)
    assert "AuthenticationError" in start or "NOAUTH" in start or "WRONGPASS" in start, start
    still = [m for m in messages if "still unavailable" in m]
    assert still and ("AuthenticationError" in still[0] or "WRONGPASS" in still[0]), messages
    assert len(still) <= 4  # rate-limited: not a line per probe (five or so ran)
    assert not any(PASSWORD in m for m in messages)


async def test_a_flapping_store_logs_one_warning_and_keeps_its_back_off(
        server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outages in quick succession (a link that drops and comes back): one warning, the next one counts those held
    back, and the probe's back-off is not reset by each short recovery."""
    store = await started_store(server.url)
    try:
        assert store.healthy
        with caplog.at_level(logging.INFO, logger="gateway.store.redis"):
            for _ in range(5):
                store._mark_down(ConnectionError("link dropped"))
                store._delay = FAST["backoff_max_s"]  # (as if the probe had backed off)
                store._mark_up()
            messages = [r.getMessage() for r in caplog.records]
            assert len([m for m in messages if "redis unavailable" in m]) == 1, messages
            assert len([m for m in messages if "answering again" in m]) == 1, messages
            assert store._delay == FAST["backoff_max_s"]  # up for less than `backoff_max_s` each time: kept
            monkeypatch.setattr(redis_store, "LOG_EVERY_S", 0.0)
            store._mark_down(ConnectionError("link dropped"))
            assert "4 more outage(s)" in caplog.records[-1].getMessage()
    finally:
        await store.aclose()
