"""Counter operations whose answer was lost count once: a Redis stall around `state.op_timeout_s` leaves every
budget counter (and usage counter) exact.

An operation that timed out may still be applied by Redis afterwards (it was slow, not gone). Reservations and
settles go under an operation id that the Lua scripts record beside the counter: a repeat by the ledger, and a
reservation that arrives after it was given up, change nothing. The script semantics run on the suite's Redis
(GATEWAY_TEST_REDIS_URL, a key prefix of their own, deleted afterwards) and on a one-node cluster; the stalls run
on a private redis-server, made busy for a second by a slow Lua script from another connection (Redis answers
nothing else meanwhile, then applies what waited): stalling the suite's Redis would stall everyone's tests.
"""

from __future__ import annotations

import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.accounting.ledger import Ledger
from gateway.accounting.stage import Accounting
from gateway.auth.keys import hash_key
from gateway.store import RedisStore, StoreConfig
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url

KEY = "gw-idem-test-key-00000000000000000000000"
ADMIN = "admin-token-for-idempotence-tests"
MESSAGES = [{"role": "user", "content": "hello there"}]
COST = 0.02  # one answer: 20 output tokens at $1000 per million (`max_tokens: 20` reserves exactly this)
SLOW_COST = 0.05  # the slow model's answer: 50 output tokens
OP_TIMEOUT = 0.2
STALL_S = 1.5  # well past the op timeout; under Redis's 5 s busy-script threshold (then it answers BUSY)
BUSY = """
local start = redis.call('TIME')
local from = tonumber(start[1]) * 1000000 + tonumber(start[2])
local now = start
repeat now = redis.call('TIME') until tonumber(now[1]) * 1000000 + tonumber(now[2]) - from >= tonumber(ARGV[1])
return 1
"""


# -- the scripts' semantics ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with RedisServer(cluster=True) as server:
        yield f"redis+cluster://127.0.0.1:{server.port}"


@pytest.fixture(params=["redis", "redis tagged", "cluster", "cluster tagged"])
async def remote(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisStore, str]]:
    """A started Redis store with a prefix of its own (plain, or a hash tag: every key then in one slot), and the
    prefix; its keys (operation records included) are deleted afterwards."""
    url = request.getfixturevalue("cluster_url" if request.param.startswith("cluster") else "redis_url")
    token = uuid.uuid4().hex
    prefix = f"{{gwtest{token}}}:" if request.param.endswith("tagged") else f"gwtest:{token}:"
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=prefix, op_timeout_s=5.0,
                                   connect_timeout_s=5.0))
    await store.start()
    try:
        yield store, prefix
    finally:
        await store.aclose()
        raw = (aioredis.RedisCluster.from_url(url.replace("redis+cluster://", "redis://"))
               if request.param.startswith("cluster") else aioredis.Redis.from_url(url))
        try:
            keys = [key async for key in raw.scan_iter(match=prefix + "*", count=1000)]
            for key in keys:  # (one by one: a cluster client refuses a DEL across slots)
                await raw.delete(key)
            assert not [key async for key in raw.scan_iter(match=prefix + "*", count=1000)]
        finally:
            await raw.aclose()


async def test_an_operation_counts_once_and_one_given_up_is_given_back_or_stopped(
    remote: tuple[RedisStore, str],
) -> None:
    store, _ = remote
    key = "acct:budget:key:main:d20260101"
    # apply once: the settle replaces the reservation, and a repeat of it (the ledger's) changes nothing
    reserved = await store.reserve(key, 1.0, 10.0, 3600, "a")
    assert reserved.ok and reserved.total == 1.0
    assert await store.settle(key, 1.0, 0.25, 3600, "a") == 0.25
    assert await store.settle(key, 1.0, 0.25, 3600, "a") == 0.25
    late = await store.reserve(key, 1.0, 10.0, 3600, "a")  # a reservation arriving after its settle: nothing
    assert not late.ok and late.total == 0.25
    # cancel after apply: a reservation whose answer was lost, settled to nothing, is given back once
    assert (await store.reserve(key, 2.0, 10.0, 3600, "b")).total == 2.25
    assert await store.settle(key, 0.0, 0.0, 3600, "b") == 0.25
    assert await store.settle(key, 0.0, 0.0, 3600, "b") == 0.25
    # cancel before apply: a tombstone; the reservation arriving later changes nothing
    assert await store.settle(key, 0.0, 0.0, 3600, "c") == 0.25
    late = await store.reserve(key, 3.0, 10.0, 3600, "c")
    assert not late.ok and late.total == 0.25
    # a stream's step whose answer was lost is in the record: the settle replaces it too
    assert (await store.reserve(key, 1.0, 10.0, 3600, "d")).total == 1.25
    assert (await store.reserve(key, 0.5, 10.0, 3600, "d", 1.0)).total == 1.75  # (the caller missed this)
    assert await store.settle(key, 1.0, 0.1, 3600, "d") == pytest.approx(0.35)
    # the same id on another counter is another operation
    assert (await store.reserve("acct:budget:tenant:acme:d20260101", 1.0, 10.0, 3600, "d")).total == 1.0
    # a settle without a reservation, under an id of its own: once
    assert await store.settle(key, 0.0, 0.1, 3600, "e") == pytest.approx(0.45)
    assert await store.settle(key, 0.0, 0.1, 3600, "e") == pytest.approx(0.45)
    # without an id, as before: every call applies
    assert await store.settle(key, 0.0, 0.1, 3600) == pytest.approx(0.55)
    assert await store.settle(key, 0.0, 0.1, 3600) == pytest.approx(0.65)


async def test_a_record_lives_op_ttl_s_in_the_counters_slot_and_its_absence_falls_back(
    remote: tuple[RedisStore, str],
) -> None:
    from gateway.store.base import OP_TTL_S
    from gateway.store.redis_scripts import op_key

    store, prefix = remote
    key = "acct:budget:key:main:d20260101"
    assert (await store.reserve(key, 1.0, 10.0, 3600, "f")).total == 1.0
    record = op_key(prefix + key, "f", prefix)
    assert record is not None and record.startswith(prefix)
    assert key_slot(record.encode()) == key_slot((prefix + key).encode())
    handle = store._handle
    assert handle is not None
    assert await handle.client.get(record) == b"1000000"  # what the operation reserved, in millionths
    assert OP_TTL_S * 1000 - 5_000 < await handle.client.pttl(record) <= OP_TTL_S * 1000
    await handle.client.delete(record)  # a request longer than the record's life: the settle uses `reserved`
    assert await store.settle(key, 1.0, 0.3, 3600, "f") == pytest.approx(0.3)
    assert await handle.client.get(record) == b"s"
    assert OP_TTL_S * 1000 - 5_000 < await handle.client.pttl(record) <= OP_TTL_S * 1000


async def test_a_leased_reservation_whose_record_redis_lost_is_settled_to_its_actual_cost_alone(
    remote: tuple[RedisStore, str],
) -> None:
    """Redis lost its data (restarted without persistence) while a budget's reservation was in flight: its record
    went with the counter, and a newer request made the counter again. A leased record lives as long as its
    counter, so the settle (`leased`) adds the actual cost alone; `actual - reserved` took the lost reservation
    off the newer request's spend (a budget then let that much more through)."""
    from gateway.store.redis_scripts import LEASES, op_key

    store, prefix = remote
    handle = store._handle
    assert handle is not None

    async def lose(counter: str, *ops: str) -> None:  # what a restart without persistence does to these keys
        for name in [prefix + counter, *(op_key(prefix + counter, op, prefix) for op in (*ops, LEASES))]:
            assert name is not None
            await handle.client.delete(name)

    key = "acct:budget:key:main:d20260101"
    assert (await store.reserve(key, 1.0, 10.0, 3600, "g", lease_s=900)).total == 1.0
    await lose(key, "g")
    assert (await store.reserve(key, 2.0, 10.0, 3600, "h", lease_s=900)).total == 2.0  # after the restart
    assert await store.settle(key, 1.0, 0.3, 3600, "g", leased=True) == pytest.approx(2.3)
    assert await store.settle(key, 1.0, 0.3, 3600, "g", leased=True) == pytest.approx(2.3)  # once
    # a record kept: replaced as before, in one step or by what the record says
    assert await store.settle(key, 2.0, 0.5, 3600, "h", leased=True) == pytest.approx(0.8)
    # a record a sweep released (`0`): the actual cost, as before
    assert (await store.reserve(key, 1.0, 10.0, 3600, "k", lease_s=900)).total == pytest.approx(1.8)
    record = op_key(prefix + key, "k", prefix)
    assert record is not None and await handle.client.get(record) == b"1000000"
    await handle.client.set(record, "0", keepttl=True)
    await handle.client.decrby(prefix + key, 1_000_000)
    assert await store.settle(key, 1.0, 0.2, 3600, "k", leased=True) == pytest.approx(1.0)
    # nothing left at all (nothing came since the restart): the actual cost, in a counter that expires
    other = "acct:budget:tenant:acme:d20260101"
    assert (await store.reserve(other, 1.0, 10.0, 3600, "i", lease_s=900)).total == 1.0
    await lose(other, "i")
    assert await store.settle(other, 1.0, 0.3, 3600, "i", leased=True) == pytest.approx(0.3)
    assert 0 < await handle.client.pttl(prefix + other) <= 3_600_000
    # not leased (a give-back the ledger owes, under an id of its own: no record by design): `reserved` is taken
    assert await store.settle(key, 0.5, 0.0, 3600, "j") == pytest.approx(0.5)
    # a stream's next step after the loss (`Settling.extend`, `held` the $1 Redis lost): the record it makes holds the
    # step alone, so the settle still adds the actual cost (it held `held` + the step, and took the lost $1 off)
    third = "acct:budget:key:other:d20260101"
    assert (await store.reserve(third, 1.0, 10.0, 3600, "m", lease_s=900)).total == 1.0
    await lose(third, "m")
    assert (await store.reserve(third, 2.0, 10.0, 3600, "n", lease_s=900)).total == 2.0
    assert (await store.reserve(third, 0.5, 10.0, 3600, "m", 1.0, 900)).total == pytest.approx(2.5)
    assert await store.settle(third, 1.5, 0.3, 3600, "m", leased=True) == pytest.approx(2.3)


def test_an_operation_record_hashes_to_its_counters_slot() -> None:
    from gateway.store.redis_scripts import op_key

    for prefix, key in [("gw:", "gw:acct:budget:key:main:d20260101"), ("{gw}:", "{gw}:acct:budget:key:a:d1"),
                        ("gw:", "gw:acct:budget:model:gpt-{x}:d1"), ("gw{", "gw{acct:budget:key:a:d1"),
                        ("gw:", "gw:acct:budget:key:{x:d1")]:
        record = op_key(key, "0123456789abcdef", prefix)
        assert record is not None, key
        assert key_slot(record.encode()) == key_slot(key.encode()), (key, record)
    assert op_key("gw:a:d1", "x", "gw:") != op_key("gw:b:d1", "x", "gw:")  # one record per counter and op
    assert op_key("{gw}:a:d1", "x", "{gw}:") != op_key("{gw}:b:d1", "x", "{gw}:")
    for key in ("gw:a}b:d1", "gw:acct:budget:key:{}:d1", "{}{a}"):  # hashed whole, with a `}`: no tag can name
        assert op_key(key, "x", "gw:") is None  # their slot


async def test_the_ledger_sends_an_operation_in_doubt_again_under_its_id_for_its_horizon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the ledger owes goes to the store under one id however often it is sent; one in doubt is given up
    once a repeat could no longer be recognised, one surely never applied is kept until the store answers."""
    from gateway.accounting import ledger as ledger_module
    from gateway.store import MemoryStore, StoreUnavailable

    calls: list[tuple[str, float, float, str | None]] = []

    class Flaky(MemoryStore):
        failures = 0

        async def settle(self, key: str, reserved: float, actual: float, ttl_s: float | None,
                         op: str | None = None, leased: bool = False) -> float:
            calls.append((key, reserved, actual, op))
            if self.failures:
                self.failures -= 1
                raise StoreUnavailable("test: timed out", maybe_applied=True)
            return await super().settle(key, reserved, actual, ttl_s, op, leased)

    store = Flaky()
    ledger = Ledger(store)
    ledger.owe("budget", 50_000, 3600)  # a reconciliation: its first attempt's answer is lost
    store.failures = 1
    await ledger.flush()
    await ledger.flush()
    assert [call[:3] for call in calls] == [("budget", 0.0, 0.05)] * 2 and calls[0][3] and calls[0][3] == calls[1][3]
    assert not ledger.pending and (await store.get("budget")) == b"50000"
    clock = [time.monotonic()]
    monkeypatch.setattr(ledger_module.time, "monotonic", lambda: clock[0])
    ledger.owe_op("doubt", "a", 0.0, 0.1, 3600)  # may have been applied
    ledger.owe_op("unsent", "b", 0.1, 0.05, 3600, sent=False)  # a held reservation's settle, failed fast
    clock[0] += ledger_module.OP_RETRY_S + 1
    calls.clear()
    await ledger.flush()
    assert [call[0] for call in calls] == ["unsent"] and not ledger.pending


# -- stalls through a gateway ---------------------------------------------------------------------------------


def _policy(upstream: MockUpstream, prefix: str, on_unavailable: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ACCT_ADMIN, watch_interval_s: 3600}}  # (its pings, likewise)
        state: {{backend: redis, url_env: GW_STALLED_REDIS, key_prefix: "{prefix}", op_timeout_s: {OP_TIMEOUT},
                 on_unavailable: {on_unavailable}}}
        routing: {{breaker: {{sync_interval_s: 60}}}}  # (its reads would time out first in a stall, and then
        # the operation under test would fail fast, unsent, rather than be applied late)
        auth: keys
        keys:
          - name: main
            tenant: acme
            hash: "{hash_key(KEY)}"
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
          fault-slow-stream-20: {{input_per_mtok: 0, output_per_mtok: 1000}}
        models:
          chat: {{provider: mock, model: mock-model}}
          slow: {{provider: mock, model: fault-slow-stream-20}}  # answers after 50 x 20 ms
        """)


class Stalled:
    """A private redis-server, a gateway on it (`on_unavailable` as asked), and what the tests read and do."""

    def __init__(self, server: RedisServer, gateway: RunningGateway, prefix: str) -> None:
        self.server, self.gateway, self.prefix = server, gateway, prefix
        self.raw = redis.Redis.from_url(server.url)
        self.stalls: list[threading.Thread] = []

    def ask(self, model: str = "chat", max_tokens: int = 20) -> httpx.Response:
        return httpx.post(self.gateway.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens}, timeout=20)

    def stall(self, seconds: float = STALL_S, after: float = 0.0) -> threading.Thread:
        """Redis busy for `seconds` (after `after`), from another connection: every other command waits."""

        def run() -> None:
            time.sleep(after)
            with redis.Redis.from_url(self.server.url) as busy:
                busy.eval(BUSY, 0, int(seconds * 1_000_000))  # type: ignore[no-untyped-call]

        thread = threading.Thread(target=run)
        thread.start()
        self.stalls.append(thread)
        return thread

    def counter(self, name: str) -> float:
        raw = self.raw.get(self.prefix + name)
        return int(raw) / 1_000_000 if raw is not None else 0.0

    def budget_key(self) -> str:
        return f"acct:budget:key:main:{datetime.now(UTC).strftime('d%Y%m%d')}"

    def budget(self) -> float:
        return self.counter(self.budget_key())

    def owes_budget(self) -> bool:
        """Whether the ledger owes the budget counter a settle (merged, or under its operation id)."""
        ledger = self.ledger
        return any(key == self.budget_key() or key[0] == self.budget_key()
                   for key in [*ledger._pending, *getattr(ledger, "_ops", {})])

    def usage_cost(self, scope: str, name: str) -> float:
        return self.counter(f"acct:usage:{scope}:{name}:{datetime.now(UTC).strftime('%Y%m%d')}:cost_usd")

    @property
    def store(self) -> Any:
        return self.gateway.gateway.runtime.store

    @property
    def ledger(self) -> Ledger:
        return next(s for s in self.gateway.gateway.runtime.services if isinstance(s, Accounting)).ledger

    def settled(self) -> None:
        """Until the store answers and the ledger owes nothing, then two more flushes (a repeat would show)."""
        _wait(lambda: self.store.healthy and not self.ledger.pending
              and not self.ledger._releases and not self.ledger._requests and not self.ledger._usage, 15.0)
        time.sleep(2.2)


@pytest.fixture
def stalled(upstream: MockUpstream) -> Iterator[Callable[[str], Stalled]]:
    opened: list[Stalled] = []

    def make(on_unavailable: str) -> Stalled:
        server = RedisServer()
        server.start()
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_STALLED_REDIS": server.url, "ACCT_ADMIN": ADMIN}
        try:
            gateway = RunningGateway(_policy(upstream, prefix, on_unavailable), env).start()
        except BaseException:
            server.close()
            raise
        opened.append(Stalled(server, gateway, prefix))
        found = opened[-1]
        assert found.ask().status_code == 200  # connections made and scripts loaded before the stall
        _wait(lambda: found.budget() == pytest.approx(COST))
        return found

    yield make
    for each in opened:
        for thread in each.stalls:
            thread.join(10)
        each.gateway.stop()
        each.raw.close()
        each.server.close()


@pytest.mark.parametrize("on_unavailable", ["open", "closed"])
def test_a_reservation_a_stall_applied_late_is_given_back(stalled: Callable[[str], Stalled],
                                                          on_unavailable: str) -> None:
    """The reservation times out while Redis is busy, and is applied when Redis is done. `open` serves the request
    unchecked, `closed` refuses it; either way the ledger settles the lost reservation to nothing, and the budget
    holds exactly what was spent: it used to hold the late reservation too, for the rest of its period."""
    gateway = stalled(on_unavailable)
    gateway.settled()  # (nothing else to write when the stall comes)
    busy = gateway.stall()
    time.sleep(0.2)  # (busy by now)
    started = time.monotonic()
    answer = gateway.ask()
    assert answer.status_code == (200 if on_unavailable == "open" else 503), answer.text
    assert time.monotonic() - started < STALL_S - 0.5  # answered before Redis was: its reservation timed out
    busy.join()
    gateway.settled()
    assert gateway.budget() == pytest.approx(COST * (2 if on_unavailable == "open" else 1), abs=1e-9)


def test_a_settle_a_stall_applied_late_is_not_applied_again_by_the_ledger(stalled: Callable[[str], Stalled]) -> None:
    """The settle times out while Redis is busy and is applied when Redis is done; the ledger then sends it again.
    A settle that gives back part of its reservation ($0.10 reserved, $0.05 spent) used to be applied twice:
    the budget read $0.05 too low (and spend could pass it by as much)."""
    gateway = stalled("open")
    gateway.settled()  # (nothing else to write when the stall comes)
    busy = gateway.stall(after=0.5)  # the reservation is made; the answer (1 s later) settles during the stall
    answer = gateway.ask("slow", max_tokens=100)
    assert answer.status_code == 200, answer.text
    assert float(answer.headers["x-gateway-cost-usd"]) == pytest.approx(SLOW_COST)
    _wait(gateway.owes_budget, 2.0)
    assert gateway.owes_budget()  # the settle timed out: the ledger owes it
    busy.join()
    gateway.settled()
    assert gateway.budget() == pytest.approx(COST + SLOW_COST, abs=1e-9)


def test_a_reservation_redis_lost_in_a_restart_is_settled_to_its_actual_cost(stalled: Callable[[str], Stalled]) -> None:
    """Redis restarts without persistence while a request holds a budget reservation ($0.10): the counter and the
    reservation's record are gone, and a newer request makes the counter again. When the first request ends, its
    settle adds its actual cost ($0.05): the budget holds exactly what was spent since the restart. It used to
    replace a reservation the counter no longer held, taking $0.10 off the newer spend (a budget then let that
    much more through)."""
    gateway = stalled("open")
    gateway.settled()
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(gateway.ask("slow", max_tokens=100)))
    slow.start()
    try:
        _wait(lambda: gateway.budget() == pytest.approx(COST + 0.1))  # reserved; its answer comes a second later
        assert gateway.budget() == pytest.approx(COST + 0.1)
        gateway.server.stop()
        gateway.server.start()  # (`--save ""`, no AOF: every key is gone)
        assert gateway.budget() == 0.0
        assert gateway.ask().status_code == 200  # the newer request, on a new counter (or owed, then sent)
    finally:
        slow.join(20)
    assert [answer.status_code for answer in answers] == [200]
    assert float(answers[0].headers["x-gateway-cost-usd"]) == pytest.approx(SLOW_COST)
    gateway.settled()
    assert gateway.budget() == pytest.approx(COST + SLOW_COST, abs=1e-9)


def test_usage_a_stall_applied_late_is_not_added_again_by_the_ledger(stalled: Callable[[str], Stalled]) -> None:
    """The ledger's once-a-second usage write times out while Redis is busy and is applied when Redis is done; the
    ledger writes it again under the same id. It used to be added twice (`GET /admin/usage` read double)."""
    gateway = stalled("open")
    store = gateway.store
    gateway.settled()  # the first request's usage written
    caught, asked = False, 1
    for _ in range(4):  # the flush must fall in the stall (not in the moment between the answer and the stall)
        assert gateway.ask().status_code == 200
        asked += 1
        spent = COST * asked
        _wait(lambda: gateway.budget() == pytest.approx(spent))  # noqa: B023 - (its settle, beside the answer)
        busy = gateway.stall()
        _wait(lambda: not store.healthy, STALL_S - 0.2)
        caught = not store.healthy
        busy.join()
        gateway.settled()
        if caught:
            break
    assert caught, "no usage write fell in a stall"
    for scope, name in (("key", "main"), ("tenant", "acme"), ("model", "chat")):
        assert gateway.usage_cost(scope, name) == pytest.approx(COST * asked, abs=1e-9), scope
    assert gateway.budget() == pytest.approx(COST * asked, abs=1e-9)


def _wait(condition: Callable[[], Any], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)

