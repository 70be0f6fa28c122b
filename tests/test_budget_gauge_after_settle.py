"""The budget gauges (`gateway_budget_remaining_usd`, `gateway_budget_remaining_ratio`) say what is left once a
request settles, and once a refused request gives its reservation back: the counter's total as the store answers
it then (what was spent, and what other requests in flight still hold), on the in-process store and on Redis.
They used to be set only when a reservation was taken: a request reserves its whole completion cap at the dearest
target (here 4096 tokens, $0.82 of a $2 budget) and settled for $0.004 while the gauge went on reading the
reservation, so that `GatewayBudgetNearlySpent` could fire on an idle key. Real gateways, the mock upstream, the
suite's Redis (a key prefix of its own, deleted afterwards)."""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

KEY = "gw-budget-gauge-settle-key-00000000000000000"
ADMIN = "admin-token-budget-gauge-after-settle"
BUDGET = 2.0
OUT_PER_MTOK = 200.0  # output tokens only: a reservation is the default cap, 4096 tokens, $0.8192
RESERVED = 4096 * OUT_PER_MTOK / 1_000_000
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def start(request: pytest.FixtureRequest, upstream: MockUpstream) -> Iterator[Callable[[str], RunningGateway]]:
    """A gateway on the store the test is parametrized with (Redis: a key prefix of its own, its keys deleted
    afterwards), `tenant` the tenant's fields."""
    state, env, prefix = "", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GAUGE_ADMIN": ADMIN}, ""
    url = ""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"gwtest:gauge-settle:{uuid.uuid4().hex}:"
        state = f'state: {{backend: redis, url_env: GAUGE_REDIS, key_prefix: "{prefix}", op_timeout_s: 5}}'
        env["GAUGE_REDIS"] = url
    started: list[RunningGateway] = []

    def make(tenant: str = "") -> RunningGateway:
        running = RunningGateway(_policy(upstream, state, tenant), env).start()
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()
    if url:
        store = redis.Redis.from_url(url)
        store.delete(*store.keys(prefix + "*") or [prefix])
        store.close()


def _policy(upstream: MockUpstream, state: str, tenant: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: GAUGE_ADMIN}}
        {state}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: {BUDGET}}}}}
        tenants:
          acme: {{{tenant}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
          fault-slow-first-byte-2500: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
        models:
          chat: {{provider: mock, model: mock-model}}
          slow: {{provider: mock, model: fault-slow-first-byte-2500}}
        """)


def _left(running: RunningGateway) -> tuple[float, float]:
    """The key's budget gauges now: (USD left, share left); NaN for one not there."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(running.metrics()):
        for sample in family.samples:
            if sample.labels == {"scope": "key", "name": "main"} and sample.name in (
                    "gateway_budget_remaining_usd", "gateway_budget_remaining_ratio"):
                found[sample.name] = sample.value
    return (found.get("gateway_budget_remaining_usd", float("nan")),
            found.get("gateway_budget_remaining_ratio", float("nan")))


def _reads(running: RunningGateway, usd: float, timeout: float = 10.0) -> tuple[float, float]:
    """The gauges once they read `usd` left (a remote store's settle runs beside the reply), or as they are at the
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        shown = _left(running)
        if shown[0] == pytest.approx(usd, abs=1e-6) or time.monotonic() > deadline:
            return shown
        time.sleep(0.05)


def _spent(running: RunningGateway, requests: int) -> float:
    """The key's cost as the usage counters have it, once they count `requests` (flushed once a second)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(running.url + "/admin/usage", params={"scope": "key", "name": "main"},
                             headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if (rows and rows[0]["requests"] >= requests) or time.monotonic() > deadline:
            assert rows and rows[0]["requests"] == requests, rows
            return float(rows[0]["cost_usd"])
        time.sleep(0.05)


def _chat(running: RunningGateway, model: str = "chat") -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", json={"model": model, "messages": MESSAGES},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def test_the_gauges_show_what_is_left_after_each_settle(start: Callable[..., RunningGateway]) -> None:
    """One answer settles (another request still holds its reservation: that counts), then the slow one settles, then
    a stream: each time the gauges read the budget less what was spent and what is still held."""
    running = start()
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: slow.setdefault("response", _chat(running, "slow")))
    thread.start()
    try:
        assert _reads(running, BUDGET - RESERVED)[0] == pytest.approx(BUDGET - RESERVED, abs=1e-6)  # slow reserved
        fast = _chat(running)
        assert fast.status_code == 200, fast.text
        cost = float(fast.headers["x-gateway-cost-usd"])
        assert 0 < cost < RESERVED / 10
        left = BUDGET - RESERVED - cost  # the slow request's reservation is still held
        assert _reads(running, left) == pytest.approx((left, left / BUDGET), abs=1e-6)
    finally:
        thread.join(30)
    assert slow["response"].status_code == 200, slow["response"].text
    spent = cost + float(slow["response"].headers["x-gateway-cost-usd"])
    assert _reads(running, BUDGET - spent) == pytest.approx((BUDGET - spent, (BUDGET - spent) / BUDGET), abs=1e-6)

    with httpx.stream("POST", running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "chat", "messages": MESSAGES, "stream": True}, timeout=30) as stream:
        assert stream.status_code == 200
        assert "data: [DONE]" in stream.read().decode()
    spent = _spent(running, 3)  # the stream's cost is the usage counters' third request's
    assert spent > cost * 2
    assert _reads(running, BUDGET - spent)[0] == pytest.approx(BUDGET - spent, abs=1e-6)


def test_a_reservation_given_back_is_not_shown_as_held(start: Callable[..., RunningGateway]) -> None:
    """The key's budget fits the reservation, the tenant's hard budget does not: the request is refused and what it
    reserved on the key is given back; the key's gauges read the whole budget, not the budget less that
    reservation."""
    running = start(tenant="budget: {usd: 0.5}")
    refused = _chat(running)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded", refused.text
    assert _reads(running, BUDGET) == pytest.approx((BUDGET, 1.0))
