"""A reload while Redis is away keeps the spend the old runtime's ledger holds for it.

docs/accounting.md: with `on_unavailable: open`, settles the store could not take are kept in the ledger and added
once the store answers again. A reload in that window (file watcher, SIGHUP, POST /admin/reload) retired the old
runtime, whose ledger made one flush attempt at its close (Redis still away) and was dropped with what it held:
the new runtime started an empty ledger, and the spend was never written, with nothing logged or counted. Now the
old ledger passes what it holds to the new one when both write the same Redis data; onto another store, what is
lost is counted in `gateway_accounting_dropped_total` and logged. Each test runs a private redis-server on a free
port (stopped and removed after).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from gateway.accounting.ledger import Ledger
from gateway.store.base import StoreConfig
from gateway.store.redis import RedisStore
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, free_port
from tests.test_accounting import ADMIN, KEY, MESSAGES, accounting_policy

COST = 0.02  # one mock answer: 20 output tokens at $1000 per million


def _budget_counter(client: redis.Redis, prefix: str) -> float:
    day = datetime.now(UTC).strftime("d%Y%m%d")
    raw = client.get(f"{prefix}acct:budget:key:main:{day}")
    return int(raw) / 1_000_000 if raw is not None else 0.0


def _wait(condition: Callable[[], object], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def _dropped(exposition: str) -> dict[str, float]:
    """`gateway_accounting_dropped_total` by kind."""
    return {sample.labels["kind"]: sample.value for family in text_string_to_metric_families(exposition)
            if family.name == "gateway_accounting_dropped" for sample in family.samples
            if sample.name.endswith("_total")}


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def _state(prefix: str) -> str:
    return (f'state: {{backend: redis, url_env: GW_PRIVATE_REDIS, key_prefix: "{prefix}", op_timeout_s: 0.2, '
            "on_unavailable: open}")


def _spend_while_redis_is_away(upstream: MockUpstream, server: RedisServer, source: Path, prefix: str,
                               monkeypatch: pytest.MonkeyPatch) -> RunningGateway:
    """A gateway with a key budget on `server`, one request counted there, then Redis stopped and three requests
    served open: their spend waits in the ledger."""
    text = accounting_policy(upstream, key="budget: {usd: 1, period: day}", state=_state(prefix))
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": server.url, "ACCT_ADMIN": ADMIN}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # a reload reads them from the process environment
    gateway = RunningGateway(text, env, source=source).start()
    try:
        api, body = gateway.base_url + "/chat/completions", {"model": "chat", "messages": MESSAGES, "max_tokens": 20}
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(api, json=body, headers=auth, timeout=20).status_code == 200
        client = redis.Redis.from_url(server.url)
        assert _wait(lambda: _budget_counter(client, prefix) == pytest.approx(COST))
        client.close()
        server.stop()
        down = [httpx.post(api, json=body, headers=auth, timeout=20).status_code for _ in range(3)]
        assert down == [200] * 3
    except BaseException:
        gateway.stop()
        raise
    return gateway


def _reload(gateway: RunningGateway) -> None:
    loop = gateway.gateway.loop
    assert loop is not None
    result = asyncio.run_coroutine_threadsafe(gateway.gateway.reload("test"), loop).result(30)
    assert result["result"] == "ok", result


def test_spend_held_for_an_absent_redis_survives_a_reload(upstream: MockUpstream, server: RedisServer,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"gwtest-reload:{uuid.uuid4().hex}:"
    source = tmp_path / "policy.yaml"
    gateway = _spend_while_redis_is_away(upstream, server, source, prefix, monkeypatch)
    try:
        source.write_text(source.read_text() + "# an unrelated edit\n")
        _reload(gateway)
        server.start()  # same port, empty data
        client = redis.Redis.from_url(server.url)
        try:
            _wait(lambda: _budget_counter(client, prefix) == pytest.approx(3 * COST))
            assert _budget_counter(client, prefix) == pytest.approx(3 * COST), \
                "the spend made while Redis was away was lost by the reload"
        finally:
            client.close()
        assert sum(_dropped(gateway.metrics()).values()) == 0
    finally:
        gateway.stop()


def test_a_reload_onto_another_store_counts_the_spend_it_drops(upstream: MockUpstream, server: RedisServer,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Another key prefix is other data: the spend owed to the old counters cannot follow, and is not lost
    silently."""
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    prefix = f"gwtest-reload:{uuid.uuid4().hex}:"
    source = tmp_path / "policy.yaml"
    gateway = _spend_while_redis_is_away(upstream, server, source, prefix, monkeypatch)
    try:
        assert sum(_dropped(gateway.metrics()).values()) == 0
        source.write_text(source.read_text().replace(prefix, prefix + "other:"))
        _reload(gateway)
        assert _wait(lambda: not gateway.gateway._retiring)  # the old runtime closed
        dropped = _dropped(gateway.metrics())
        assert dropped["budget"] + dropped["operation"] >= 1, dropped
        lines = [r.getMessage() for r in caplog.records if "the store did not take: dropped" in r.getMessage()]
        assert len(lines) == 1, lines
        assert KEY not in lines[0]
    finally:
        gateway.stop()


async def test_what_a_ledger_holds_follows_reloads_in_quick_succession(caplog: pytest.LogCaptureFixture) -> None:
    """Three runtimes on one Redis (away): the second retires before the first; the first's spend still reaches the
    third, and the third, closing with no heir (a shutdown), counts it dropped."""
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    store = RedisStore(StoreConfig(backend="redis", url=f"redis://127.0.0.1:{free_port()}/0", op_timeout_s=0.2,
                                   connect_timeout_s=0.2))
    await store.start()  # nothing listens there: unhealthy, not an error
    try:
        dropped = Counter("gateway_accounting_dropped", "", ("kind",), registry=CollectorRegistry())
        first, second, third = (Ledger(store, metrics_dropped=dropped) for _ in range(3))
        first.owe("acct:budget:key:main:d20260101", 20_000, 3600)
        first.owe_op("acct:budget:key:main:d20260101", "op-in-doubt", 0.0, 0.01, 3600)
        first.owe_release("acct:slot:key:main", "holder", 60.0)
        first.bequeath(second)
        second.bequeath(third)
        await second.aclose()
        await first.aclose()
        assert (first.pending, second.pending, third.pending) == (0, 0, 2)
        assert third.pending_usd() == pytest.approx(0.02)
        await third.aclose()
        assert third.pending == 0
        counts = {s.labels["kind"]: s.value for s in dropped.collect()[0].samples if s.name.endswith("_total")}
        assert counts == {"usage": 0.0, "budget": 1.0, "operation": 1.0}
        assert any("1 budget counter(s) (+0.020000 USD), 1 operation(s) in doubt" in r.getMessage()
                   for r in caplog.records)
    finally:
        await store.aclose()
