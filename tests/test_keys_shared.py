"""Keys created at run time, shared through a real Redis by two `gateway serve` processes.

A key revoked or rotated through one process stops working on both at once: the caches hold keys for a
minute here, so only the published invalidation can explain a refusal within a second or two. With Redis
unreachable, `on_unavailable` decides (open: keys already seen keep working, unseen ones get 503; closed:
503), static keys always work, and nothing is ever a 500.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, free_port, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url
from tests.test_serve import serving

ADMIN_TOKEN = "admin-token-for-shared-key-tests-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def _policy(upstream: MockUpstream, prefix: str, dynamic: str) -> str:
    return (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN")
            + f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.2}}\n'
            + f"dynamic_keys: {dynamic}\n")


def _replicas(stack: ExitStack, tmp_path: Path, redis: str, policies: list[str]) -> list[str]:
    """Start one `gateway serve` per policy text, all on the same Redis; their base URLs."""
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
    urls = []
    for number, text in enumerate(policies):
        path = tmp_path / f"policy-{number}.yaml"
        path.write_text(text)
        port = free_port()
        stack.enter_context(serving([sys.executable, "-m", "gateway", "serve", "--policy", str(path), "--port",
                                     str(port)], port, env=env))
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def _create(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", **body}, timeout=10)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _chat(url: str, key: str) -> int:
    """The status the official SDK saw (200 or the error's)."""
    api = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)
    try:
        api.chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def _refused_within(url: str, key: str, seconds: float) -> float:
    """How long until `key` got 401 at `url` (fails after `seconds`)."""
    start = time.monotonic()
    while (status := _chat(url, key)) != 401:
        assert status == 200, status
        assert time.monotonic() - start < seconds, f"{url} still accepts the key after {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_revoke_and_rotate_stop_a_key_on_both_replicas_at_once(
    tmp_path: Path, redis_url: str, upstream: MockUpstream,
) -> None:
    text = _policy(upstream, f"gwtest:{uuid.uuid4().hex}:", "{enabled: true, cache_ttl_s: 60}")
    with ExitStack() as stack:
        first, second = _replicas(stack, tmp_path, redis_url, [text, text])
        made = _create(first, name="shared")
        assert _chat(first, made["key"]) == 200 and _chat(second, made["key"]) == 200  # both cache it now
        assert httpx.delete(f"{second}/admin/keys/{made['id']}", headers=ADMIN).status_code == 200
        assert _chat(second, made["key"]) == 401  # the replica that revoked: before it answered
        assert _refused_within(first, made["key"], seconds=2) < 2  # the other: by pub/sub, not the 60 s cache

        rotating = _create(second, name="rotating")
        assert _chat(first, rotating["key"]) == 200 and _chat(second, rotating["key"]) == 200
        rotated = httpx.post(f"{first}/admin/keys/{rotating['id']}/rotate", headers=ADMIN, timeout=10)
        assert rotated.status_code == 200
        assert _chat(first, rotating["key"]) == 401
        assert _refused_within(second, rotating["key"], seconds=2) < 2
        new_key = rotated.json()["key"]
        assert _chat(first, new_key) == 200 and _chat(second, new_key) == 200
        listed = httpx.get(f"{second}/admin/keys", headers=ADMIN).json()["data"]
        assert [k["name"] for k in listed] == ["rotating"]  # one Redis, one list; the revoked key is gone

        def claim(url: str) -> int:
            body = {"tenant": "acme", "name": "raced"}
            return httpx.post(url + "/admin/keys", headers=ADMIN, json=body, timeout=30).status_code

        with ThreadPoolExecutor(16) as pool:  # one name claimed through both replicas at once: exactly one wins
            statuses = sorted(pool.map(claim, [first, second] * 8))
        assert statuses == [201] + [409] * 15
        assert new_key not in str(listed) and rotating["key"] not in str(listed)
        assert _chat(first, FULL_KEY) == 200


def test_redis_unreachable_follows_on_unavailable_and_recovers(tmp_path: Path, upstream: MockUpstream) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    open_policy = _policy(upstream, prefix, "{enabled: true, cache_ttl_s: 0.3, on_unavailable: open}")
    closed_policy = _policy(upstream, prefix, "{enabled: true, cache_ttl_s: 0.3, on_unavailable: closed}")
    with RedisServer() as redis, ExitStack() as stack:
        fail_open, fail_closed = _replicas(stack, tmp_path, redis.url, [open_policy, closed_policy])
        seen = _create(fail_open, name="seen")
        unseen = _create(fail_open, name="unseen")
        assert _chat(fail_open, seen["key"]) == 200 and _chat(fail_closed, seen["key"]) == 200
        redis.pause()  # accepts connections, never answers: every operation times out
        try:
            time.sleep(0.4)  # past the cache TTL: every cached entry is stale now
            statuses = {
                "open seen": _chat(fail_open, seen["key"]),
                "open unseen": _chat(fail_open, unseen["key"]),
                "closed seen": _chat(fail_closed, seen["key"]),
                "closed unseen": _chat(fail_closed, unseen["key"]),
                "open static": _chat(fail_open, FULL_KEY),
                "closed static": _chat(fail_closed, FULL_KEY),
                "junk": _chat(fail_open, "sk-not-a-gateway-key"),
            }
            assert statuses == {"open seen": 200, "open unseen": 503, "closed seen": 503, "closed unseen": 503,
                                "open static": 200, "closed static": 200, "junk": 401}
            for url in (fail_open, fail_closed):
                created = httpx.post(url + "/admin/keys", headers=ADMIN, json={"tenant": "acme"}, timeout=10)
                assert created.status_code == 503 and created.json()["error"]["code"] == "key_store_unavailable"
                assert httpx.get(url + "/admin/keys", headers=ADMIN, timeout=10).status_code == 503
                revoked = httpx.delete(f"{url}/admin/keys/{seen['id']}", headers=ADMIN, timeout=10)
                assert revoked.status_code == 503
        finally:
            redis.resume()
        deadline = time.monotonic() + 15  # the stores notice the recovery within their probe back-off
        while {_chat(fail_open, unseen["key"]), _chat(fail_closed, unseen["key"])} != {200}:
            assert time.monotonic() < deadline, "the key store did not recover"
            time.sleep(0.1)
        assert _chat(fail_closed, seen["key"]) == 200
        for url in (fail_open, fail_closed):
            metrics = httpx.get(url + "/metrics").text
            assert 'gateway_key_lookups_total{result="unavailable"}' in metrics
            assert 'status="500"' not in metrics
