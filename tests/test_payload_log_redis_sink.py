"""The payload log's Redis sink uses the store's client: every URL form the store takes, and its timeouts; and the
entries still queued at close get `FINAL_DRAIN_S` in all, so a Redis that stalls never holds a shutdown."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import redis

from gateway.telemetry.payload_log import FINAL_DRAIN_S
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.redis_server import RedisServer

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
PAYLOAD_LOG = "telemetry:\n  payload_log: {enabled: true, sink: redis, stream: payloads, max_entries: 100}\n"


def _send(running: RunningGateway) -> int:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{running.base_url}/chat/completions", json=body, headers=AUTH, timeout=20).status_code


def _eventually(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _dropped(running: RunningGateway, reason: str) -> float:
    labels = {"sink": "payload_log", "reason": reason}
    return running.gateway.metrics.registry.get_sample_value("gateway_telemetry_dropped_total", labels) or 0.0


def test_the_redis_sink_writes_to_a_cluster_url(upstream: Any) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    with RedisServer(cluster=True) as server:
        text = policy_text(upstream.base_url) + (
            f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}"}}\n' + PAYLOAD_LOG)
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": f"redis+cluster://127.0.0.1:{server.port}"}
        running = RunningGateway(text, env).start()  # a plain Redis client for the sink refused the URL
        client = redis.Redis(port=server.port)
        try:
            assert _send(running) == 200
            assert _eventually(lambda: len(client.xrange(prefix + "payloads")) == 1)
        finally:
            client.close()
            running.stop()


def test_a_stalled_redis_does_not_hold_the_shutdown(upstream: Any) -> None:
    """Each write waits `op_timeout_s` at most, and all of them together `FINAL_DRAIN_S` at close; what is left
    then is dropped and counted. (Before: no timeout of the store's, every entry written one by one.)"""
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    queued = 30  # at 0.2 s each, far more than the final drain can write
    with RedisServer() as server:
        text = policy_text(upstream.base_url, drain_timeout_s=1) + (
            f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.2}}\n'
            + PAYLOAD_LOG)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": server.url}).start()
        client = redis.Redis(port=server.port)
        try:
            assert _send(running) == 200
            assert _eventually(lambda: len(client.xrange(prefix + "payloads")) == 1)  # the sink is connected
            server.pause()  # accepts, never answers
            for _ in range(queued):  # served (the store fails open); their entries wait for the sink
                assert _send(running) == 200
            started = time.monotonic()
            running.server.should_exit = True
            running.thread.join(FINAL_DRAIN_S + 6)
            stopped = not running.thread.is_alive()
            took = time.monotonic() - started
            server.resume()
            assert stopped, "the gateway was still stopping"
            assert took < FINAL_DRAIN_S + 4, took
            close_timeout, sink_failed = _dropped(running, "close_timeout"), _dropped(running, "sink_failed")
            assert close_timeout > 0
            assert close_timeout + sink_failed == queued  # each entry written, or dropped and counted
        finally:
            server.resume()
            client.close()
            running.stop()
