"""Counters that another program overwrote in the gateway's Redis (a hash, or a string that is not a number,
where a usage or budget counter lives): the ledger drops or gives up that one counter and keeps writing the
others, logs it once, and `GET /admin/usage` answers 503 `store_unavailable` rather than a 500. A real Redis
(`GATEWAY_TEST_REDIS_URL`), under a key prefix of each test's own, deleted after."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from gateway.accounting import ledger as ledger_module
from gateway.accounting.ledger import Ledger
from gateway.store.base import StoreConfig
from gateway.store.redis import RedisStore
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_accounting import ADMIN, KEY, OTHER, accounting_policy, client

COST = 0.02  # one mock answer: 20 output tokens at $1000 per million
UNITS = 1_000_000  # a counter's units per USD or per count


@pytest.fixture
def shared() -> Iterator[tuple[str, str, redis.Redis]]:
    """A Redis URL, a key prefix of this test's own, and a client (the prefix's keys are deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        raw = redis.Redis.from_url(url)
        try:
            yield url, prefix, raw
        finally:
            keys = list(raw.scan_iter(match=prefix + "*", count=1000))
            if keys:
                raw.delete(*keys)
            raw.close()


def _gateway(upstream: MockUpstream, url: str, prefix: str, **policy: str) -> RunningGateway:
    state = (f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 5, '
             "on_unavailable: open}")  # (generous: a loaded machine must not take the store for down)
    return RunningGateway(accounting_policy(upstream, state=state, **policy),
                          {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": url, "ACCT_ADMIN": ADMIN}).start()


def _ask(gateway: RunningGateway, key: str) -> None:
    answer = client(gateway, key).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=20)
    assert answer.usage is not None and answer.usage.completion_tokens == 20


def _usage(gateway: RunningGateway, scope: str, name: str) -> httpx.Response:
    return httpx.get(gateway.url + "/admin/usage", params={"scope": scope, "name": name},
                     headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def _row(gateway: RunningGateway, scope: str, name: str) -> dict[str, object]:
    response = _usage(gateway, scope, name)
    assert response.status_code == 200, response.text
    return dict(response.json()["usage"][0])


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


def _wait(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def _dropped(exposition: str) -> dict[str, float]:
    """`gateway_accounting_dropped_total` by kind."""
    return {sample.labels["kind"]: sample.value for family in text_string_to_metric_families(exposition)
            if family.name == "gateway_accounting_dropped" for sample in family.samples
            if sample.name.endswith("_total")}


@pytest.mark.parametrize("kind", ["hash", "string"])
def test_a_usage_counter_another_program_overwrote_drops_only_its_own_writes(
    shared: tuple[str, str, redis.Redis], upstream: MockUpstream, caplog: pytest.LogCaptureFixture, kind: str,
) -> None:
    """The alias's cost counter is folded first from every request, so it led every flush: the replica wrote no
    usage at all for the rest of the day. Now every other counter is written, and the bad one logged once."""
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    url, prefix, raw = shared
    day = datetime.now(UTC).strftime("%Y%m%d")
    bad = f"acct:usage:model:chat:{day}:cost_usd"
    if kind == "hash":
        raw.hset(prefix + bad, "x", "y")
    else:
        raw.set(prefix + bad, "not-a-number")
    gateway = _gateway(upstream, url, prefix, accounting="always: true")
    try:
        _ask(gateway, KEY)
        _ask(gateway, OTHER)
        _wait(lambda: _row(gateway, "tenant", "acme")["requests"] == 2)
        for name in ("main", "second"):
            row = _row(gateway, "key", name)
            assert (row["requests"], row["completion_tokens"]) == (1, 20), row
            assert row["cost_usd"] == pytest.approx(COST)
        tenant = _row(gateway, "tenant", "acme")
        assert tenant["requests"] == 2 and tenant["cost_usd"] == pytest.approx(2 * COST)
        # the alias's other counters too: only the one the store refuses is dropped
        assert int(raw.get(f"{prefix}acct:usage:model:chat:{day}:requests") or 0) == 2 * UNITS
        assert int(raw.get(f"{prefix}acct:usage:model:chat:{day}:completion_tokens") or 0) == 40 * UNITS

        # the alias's report cannot be read whole: a clean 503, the bad counter named in the log
        report = _usage(gateway, "model", "chat")
        assert report.status_code == 503, report.text
        error = report.json()["error"]
        assert error["code"] == "store_unavailable" and "does not hold a count" in error["message"]
        assert _logged(caplog, f"usage report: counter {bad} holds something other than a count")

        _ask(gateway, KEY)  # the bad counter is refused again at later flushes: still logged once
        _wait(lambda: _row(gateway, "key", "main")["requests"] == 2)
        assert _row(gateway, "key", "main")["requests"] == 2
        refused = _logged(caplog, "refused usage counter")
        assert [record.args for record in refused] == [(bad,)]
        # logged once, counted each time: an alert can see that usage is being dropped
        dropped = _dropped(gateway.metrics())  # (one a flush that had cost for it: two or three)
        assert dropped["usage"] >= 2 and (dropped["budget"], dropped["operation"]) == (0.0, 0.0), dropped
        assert not [record for record in caplog.records if KEY in record.getMessage() or OTHER in record.getMessage()]
        assert raw.type(prefix + bad) == (b"hash" if kind == "hash" else b"string")  # left as it was found
    finally:
        gateway.stop()


def test_a_budget_counter_that_cannot_be_written_is_given_up_after_its_bound(
    shared: tuple[str, str, redis.Redis], upstream: MockUpstream, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tenant's budget counter is a hash: a request is served all the same (`open`, and the store answers),
    its key's budget counted, and its spend owed to the tenant's. That delta used to be sent every second for
    good (`gateway_accounting_pending_counters` stuck at 1); now it is sent again only for the bound operations
    in doubt have (`OP_RETRY_S`, shortened here), then dropped and logged with its amount."""
    bound = 3.0
    monkeypatch.setattr(ledger_module, "OP_RETRY_S", bound)
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    url, prefix, raw = shared
    day = datetime.now(UTC).strftime("d%Y%m%d")
    bad, good = f"acct:budget:tenant:acme:{day}", f"{prefix}acct:budget:key:main:{day}"
    raw.hset(prefix + bad, "x", "y")
    budget = "budget: {usd: 100, period: day}"
    gateway = _gateway(upstream, url, prefix, key=budget, tenant=budget)
    try:
        _ask(gateway, KEY)  # served: the store refused the reservation, but it answers (and `open`)

        def pending() -> float:
            lines = [line for line in gateway.metrics().splitlines()
                     if line.startswith("gateway_accounting_pending_counters ")]
            return float(lines[0].split()[1])

        _wait(lambda: int(raw.get(good) or 0) == COST * UNITS)
        assert int(raw.get(good) or 0) == COST * UNITS
        assert pending() == 1  # the tenant's: sent again until its bound
        _wait(lambda: pending() == 0, bound + 8)
        assert pending() == 0
        (first,) = _logged(caplog, f"refused budget counter {bad}")
        (dropped,) = _logged(caplog, f"dropped +{COST:.6f} USD owed to budget counter {bad}")
        assert dropped.created - first.created >= bound - 0.05  # sent again at each flush until then
        assert raw.type(prefix + bad) == b"hash"
    finally:
        gateway.stop()


async def test_a_budget_delta_the_store_refuses_holds_back_no_other_and_is_dropped_after_its_bound(
    shared: tuple[str, str, redis.Redis], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger on a real Redis store: spend owed to a counter that is a hash, ahead of spend owed to a good
    one (as after an outage), and an operation whose settle was never sent. The good one is added at once, the
    refused ones sent again for their bound only (each flush used to stop at the first, for good)."""
    bound = 1.0
    monkeypatch.setattr(ledger_module, "OP_RETRY_S", bound)
    caplog.set_level(logging.INFO, logger="gateway.accounting")
    url, prefix, raw = shared
    bad, good = "acct:budget:key:bad:d20260101", "acct:budget:key:good:d20260101"
    raw.hset(prefix + bad, "x", "y")
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=prefix, op_timeout_s=5.0,
                                   connect_timeout_s=5.0))
    await store.start()
    try:
        dropped = Counter("gateway_accounting_dropped", "", ("kind",), registry=CollectorRegistry())
        ledger = Ledger(store, metrics_dropped=dropped)
        ledger.owe(bad, 20_000, 3600)
        ledger.owe(good, 30_000, 3600)
        ledger.owe_op(bad, "never-sent", 0.0, 0.01, 3600, sent=False)  # (sent until the store answers: unbounded)
        await ledger.flush()
        assert store.healthy and raw.get(prefix + good) == b"30000"
        assert ledger.pending == 2  # the refused delta and operation, kept for their bound
        ledger.owe(bad, 10_000, 3600)  # spend owed to it meanwhile joins it
        await ledger.flush()
        assert ledger.pending == 2
        await asyncio.sleep(bound)
        await ledger.flush()
        assert ledger.pending == 0 and raw.get(prefix + good) == b"30000"
        assert len(_logged(caplog, f"refused budget counter {bad}")) == 1
        assert _logged(caplog, f"dropped +0.030000 USD owed to budget counter {bad}")
        assert _logged(caplog, f"gave up an operation on {bad}")
        assert {s.labels["kind"]: s.value for s in dropped.collect()[0].samples if s.name.endswith("_total")} == {
            "usage": 0.0, "budget": 1.0, "operation": 1.0}
        assert raw.type(prefix + bad) == b"hash"
    finally:
        await store.aclose()
