"""A complete answer past its provider's `max_response_bytes` is the request's own doing (it asked for that much), so
it is answered at once: 502 `upstream_answer_too_large` with `x-should-retry: false`, not retried, not fallen back
from (every target would answer as large), no failure on the target's circuit breaker (one tenant's big requests
opened the breaker every tenant shares: with `when_all_open: refuse`, another tenant was refused), and billed its
prompt estimate (the upstream generated the answer; it was billed nothing, and each request cost two targets'
retries).

Through a real gateway against the suite's mock upstream: `fault-huge-body-512` answers 512 KiB, past the 64 KiB cap
set here; a budget on each key, so that requests go through the bill, and the usage the admin API reports.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

BIG_KEY = "gw-oversized-big-key-00000000000000000000000"
OTHER_KEY = "gw-oversized-other-key-000000000000000000000"
ADMIN = "admin-oversized"
PROMPT = "hello " * 50


@pytest.fixture(scope="module")
def second() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, second: MockUpstream) -> Iterator[RunningGateway]:
    price = "{input_per_mtok: 1000, output_per_mtok: 1000}"
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK}}
        auth: keys
        keys:
          - {{name: big, tenant: acme, hash: "{hash_key(BIG_KEY)}", budget: {{usd: 100}}}}
          - {{name: other, tenant: globex, hash: "{hash_key(OTHER_KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{failures: 2, cooldown_s: 60, when_all_open: refuse}}}}
        providers:
          a: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY, max_response_bytes: 65536}}
          b: {{kind: openai, base_url: {second.base_url}, api_key_env: MOCK_UPSTREAM_KEY, max_response_bytes: 65536}}
        prices:
          mock-model: {price}
        models:
          shared:
            retry: {{attempts: 2}}
            targets: [{{provider: a, model: mock-model}}, {{provider: b, model: mock-model}}]
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


def _ask(gw: RunningGateway, key: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=20,
                      json={"model": "shared", "max_tokens": 5, "messages": [{"role": "user", "content": PROMPT}]})


def _usage(gw: RunningGateway, tenant: str, requests: int) -> dict[str, Any]:
    for _ in range(100):
        response = httpx.get(gw.url + "/admin/usage", params={"scope": "tenant", "name": tenant},
                             headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if rows and rows[0]["requests"] >= requests:
            return dict(rows[0])
        time.sleep(0.1)
    raise AssertionError(f"no usage of {requests} requests counted for {tenant}")


def test_an_oversized_answer_is_answered_at_once_billed_and_opens_no_breaker(
        gw: RunningGateway, upstream: MockUpstream, second: MockUpstream) -> None:
    upstream.override = second.override = "fault-huge-body-512"
    try:
        for _ in range(4):  # twice the breaker's failures
            answer = _ask(gw, BIG_KEY)
            assert answer.status_code == 502, answer.text
            error = answer.json()["error"]
            assert error["code"] == "upstream_answer_too_large" and "65536 bytes" in error["message"], error
            assert answer.headers["x-should-retry"] == "false"
            assert answer.headers["x-gateway-attempts"] == "1"
    finally:
        upstream.override = second.override = None
    assert len(upstream.requests) + len(second.requests) == 4  # one upstream call a request: no retry, no fallback
    row = _usage(gw, "acme", 4)
    assert row["prompt_tokens"] >= 4 * 50 and row["completion_tokens"] == 0 and row["cost_usd"] > 0, row
    assert "gateway_breaker_state{target=\"a/mock-model\"} 0.0" in gw.metrics()
    served = _ask(gw, OTHER_KEY)  # another tenant's request to the same targets: served, not refused
    assert served.status_code == 200, served.text
    assert 'outcome="too_large"' in gw.metrics()
