"""The cache on a real Redis: two `gateway serve` processes share it, Redis dies mid-run, an entry is corrupt.

The shared Redis comes from GATEWAY_TEST_REDIS_URL (a private one is started when it is unset);
every test uses its own key prefix and deletes its keys. The outage test runs its own redis-server.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.policy.cache_check import default_model_dir
from tests.conftest import UPSTREAM_KEY, RunningGateway, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url
from tests.test_cache import AUTH, chat, upstream_calls
from tests.test_cache import cache_policy as base_policy
from tests.test_serve import serving

MODEL_DIR = default_model_dir()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"gwtest:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=name + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


SEMANTIC_ALIAS = "sem: {provider: mock, model: fault-echo, cache: {semantic: {threshold: 0.8}}}\n"


def redis_policy(upstream_url: str, prefix: str, env_var: str = "GW_TEST_REDIS", models: str = "") -> str:
    state = f'state: {{backend: redis, url_env: {env_var}, key_prefix: "{prefix}", op_timeout_s: 0.5}}\n'
    return base_policy(upstream_url, models=models, state=state)


def test_two_gateway_processes_share_one_redis_cache(
    tmp_path: Path, redis_url: str, prefix: str, upstream: MockUpstream,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(redis_policy(upstream.base_url, prefix, models=SEMANTIC_ALIAS if MODEL_DIR else ""))
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}
    ports = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port"]
    with serving([*command, str(ports[0])], ports[0], env=env), serving([*command, str(ports[1])], ports[1], env=env):
        first, second = (f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports)
        miss = httpx.post(first, json=chat(), headers=AUTH, timeout=20)
        hit = httpx.post(second, json=chat(), headers=AUTH, timeout=20)
        assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "hit")
        assert hit.json() == miss.json()
        assert upstream_calls(upstream) == 1

        upstream.override = "fault-slow-first-byte-600"  # identical misses on both replicas at once

        async def both() -> list[httpx.Response]:
            body = chat(messages=[{"role": "user", "content": "coalesce me"}])
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(url, json=body, headers=AUTH)
                                              for url in (first, second) * 10))

        replies = asyncio.run(both())
        assert all(r.status_code == 200 for r in replies)
        assert upstream_calls(upstream) == 2  # one more for twenty requests on two replicas
        assert sorted(r.headers["x-gateway-cache"] for r in replies) == ["hit"] * 19 + ["miss"]
        upstream.clear()
        if MODEL_DIR is None:
            return

        def ask(url: str, text: str) -> httpx.Response:
            return httpx.post(url, headers=AUTH, timeout=30, json={
                "model": "sem", "temperature": 0, "messages": [{"role": "user", "content": text}]})

        assert ask(first, "How do I reset my password?").headers["x-gateway-cache"] == "miss"
        time.sleep(0.5)  # the vector travels by pub/sub
        shared = ask(second, "How can I reset my password?")  # the other replica knows the vector
        assert shared.headers["x-gateway-cache"] == "semantic-hit"
        assert shared.json()["choices"][0]["message"]["content"] == "How do I reset my password?"
        assert len(upstream.requests) == 1


def test_a_corrupt_entry_is_a_miss_and_is_replaced(redis_url: str, prefix: str, upstream: MockUpstream) -> None:
    gw = RunningGateway(redis_policy(upstream.base_url, prefix),
                        {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}).start()
    client = redis.Redis.from_url(redis_url)
    try:
        assert httpx.post(f"{gw.base_url}/chat/completions", json=chat(), headers=AUTH).headers[
            "x-gateway-cache"] == "miss"
        time.sleep(0.2)  # the write happens after the answer
        keys = list(client.scan_iter(match=prefix + "cache:entry:*"))
        assert len(keys) == 1
        for garbage in (b"\x01not zlib at all", b"\x00\xff\xfe", b"plain text", b""):
            client.set(keys[0], garbage)
            answer = httpx.post(f"{gw.base_url}/chat/completions", json=chat(), headers=AUTH)
            assert answer.status_code == 200 and answer.headers["x-gateway-cache"] == "miss"
            time.sleep(0.2)
        assert httpx.post(f"{gw.base_url}/chat/completions", json=chat(), headers=AUTH).headers[
            "x-gateway-cache"] == "hit"
        assert 'gateway_cache_errors_total{reason="corrupt"} 4.0' in gw.metrics()
    finally:
        client.close()
        gw.stop()


def test_redis_down_mid_run_serves_without_the_cache(upstream: MockUpstream) -> None:
    with RedisServer() as server:
        gw = RunningGateway(redis_policy(upstream.base_url, "gwtest:down:"),
                            {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": server.url}).start()
        try:
            url = f"{gw.base_url}/chat/completions"
            assert [httpx.post(url, json=chat(), headers=AUTH).headers["x-gateway-cache"] for _ in range(2)] == [
                "miss", "hit"]
            server.stop()
            for _ in range(3):
                answer = httpx.post(url, json=chat(), headers=AUTH, timeout=20)
                assert answer.status_code == 200 and answer.headers["x-gateway-cache"] == "miss"
            with httpx.stream("POST", url, json=chat(stream=True), headers=AUTH, timeout=20) as streamed:
                assert streamed.status_code == 200 and b"[DONE]" in streamed.read()
            assert 'gateway_cache_errors_total{reason="unavailable"}' in gw.metrics()
            server.start()  # empty again, same port: the store notices by itself and the cache fills again
            deadline = time.monotonic() + 10
            states = []
            while time.monotonic() < deadline and states[-2:] != ["miss", "hit"]:
                states.append(httpx.post(url, json=chat(), headers=AUTH).headers["x-gateway-cache"])
                time.sleep(0.2)
            assert states[-2:] == ["miss", "hit"]
        finally:
            gw.stop()
