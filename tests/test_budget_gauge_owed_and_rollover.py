"""The budget gauges after a settle the store missed, and after a settle that comes in the next budget period.

* A settle Redis did not take (it stalled: owed to the ledger, sent again once it answers) was never shown: no
  settle's answer carries it, so an idle key's gauges went on reading its whole reservation as spent. The ledger's
  flush that writes it has the stage read its budgets again (`Admission.refresh_budgets`).
* A request reserved in one period of a budget and settled in the next wrote the old period's total over the new
  period's gauges (`StageState._show_total` skips a counter that is not the current period's).

Real gateways, the mock upstream, a private Redis that the test stalls (SIGSTOP) or the suite's (a key prefix of
its own, deleted afterwards). The period test moves the accounting stage's wall clock (`time.time`), not the
store's."""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import gateway.accounting.admission as admission_module
import gateway.accounting.bill as bill_module
import gateway.accounting.settling as settling_module
from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url

KEY = "gw-budget-gauge-owed-key-000000000000000000000"
MESSAGES = [{"role": "user", "content": "hello there"}]


def _left(running: RunningGateway) -> float:
    """The key's `gateway_budget_remaining_usd` now (NaN when absent)."""
    for family in text_string_to_metric_families(running.metrics()):
        for sample in family.samples:
            if sample.name == "gateway_budget_remaining_usd" and sample.labels == {"scope": "key", "name": "main"}:
                return sample.value
    return float("nan")


def _reads(running: RunningGateway, usd: float, timeout: float = 10.0) -> float:
    """The gauge once it reads `usd`, or as it is at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        shown = _left(running)
        if shown == pytest.approx(usd, abs=1e-6) or time.monotonic() > deadline:
            return shown
        time.sleep(0.05)


def _chat(running: RunningGateway, model: str = "chat") -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", json={"model": model, "messages": MESSAGES},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def _in_thread(running: RunningGateway, model: str) -> tuple[threading.Thread, dict[str, Any]]:
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("response", _chat(running, model)))
    thread.start()
    return thread, answer


def _policy(upstream: MockUpstream, state: str, budget: str, prices: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        {state}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {budget}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {prices}
          fault-slow-first-byte-2500: {prices}
        models:
          chat: {{provider: mock, model: mock-model}}
          slow: {{provider: mock, model: fault-slow-first-byte-2500}}
        """)


def test_a_settle_owed_while_redis_stalled_shows_once_the_ledger_writes_it(upstream: MockUpstream) -> None:
    """The slow request reserves $0.82 of $2; Redis stalls before it settles (its settle times out: owed), and
    answers again: once the ledger sends the settle, the gauge reads $2 less the request's cost."""
    reserved = 4096 * 200 / 1_000_000
    with RedisServer() as server:
        state = 'state: {backend: redis, url_env: OWED_REDIS, key_prefix: "owed:", op_timeout_s: 0.3, ' \
                'on_unavailable: open}'
        running = RunningGateway(_policy(upstream, state, "{usd: 2.0}", "{input_per_mtok: 0, output_per_mtok: 200}"),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "OWED_REDIS": server.url}).start()
        try:
            thread, slow = _in_thread(running, "slow")
            try:
                assert _reads(running, 2.0 - reserved) == pytest.approx(2.0 - reserved, abs=1e-6)
                server.pause()
            finally:
                thread.join(30)
            answer = slow["response"]
            assert answer.status_code == 200, answer.text
            cost = float(answer.headers["x-gateway-cost-usd"])
            assert 0 < cost < reserved / 10
            time.sleep(1.0)  # its settle (beside the reply) meets the stalled store: owed
            assert _left(running) == pytest.approx(2.0 - reserved, abs=1e-6)
            server.resume()
            assert _reads(running, 2.0 - cost) == pytest.approx(2.0 - cost, abs=1e-6)
        finally:
            server.resume()
            running.stop()


class _Clock:
    """`time` for the accounting stage's modules, its wall clock (`time.time`) set by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture(params=["memory", "redis"])
def store_state(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(the policy's `state:` line, the Redis URL or "", its key prefix), for the store the test is parametrized
    with (on Redis, the prefix's keys deleted afterwards)."""
    if request.param == "memory":
        yield "", "", ""
        return
    prefix = f"gwtest:gauge-period:{uuid.uuid4().hex}:"
    with suite_redis_url() as url:
        try:
            state = f'state: {{backend: redis, url_env: PERIOD_REDIS, key_prefix: "{prefix}", op_timeout_s: 5}}'
            yield state, url, prefix
        finally:
            client = redis.Redis.from_url(url)
            client.delete(*client.keys(prefix + "*") or [prefix])
            client.close()


def test_a_settle_after_its_budget_period_ended_leaves_the_new_periods_gauge(
        upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch, store_state: tuple[str, str, str]) -> None:
    """A rolling budget of $1 a minute, requests priced by their prompt (a reservation costs what the answer does):
    three requests and a slow one reserved in one minute; the next minute's first request shows that minute's
    figure, which the slow one's settle, after it, leaves as it is (it read the minute before's, nearly spent)."""
    start = (int(time.time() // 60) + 10) * 60  # a minute to come: its requests count under a key of their own
    clock = _Clock(start + 30)
    for module in (admission_module, bill_module, settling_module):
        monkeypatch.setattr(module, "time", clock, raising=False)  # (bill.py: `_show_total`)
    state, url, prefix = store_state
    text = _policy(upstream, state, "{usd: 1.0, period: rolling, window_s: 60}",
                   "{input_per_mtok: 20000, output_per_mtok: 0}")
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "PERIOD_REDIS": url}).start()
    try:
        costs = [float(_chat(running).headers["x-gateway-cost-usd"]) for _ in range(3)]
        assert _reads(running, 1.0 - sum(costs)) == pytest.approx(1.0 - sum(costs), abs=1e-6)
        thread, slow = _in_thread(running, "slow")
        try:
            deadline = time.monotonic() + 5
            while _left(running) > 1.0 - sum(costs) - 1e-6 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _left(running) < 1.0 - sum(costs) - 1e-6  # the slow one's reservation counted
            clock.now = start + 65  # the next minute
            answer = _chat(running)
            assert answer.status_code == 200, answer.text
            fresh = 1.0 - float(answer.headers["x-gateway-cost-usd"])
            assert _reads(running, fresh) == pytest.approx(fresh, abs=1e-6)
        finally:
            thread.join(30)
        assert slow["response"].status_code == 200, slow["response"].text
        if url:  # on Redis the settle runs beside the reply: done once the minute before's counter holds it
            spent = sum(costs) + float(slow["response"].headers["x-gateway-cost-usd"])
            _wait_for_counter(url, f"{prefix}acct:budget:key:main:r60-{int(start // 60)}", spent)
        assert _left(running) == pytest.approx(fresh, abs=1e-6)
    finally:
        running.stop()


def _wait_for_counter(url: str, key: str, spent: float) -> None:
    """Until the budget counter `key` holds `spent` USD (to a few millionths: each request's cost is rounded to
    one), within 10 s."""
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    try:
        while True:
            found = int(client.get(key) or 0) / 1e6
            if abs(found - spent) < 1e-5:
                return
            assert time.monotonic() < deadline, (found, spent)
            time.sleep(0.05)
    finally:
        client.close()
