"""A Redis Cluster going away and coming back, for the store and for a gateway on it.

The cluster client raises errors of its own when no node answers (`RedisClusterUnreachableError`, a
`RedisClusterException`, which is no `RedisError`): one that escaped the store killed its background probe and the
gateway's store watch, so a blip of the cluster was an outage for good, and a gateway could not start without it.
Each test runs a private one-node cluster (every slot on one redis-server) that it stops and starts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from gateway.store import RedisStore, StoreConfig, StoreUnavailable
from gateway.store.base import StoreRefused
from tests.conftest import FULL_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer

FAST: dict[str, Any] = {"op_timeout_s": 0.25, "connect_timeout_s": 0.5, "backoff_min_s": 0.05, "backoff_max_s": 0.2}
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]
Make = Callable[..., RunningGateway]


@pytest.fixture
def cluster() -> Iterator[RedisServer]:
    server = RedisServer(cluster=True)  # not started: each test starts it when it wants it
    try:
        yield server
    finally:
        server.close()


def cluster_url(server: RedisServer) -> str:
    return f"redis+cluster://127.0.0.1:{server.port}"


def new_store(server: RedisServer) -> RedisStore:
    return RedisStore(StoreConfig(backend="redis", url=cluster_url(server), key_prefix=f"gwtest:{uuid.uuid4().hex}:",
                                  **FAST))


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- the store ---------------------------------------------------------------------------------------------


async def test_a_cluster_stopped_and_restarted_is_recovered_by_the_probe(cluster: RedisServer) -> None:
    cluster.start()
    store = new_store(cluster)
    await store.start()
    try:
        assert store.healthy
        await store.incr_window("w", 1, 60)
        await asyncio.to_thread(cluster.stop)
        with pytest.raises(StoreUnavailable):
            await store.incr_window("w", 1, 60)
        assert not store.healthy
        await asyncio.sleep(1.0)  # several probes, each finding no node: the cluster client's own error
        assert await store.ping() is False  # not an exception
        probe = store._probe
        assert probe is not None and not probe.done()  # still probing
        await asyncio.to_thread(cluster.start)  # same port, the same node (its nodes.conf kept)
        await wait_for(lambda: store.healthy)  # the probe alone: no request needed
        assert (await store.incr_window("w2", 1, 60)).count == 1
    finally:
        await store.aclose()  # no exception either


async def test_a_store_started_with_the_cluster_down_runs_degraded_until_it_comes(
        cluster: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    store = new_store(cluster)
    with caplog.at_level(logging.WARNING, logger="gateway.store.redis"):
        await store.start()  # does not raise
    try:
        assert not store.healthy
        with pytest.raises(StoreUnavailable) as info:
            await store.get("k")
        assert "failing fast" in str(info.value)
        warning = next(r.getMessage() for r in caplog.records if "did not answer at start" in r.getMessage())
        assert "RedisClusterUnreachableError" in warning  # the cause, not just "did not answer"
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.start)
        await wait_for(lambda: store.healthy)
        await store.set("k", b"v")
        assert await store.get("k") == b"v"
    finally:
        await store.aclose()


async def test_an_operation_no_cluster_can_route_is_refused_without_marking_it_down(cluster: RedisServer) -> None:
    """The cluster client's errors for a misrouted command (keys of several slots) are refusals, as error replies
    are: one bad operation must not stop every request."""
    cluster.start()
    store = new_store(cluster)
    await store.start()
    try:
        with pytest.raises(StoreRefused):
            await store._run(lambda client: client.execute_command("MGET", "a", "b"))  # different slots
        assert store.healthy
    finally:
        await store.aclose()


# -- a gateway on the cluster ------------------------------------------------------------------------------


def cluster_policy(upstream: MockUpstream) -> str:
    return policy_text(upstream.base_url, watch_interval_s=0.2).replace(
        "auth: keys",
        "state: {backend: redis, url_env: GW_TEST_REDIS, op_timeout_s: 0.25}"
        "\nauth: keys")


def store_healthy(running: RunningGateway) -> bool:
    response = httpx.get(running.url + "/readyz", timeout=5)
    return bool(response.json()["store"]["healthy"])


def store_up(running: RunningGateway) -> str:
    return next(line for line in running.metrics().splitlines() if line.startswith("gateway_store_up{"))


def chat_ok(running: RunningGateway) -> bool:
    response = httpx.post(running.base_url + "/chat/completions", headers=AUTH, timeout=10,
                          json={"model": "chat", "messages": MESSAGES})
    return response.status_code == 200


def test_a_gateway_on_a_cluster_that_blips_recovers(make_gateway: Make, upstream: MockUpstream,
                                                    cluster: RedisServer) -> None:
    cluster.start()
    running = make_gateway(cluster_policy(upstream), env={"GW_TEST_REDIS": cluster_url(cluster)})
    assert eventually(lambda: store_healthy(running))
    assert chat_ok(running)
    cluster.stop()
    assert eventually(lambda: store_up(running).endswith(" 0.0"))
    for _ in range(5):  # requests while it is away (served: fail-open), the store watch pinging all the while
        chat_ok(running)
        time.sleep(0.2)
    cluster.start()
    assert eventually(lambda: store_up(running).endswith(" 1.0"))  # the watch goes on, the store recovered
    # (a command on a connection the restart closed may mark it away once more, until the watch's next ping: seen
    # in a full run, the gauge read 1 and `healthy` was False a moment later)
    assert eventually(lambda: store_healthy(running))
    assert chat_ok(running)


def test_a_gateway_starts_with_the_cluster_down_and_takes_it_when_it_comes(
        make_gateway: Make, upstream: MockUpstream, cluster: RedisServer) -> None:
    running = make_gateway(cluster_policy(upstream), env={"GW_TEST_REDIS": cluster_url(cluster)})  # starts
    assert not store_healthy(running)
    assert store_up(running).endswith(" 0.0")
    cluster.start()
    assert eventually(lambda: store_healthy(running))
    assert eventually(lambda: store_up(running).endswith(" 1.0"))
    assert chat_ok(running)


def test_the_store_watch_outlives_an_error_its_ping_lets_out(
        make_gateway: Make, upstream: MockUpstream, cluster: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    cluster.start()
    running = make_gateway(cluster_policy(upstream), env={"GW_TEST_REDIS": cluster_url(cluster)})
    assert eventually(lambda: store_up(running).endswith(" 1.0"))
    store = running.gateway.runtime.store
    calls = 0

    async def broken_ping() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("a store bug")

    real_ping = store.ping
    with caplog.at_level(logging.ERROR, logger="gateway"):
        store.ping = broken_ping  # type: ignore[method-assign]
        assert eventually(lambda: calls >= 2)  # the watch pinged again after the first error
        store.ping = real_ping  # type: ignore[method-assign]
    assert any("store health check failed" in r.getMessage() for r in caplog.records)
    cluster.stop()
    assert eventually(lambda: store_up(running).endswith(" 0.0"))  # still watching: the gauge follows
    cluster.start()
    assert eventually(lambda: store_up(running).endswith(" 1.0"))
