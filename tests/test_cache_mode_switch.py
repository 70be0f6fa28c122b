"""Switching an alias's cache mode keeps its entries: a `write-only` fill is served once the mode is `on`, an `on`
cache is frozen by `read-only`, and replicas in different modes share one Redis cache. A reload that changes what
answers (the target's model, its `extra_body`) starts fresh keys.

The key holds the alias's answer basis (`gateway/cache/key.py`, `answer_basis`), not the policy's version: that
hashes the policy's files, the alias's own `cache:` block with them, so any change of mode was a new cache.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy, chat, upstream_calls
from tests.test_reload import on_loop


def policy(upstream_url: str, alias: str, state: str = "") -> str:
    return cache_policy(upstream_url, models=alias + "\n", state=state)


def status(running: RunningGateway, model: str = "switch", **extra: object) -> str:
    response = httpx.post(f"{running.base_url}/chat/completions", json=chat(model, **extra), headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.headers["x-gateway-cache"]


@pytest.fixture
def reloadable(tmp_path: Path, upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload reads the environment)
    text = policy(upstream.base_url, "switch: {provider: mock, model: mock-model, cache: {mode: write-only}}")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "policy.yaml").start()
    yield running
    running.stop()


def reload_to(running: RunningGateway, upstream: MockUpstream, alias: str) -> None:
    assert running.gateway.source is not None
    running.gateway.source.write_text(policy(upstream.base_url, alias))
    assert on_loop(running, running.gateway.reload("test"))["result"] == "ok"


def test_a_write_only_fill_is_served_once_on_and_kept_when_frozen(
    reloadable: RunningGateway, upstream: MockUpstream,
) -> None:
    upstream.clear()
    assert status(reloadable) == "miss"  # write-only: stored, never served
    assert status(reloadable) == "miss"
    reload_to(reloadable, upstream, "switch: {provider: mock, model: mock-model, cache: {mode: on, ttl_s: 600}}")
    assert status(reloadable) == "hit"  # the fill serves (a new TTL is no reason to lose it either)
    assert status(reloadable, seed=7) == "miss"  # another request: stored now
    reload_to(reloadable, upstream, "switch: {provider: mock, model: mock-model, cache: {mode: read-only}}")
    assert (status(reloadable), status(reloadable, seed=7)) == ("hit", "hit")  # frozen, not emptied
    assert upstream_calls(upstream) == 3


def test_a_reload_that_changes_what_answers_starts_fresh_keys(
    reloadable: RunningGateway, upstream: MockUpstream,
) -> None:
    reload_to(reloadable, upstream, "switch: {provider: mock, model: mock-model, cache: {}}")
    upstream.clear()
    assert (status(reloadable), status(reloadable)) == ("miss", "hit")
    reload_to(reloadable, upstream, "switch: {provider: mock, model: fault-echo, cache: {}}")
    response = httpx.post(f"{reloadable.base_url}/chat/completions", json=chat("switch"), headers=AUTH, timeout=30)
    assert response.headers["x-gateway-cache"] == "miss"  # never the old model's answer
    assert response.json()["choices"][0]["message"]["content"] == "What is the capital of France?"  # (fault-echo)
    assert status(reloadable) == "hit"
    reload_to(reloadable, upstream, "switch: {targets: [{provider: mock, model: fault-echo, extra_body: {top_k: 3}}],"
                                    " cache: {}}")
    assert status(reloadable) == "miss"  # a field the target adds to the body may change the answer
    assert upstream_calls(upstream) == 3


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def test_replicas_in_different_modes_share_one_redis_cache(redis_url: str, upstream: MockUpstream) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}"}}\n'
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}
    replicas = [RunningGateway(policy(upstream.base_url, f"switch: {{provider: mock, model: mock-model, "
                                                         f"cache: {{mode: {mode}}}}}", state), env).start()
                for mode in ("write-only", "read-only", "on")]
    try:
        upstream.clear()
        filler, frozen, serving = replicas
        assert status(frozen) == "miss"  # nothing stored yet, and read-only stores nothing
        assert status(filler) == "miss"
        client = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 10
        while not list(client.scan_iter(match=prefix + "cache:entry:*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # (the write follows the answer)
        assert (status(frozen), status(serving)) == ("hit", "hit")
        assert upstream_calls(upstream) == 2
    finally:
        for running in replicas:
            running.stop()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
