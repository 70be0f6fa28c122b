"""Breakers shared through a real Redis between two `gateway serve` processes.

One replica sees a target fail and opens its breaker; the other, which never saw a
failure, skips the target too. The Redis comes from GATEWAY_TEST_REDIS_URL (a
private one is started when it is unset); every run uses its own key prefix.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_routing import routing_policy
from tests.test_serve import serving

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


def test_two_replicas_agree_that_a_target_is_down(
    tmp_path: Path, redis_url: str, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}"}}\n'
    breaker = "routing: {breaker: {failures: 2, cooldown_s: 30, sync_interval_s: 0.2}}\n"
    policy = tmp_path / "policy.yaml"
    policy.write_text(routing_policy(upstream, upstream_b, """\
        guarded:
          targets: [{provider: a, model: mock-model}, {provider: b, model: mock-model}]
        """, extra=breaker, state=state))
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}
    ports = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port"]
    with serving([*command, str(ports[0])], ports[0], env=env), serving([*command, str(ports[1])], ports[1], env=env):
        first, second = (f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports)
        body = {"model": "guarded", "messages": MESSAGES}
        assert httpx.post(second, headers=AUTH, json=body, timeout=20).headers["x-gateway-target"] == "a/mock-model"
        upstream.override = "fault-status-500"
        for _ in range(2):  # only the first replica sees a fail: its breaker opens and it tells the other
            response = httpx.post(first, headers=AUTH, json=body, timeout=20)
            assert response.headers["x-gateway-attempts"] == "2"
        upstream.clear()
        upstream.override = "fault-status-500"
        deadline = time.monotonic() + 5
        while True:
            response = httpx.post(second, headers=AUTH, json=body, timeout=20)
            if response.headers["x-gateway-attempts"] == "1" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert response.status_code == 200 and response.headers["x-gateway-target"] == "b/mock-model"
        assert response.headers["x-gateway-attempts"] == "1"
        upstream.clear()
        for _ in range(3):
            assert httpx.post(second, headers=AUTH, json=body, timeout=20).headers["x-gateway-attempts"] == "1"
        assert not upstream.requests  # the second replica never sent it a request
        assert 'gateway_breaker_state{target="a/mock-model"} 2.0' in httpx.get(
            f"http://127.0.0.1:{ports[1]}/metrics").text
