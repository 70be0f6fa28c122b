"""A request cancelled while Redis has its reservations (the client left, a shutdown) leaves nothing held.

The reservations of a request go to Redis in one step (`Store.reserve_together`). When the client leaves while
that step waits for Redis, the request's task is cancelled, and Redis may still apply the step afterwards: it
was slow, not gone. The key's concurrency slot used to stay held for the rest of its lease (`accounting.lease_s`,
15 minutes by default: a key with `concurrent: 1` refused every request meanwhile) and the budget's reservation
stayed in its counter as spend for the rest of the period. Now the ledger gives both back as it does a take that
timed out. The stall runs on a private redis-server (`tests/test_accounting_idempotent.py`, which this reuses);
the held reply of one chosen command on a proxy in front of the suite's Redis (`tests/support/delay_proxy.py`).
"""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.delay_proxy import DelayProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url
from tests.test_accounting_idempotent import ADMIN, COST, KEY, Stalled, _wait

STALL_S = 1.5  # Redis busy: every command waits this long
OP_TIMEOUT_S = 4.0  # longer than the stall: the reservation is still waiting for its answer when the client leaves


def _policy(upstream: MockUpstream, prefix: str, limits: str, op_timeout_s: float = OP_TIMEOUT_S) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ACCT_ADMIN, watch_interval_s: 3600}}
        state: {{backend: redis, url_env: GW_STALLED_REDIS, key_prefix: "{prefix}", op_timeout_s: {op_timeout_s},
                 on_unavailable: closed}}
        routing: {{breaker: {{sync_interval_s: 60}}}}
        auth: keys
        keys:
          - name: main
            tenant: acme
            hash: "{hash_key(KEY)}"
            {limits}
            budget: {{usd: 10, period: day}}
        tenants:
          acme: {{}}
        providers:
          mock:
            kind: openai
            base_url: {upstream.base_url}
            api_key_env: MOCK_UPSTREAM_KEY
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: 1000}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """)


@pytest.fixture(params=["limits: {concurrent: 1}", "# (no limits: the budget's reservation is the only step)"],
                ids=["slot-and-budget", "budget-alone"])
def gateway(upstream: MockUpstream, request: pytest.FixtureRequest) -> Iterator[Stalled]:
    server = RedisServer()
    server.start()
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_STALLED_REDIS": server.url, "ACCT_ADMIN": ADMIN}
    try:
        running = RunningGateway(_policy(upstream, prefix, request.param), env).start()
    except BaseException:
        server.close()
        raise
    found = Stalled(server, running, prefix)
    try:
        assert found.ask().status_code == 200  # connections made and scripts loaded before the stall
        _wait(lambda: found.budget() == pytest.approx(COST))
        yield found
    finally:
        for thread in found.stalls:
            thread.join(10)
        running.stop()
        found.raw.close()
        server.close()


def _slots_held(gateway: Stalled) -> int:
    """Concurrency slots Redis holds for the key now (its sorted set's members whose lease has not run out)."""
    now_ms = int(time.time() * 1000)
    return sum(gateway.raw.zcount(key, f"({now_ms}", "+inf") for key in gateway.raw.scan_iter(
        match=f"{gateway.prefix}acct:conc:*", _type="zset"))


def test_a_request_whose_client_left_while_redis_had_its_reservations_holds_no_slot_nor_budget(
        gateway: Stalled) -> None:
    gateway.settled()
    busy = gateway.stall(STALL_S)
    time.sleep(0.2)  # (busy by now: the request's reservations wait for Redis)
    with pytest.raises(httpx.ReadTimeout):  # the client leaves while they wait
        httpx.post(gateway.gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
                   timeout=0.4)
    busy.join()  # Redis applies them now
    gateway.settled()
    assert _slots_held(gateway) == 0  # the slot was given back: it used to be held for the lease (15 minutes)
    # The first request's spend alone: the lost reservation ($0.02) used to stay in the counter for the day.
    assert gateway.budget() == pytest.approx(COST, abs=1e-9)
    answer = gateway.ask()  # with `concurrent: 1`: admitted only with the slot free
    assert answer.status_code == 200, answer.text
    _wait(lambda: gateway.budget() == pytest.approx(2 * COST))
    assert gateway.budget() == pytest.approx(2 * COST, abs=1e-9)


def test_a_request_whose_client_left_while_its_budget_was_asked_gives_back_the_slot_its_limits_took(
        upstream: MockUpstream) -> None:
    """Limits, then budgets: two steps. The client leaves while Redis has the budget's reservation (its reply held
    by a proxy), after the limits' step took the key's slot: the slot used to stay held for its lease."""
    with suite_redis_url() as url, DelayProxy(urlsplit(url).port or 6379) as proxy:
        db = int(urlsplit(url).path.lstrip("/") or "0")
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_STALLED_REDIS": proxy.url(db), "ACCT_ADMIN": ADMIN}
        running = RunningGateway(_policy(upstream, prefix, "limits: {concurrent: 1}", op_timeout_s=30), env).start()
        raw = redis.Redis.from_url(url)
        budget_key = f"{prefix}acct:budget:key:main:{datetime.now(UTC).strftime('d%Y%m%d')}"
        try:
            def ask(timeout: float = 20) -> httpx.Response:
                return httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                  json={"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 20}, timeout=timeout)

            assert ask().status_code == 200  # connections made and scripts loaded
            slots = f"{prefix}acct:conc:*"
            _wait(lambda: int(raw.get(budget_key) or 0) == round(COST * 1_000_000))
            # The settle gives the slot back after it writes the budget: asked before, `concurrent: 1` answered 429.
            _wait(lambda: not any(raw.zcard(key) for key in raw.scan_iter(match=slots)))
            proxy.hold(b"acct:budget")  # the budget's reservation: it runs in Redis, its reply waits
            with pytest.raises(httpx.ReadTimeout):
                ask(timeout=1.0)
            assert proxy.held.is_set()  # the client left while the budget's step waited (the slot taken before)
            proxy.release()
            _wait(lambda: not any(raw.zcard(key) for key in raw.scan_iter(match=slots)))
            assert not any(raw.zcard(key) for key in raw.scan_iter(match=slots))  # the slot given back
            _wait(lambda: int(raw.get(budget_key) or 0) == round(COST * 1_000_000))
            assert int(raw.get(budget_key) or 0) == round(COST * 1_000_000)  # the lost reservation given back
            answer = ask()  # `concurrent: 1`: admitted only with the slot free
            assert answer.status_code == 200, answer.text
        finally:
            running.stop()
            for key in raw.scan_iter(match=f"{prefix}*"):
                raw.delete(key)
            raw.close()
