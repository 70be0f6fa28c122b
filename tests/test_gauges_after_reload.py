"""A reload leaves no gauge behind that keeps an alert firing: the series only the old policy set are dropped
(a removed target's breaker state, the store it moved off, a removed budget), and the new policy's budget gauges
read the store at once, not at each scope's next request (a budget raised to end `GatewayBudgetNearlySpent`
went on reading spent). Real gateways, real reloads of their policy files, the suite's Redis."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway, free_port
from tests.support.redis_server import suite_redis_url
from tests.test_serve import serving

KEY = "gw-gauges-after-reload-key-0000000000000000"
AUTH = {"Authorization": f"Bearer {KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def _samples(running: RunningGateway | str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """`name`'s series now, by their sorted labels."""
    text = running if isinstance(running, str) else running.metrics()
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def _reload(running: RunningGateway, text: str) -> None:
    """Write the policy file and reload it, as the watcher, SIGHUP and `POST /admin/reload` do."""
    assert running.gateway.source is not None and running.gateway.loop is not None
    running.gateway.source.write_text(text)
    result = asyncio.run_coroutine_threadsafe(running.gateway.reload("test"), running.gateway.loop).result(30)
    assert result["result"] == "ok", result


def _until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _retired(running: RunningGateway) -> bool:
    return not running.gateway._retiring


def _breaker_policy(port: int, dead: bool, **server: object) -> str:
    """`chat` falls back from a target nothing listens for (`dead/m`) to the demo; without `dead`, the demo only."""
    server_fields = ", ".join(f"{k}: {v}" for k, v in server.items())
    providers = f'{{dead: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1"}}, demo: {{kind: demo}}}}'
    chat = "{targets: [{provider: dead, model: m}, {provider: demo, model: demo-1}]}" if dead \
        else "{provider: demo, model: demo-1}"
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, {server_fields}}}
        auth: none
        routing: {{breaker: {{failures: 1, cooldown_s: 600}}}}
        providers: {providers if dead else "{demo: {kind: demo}}"}
        models: {{chat: {chat}}}
        """)


def test_a_removed_targets_open_breaker_leaves_with_it(tmp_path: Path) -> None:
    closed = free_port()
    source = tmp_path / "gateway.yaml"
    running = RunningGateway(_breaker_policy(closed, dead=True, watch_policy="false"), {}, source=source).start()
    try:
        answer = httpx.post(running.base_url + "/chat/completions", json={"model": "chat", "messages": HELLO},
                            timeout=20)
        assert answer.status_code == 200
        assert _samples(running, "gateway_breaker_state")[(("target", "dead/m"),)] == 2.0  # the alert fires
        _reload(running, _breaker_policy(closed, dead=False, watch_policy="false"))
        assert _samples(running, "gateway_breaker_state") == {(("target", "demo/demo-1"),): 0.0}
        assert _until(lambda: _retired(running))  # and the old runtime's breakers wrote nothing back since
        assert _samples(running, "gateway_breaker_state") == {(("target", "demo/demo-1"),): 0.0}
    finally:
        running.stop()


def test_with_two_workers_a_removed_targets_breaker_reads_closed(tmp_path: Path) -> None:
    """Multiprocess mode cannot remove a series (its value stays in the worker's file): the reload sets it to 0,
    which the alert (`>= 2`) reads as fine, in every worker, and `remove`'s warning never reaches the log."""
    closed, port = free_port(), free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(_breaker_policy(closed, dead=True, watch_interval_s=0.2))
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=20) as client:
            answer = client.post(url + "/v1/chat/completions", json={"model": "chat", "messages": HELLO})
        assert answer.status_code == 200
        assert _samples(httpx.get(url + "/metrics").text, "gateway_breaker_state")[(("target", "dead/m"),)] == 2.0
        before = httpx.get(url + "/readyz").json()["policy_version"]
        policy.write_text(_breaker_policy(closed, dead=False, watch_interval_s=0.2))

        def both_reloaded() -> bool:  # a fresh connection each time: either worker answers
            return all(httpx.get(url + "/readyz", headers={"Connection": "close"}).json()["policy_version"] != before
                       for _ in range(8))

        assert _until(both_reloaded, 20)
        for _ in range(6):
            states = _samples(httpx.get(url + "/metrics", headers={"Connection": "close"}).text,
                              "gateway_breaker_state")
            assert states.get((("target", "dead/m"),), 0.0) == 0.0, states
        assert "Removal of labels" not in server.text()
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()


def _budget_policy(usd: float | None, state: str = "") -> str:
    """A key, its tenant and the alias `demo`, each with a budget of `usd` a day (None: no budgets)."""
    budget = f", budget: {{usd: {usd}, period: day}}" if usd is not None else ""
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, watch_policy: false, watch_interval_s: 0.2}}
        auth: keys
        keys: [{{name: team-key, tenant: team, hash: "{hash_key(KEY)}"{budget}}}]
        tenants: {{team: {{limits: {{rpm: 1000}}{budget}}}}}
        providers: {{demo: {{kind: demo}}}}
        prices: {{demo-1: {{input_per_mtok: 10000, output_per_mtok: 10000}}}}
        models: {{demo: {{provider: demo, model: demo-1{budget}}}}}
        """) + state


BUDGETS = [(("name", "team-key"), ("scope", "key")), (("name", "team"), ("scope", "tenant")),
           (("name", "demo"), ("scope", "model"))]


def _spend(running: RunningGateway) -> None:
    """One answer of about 0.3 USD, after a reservation of about 0.6 (50 tokens at most, 0.01 USD a token)."""
    answer = httpx.post(running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                        json={"model": "demo", "messages": HELLO, "max_tokens": 50})
    assert answer.status_code == 200, answer.text


def test_a_raised_budget_reads_its_room_at_once_and_a_removed_one_goes(tmp_path: Path) -> None:
    running = RunningGateway(_budget_policy(1.0), {}, source=tmp_path / "gateway.yaml").start()
    try:
        _spend(running)
        ratios = _samples(running, "gateway_budget_remaining_ratio")
        assert sorted(ratios) == sorted(BUDGETS) and all(r < 0.9 for r in ratios.values()), ratios
        _reload(running, _budget_policy(1000.0))  # the runbook's fix; no request after it
        usd = _until(lambda: (found := _samples(running, "gateway_budget_remaining_usd"))
                     and all(v > 999 for v in found.values()) and found)
        assert usd and sorted(usd) == sorted(BUDGETS), usd
        assert all(value < 1000 for value in usd.values())  # what was spent is still counted
        ratios = _samples(running, "gateway_budget_remaining_ratio")
        assert ratios == {label: pytest.approx(usd[label] / 1000) for label in BUDGETS}
        _reload(running, _budget_policy(None))  # the budgets removed
        assert _samples(running, "gateway_budget_remaining_ratio") == {}
        assert _samples(running, "gateway_budget_remaining_usd") == {}
        assert _until(lambda: _retired(running))
        assert _samples(running, "gateway_budget_remaining_ratio") == {}
    finally:
        running.stop()


def test_budget_gauges_after_a_reload_read_what_the_shared_store_counts(tmp_path: Path, redis_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica that served none of a budget's requests shows the spend its peers counted in Redis once it
    reloads, as it would after its first request."""
    monkeypatch.setenv("GW_GAUGES_REDIS", redis_url)
    prefix = f"gwtest-gauges:{uuid.uuid4().hex}:"
    state = f'state: {{backend: redis, url_env: GW_GAUGES_REDIS, key_prefix: "{prefix}"}}\n'
    env = {"GW_GAUGES_REDIS": redis_url}
    spender = RunningGateway(_budget_policy(1.0, state), env).start()
    idle = RunningGateway(_budget_policy(1.0, state), env, source=tmp_path / "gateway.yaml").start()
    store = redis.Redis.from_url(redis_url)
    try:
        _spend(spender)
        counter = f"{prefix}acct:budget:model:demo:d{time.strftime('%Y%m%d', time.gmtime())}"

        def settled() -> int:  # the reservation settled to the answer's cost (in a task beside the reply)
            first = int(store.get(counter) or 0)
            time.sleep(0.2)
            return first if first == int(store.get(counter) or 0) and first < 600_000 else 0

        spent = _until(settled) / 1_000_000
        assert 0 < spent < 0.6
        assert _samples(idle, "gateway_budget_remaining_usd") == {}
        _reload(idle, _budget_policy(2.0, state))
        usd = _until(lambda: _samples(idle, "gateway_budget_remaining_usd"))
        assert usd[(("name", "demo"), ("scope", "model"))] == pytest.approx(2.0 - spent)
    finally:
        spender.stop()  # first: a ledger flushes its usage counters as it stops
        idle.stop()
        store.delete(*store.keys(prefix + "*") or [prefix])
        store.close()


def test_the_store_left_behind_no_longer_reads_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Onto a Redis that does not answer and off it again: the reload onto it is not held up by the budget gauges'
    read (nor broken by its failure); once back on memory, only `memory` reads, and the budget its fresh store
    has (nothing spent in it) reads whole."""
    monkeypatch.setenv("GW_GAUGES_DEAD_REDIS", f"redis://127.0.0.1:{free_port()}/0")
    dead = ("state: {backend: redis, url_env: GW_GAUGES_DEAD_REDIS, connect_timeout_s: 0.2, op_timeout_s: 0.2}\n")
    running = RunningGateway(_budget_policy(1.0), {}, source=tmp_path / "gateway.yaml").start()
    try:
        _spend(running)
        assert _samples(running, "gateway_store_up") == {(("backend", "memory"),): 1.0}
        started = time.monotonic()
        _reload(running, _budget_policy(1.5, dead))
        assert time.monotonic() - started < 5
        down = {(("backend", "redis"),): 0.0}
        assert _until(lambda: _samples(running, "gateway_store_up") == down), _samples(running, "gateway_store_up")
        assert httpx.get(running.url + "/readyz").json()["store"] == {"backend": "redis", "healthy": False}
        _reload(running, _budget_policy(1.0))
        time.sleep(0.5)  # the store watcher's next ticks (`watch_interval_s`: 0.2 s)
        assert _samples(running, "gateway_store_up") == {(("backend", "memory"),): 1.0}
        ratios = _until(lambda: (found := _samples(running, "gateway_budget_remaining_ratio"))
                        and all(r == 1.0 for r in found.values()) and found)
        assert ratios and sorted(ratios) == sorted(BUDGETS), _samples(running, "gateway_budget_remaining_ratio")
    finally:
        running.stop()
