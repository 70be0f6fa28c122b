"""The Store contract, run against every backend, and Redis fault handling against private redis-servers.

The shared Redis comes from GATEWAY_TEST_REDIS_URL (a private one is started when it is unset). Each test
uses its own random key prefix and deletes its keys afterwards; nothing here flushes a database.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.store import MemoryStore, RedisStore, Store, StoreConfig, StoreUnavailable, build_store
from gateway.store.redis_pubsub import RedisChannel
from gateway.store.redis_url import parse_redis_url
from gateway.telemetry.feedback import record_key
from tests.support.redis_server import RedisServer, free_port, suite_redis_url

OP_TIMEOUT = 0.25
# "Bounded by the op timeout" checks: what a stalled CI machine may add (a run saw 1.29 s for a 0.25 s
# timeout) stays far below what failing the check means (a wait for redis-py's own timeouts, none here:
# forever), so the bound is the op timeout plus this.
STALL_MARGIN = 3.0
FAST: dict[str, Any] = {
    "op_timeout_s": OP_TIMEOUT, "connect_timeout_s": 0.5, "backoff_min_s": 0.05, "backoff_max_s": 0.2,
}
# The contract tests check results, not speed: a loaded CI machine must not turn them into timeouts.
PATIENT: dict[str, Any] = {**FAST, "op_timeout_s": 5.0, "connect_timeout_s": 5.0}


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")  # module, not session: stopped before the suite-end leak check
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with RedisServer(cluster=True) as server:
        yield f"redis+cluster://127.0.0.1:{server.port}"


def new_prefix() -> str:
    return f"gwtest:{uuid.uuid4().hex}:"


async def delete_prefixed(url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class Stores:
    """Builds started stores of one backend (all with fresh prefixes) and closes and cleans them up."""

    def __init__(self, backend: str, url: str | None) -> None:
        self.backend, self.url = backend, url
        self.opened: list[tuple[Store, str]] = []

    async def new(self, prefix: str | None = None, **options: Any) -> Store:
        prefix = prefix or new_prefix()
        config = StoreConfig(backend="memory" if self.backend == "memory" else "redis", url=self.url,
                             key_prefix=prefix, **{**PATIENT, **options})
        store = build_store(config)
        await store.start()
        self.opened.append((store, prefix))
        return store

    async def close(self) -> None:
        for store, prefix in self.opened:
            await store.aclose()
            if self.url is not None and self.backend == "redis":
                await delete_prefixed(self.url, prefix)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    url = {"memory": None, "redis": "redis_url", "cluster": "cluster_url"}[request.param]
    factory = Stores(request.param, url and request.getfixturevalue(url))
    yield factory
    await factory.close()


@pytest.fixture
async def store(stores: Stores) -> Store:
    return await stores.new()


async def next_message(channel: Any, timeout: float = 2.0) -> bytes:
    message: bytes = await asyncio.wait_for(anext(channel), timeout)
    return message


async def elapsed(awaitable: Awaitable[Any]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- contract: keys ----------------------------------------------------------------------------------------


async def test_get_set_delete(store: Store) -> None:
    assert await store.get("k") is None
    await store.set("k", b"\x00\xffvalue")
    assert await store.get("k") == b"\x00\xffvalue"
    await store.set("k", b"second")
    assert await store.get("k") == b"second"
    assert await store.delete("k") is True
    assert await store.delete("k") is False
    assert await store.get("k") is None
    assert store.healthy and await store.ping()
    assert store.on_unavailable == "open"


async def test_get_many_reads_keys_in_order_in_one_call(store: Store) -> None:
    assert await store.get_many([]) == []
    # on a cluster these keys fall in different hash slots: one MGET per slot, the order kept
    await store.set("a", b"1")
    await store.set("c", b"\x00\xff3")
    await store.set("gone", b"x", ttl_s=0.05)
    await asyncio.sleep(0.15)
    assert await store.get_many(["a", "b", "c", "gone", "a"]) == [b"1", None, b"\x00\xff3", None, b"1"]


async def test_ttl_expires_and_set_without_ttl_persists(store: Store) -> None:
    await store.set("short", b"1", ttl_s=0.15)
    await store.set("kept", b"2", ttl_s=0.15)
    await store.set("kept", b"3")  # a plain set drops the earlier TTL
    assert await store.get("short") == b"1"
    await asyncio.sleep(0.3)
    assert await store.get("short") is None
    assert await store.get("kept") == b"3"


async def test_arguments_are_checked(store: Store) -> None:
    for bad_ttl in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            await store.set("k", b"v", ttl_s=bad_ttl)
    with pytest.raises(ValueError):
        await store.incr_window("w", -1, 1.0)
    with pytest.raises(ValueError):
        await store.incr_window("w", 1, 0.0)
    with pytest.raises(ValueError):
        await store.reserve("b", -0.5, 1.0, None)
    with pytest.raises(ValueError):
        await store.reserve("b", float("nan"), 1.0, None)
    assert await store.get("k") is None


async def test_compare_and_set(store: Store) -> None:
    assert await store.compare_and_set("c", None, b"a", None) is True
    assert await store.compare_and_set("c", None, b"b", None) is False  # present
    assert await store.compare_and_set("c", b"x", b"b", None) is False  # wrong expectation
    assert await store.get("c") == b"a"
    assert await store.compare_and_set("c", b"a", b"b", ttl_s=0.15) is True
    assert await store.get("c") == b"b"
    assert await store.compare_and_set("absent", b"", b"x", None) is False  # empty is not absent
    await asyncio.sleep(0.3)
    assert await store.get("c") is None
    assert await store.compare_and_set("c", None, b"again", None) is True


async def test_compare_and_delete(store: Store) -> None:
    """Only the value expected is removed: a lock released by a holder whose lease expired and was taken again
    stays with its new holder."""
    assert await store.compare_and_delete("lock", b"mine") is False  # absent
    assert await store.compare_and_set("lock", None, b"mine", ttl_s=0.15)
    assert await store.compare_and_delete("lock", b"theirs") is False
    assert await store.compare_and_delete("lock", b"") is False
    assert await store.get("lock") == b"mine"
    assert await store.compare_and_delete("lock", b"mine") is True
    assert await store.get("lock") is None
    assert await store.compare_and_delete("lock", b"mine") is False  # gone already
    await store.compare_and_set("lock", None, b"mine", ttl_s=0.1)
    await asyncio.sleep(0.25)  # the lease ran out: another holder takes it
    assert await store.compare_and_set("lock", None, b"theirs", ttl_s=None)
    assert await store.compare_and_delete("lock", b"mine") is False
    assert await store.get("lock") == b"theirs"
    await store.set("counter", b"\x00\xff")  # any bytes
    assert await store.compare_and_delete("counter", b"\x00\xff") is True


async def test_compare_and_delete_races(store: Store) -> None:
    await store.set("lock", b"token")
    results = await asyncio.gather(*(store.compare_and_delete("lock", b"token") for _ in range(20)))
    assert results.count(True) == 1


async def test_compare_and_set_races(store: Store) -> None:
    results = await asyncio.gather(*(store.compare_and_set("lock", None, b"%d" % i, None) for i in range(50)))
    assert results.count(True) == 1
    assert await store.get("lock") == b"%d" % results.index(True)

    async def increment() -> int:  # optimistic read-modify-write: retries lose no update
        attempts = 0
        while True:
            attempts += 1
            current = await store.get("n")
            await asyncio.sleep(0)  # let the others interleave between read and write
            new = b"%d" % (int(current or b"0") + 1)
            if await store.compare_and_set("n", current, new, None):
                return attempts

    attempts = await asyncio.gather(*(increment() for _ in range(20)))
    assert await store.get("n") == b"20"
    assert max(attempts) > 1  # there was contention, and it was resolved


# -- contract: windows -------------------------------------------------------------------------------------


async def test_incr_window_is_exact_under_concurrency(store: Store) -> None:
    counts = await asyncio.gather(*(store.incr_window("rpm", 1, 5.0) for _ in range(50)))
    assert sorted(c.count for c in counts) == list(range(1, 51))
    assert all(0 < c.reset_s <= 5.0 for c in counts)
    peek = await store.get_window("rpm", 5.0)
    assert peek.count == 50 and 0 < peek.reset_s <= 5.0
    bigger = await store.incr_window("rpm", 7, 5.0)
    assert bigger.count == 57


async def test_window_resets_after_its_length(store: Store) -> None:
    assert (await store.get_window("w", 0.25)).count == 0
    assert (await store.get_window("w", 0.25)).reset_s == pytest.approx(0.25)
    first = await store.incr_window("w", 3, 0.25)
    assert first.count == 3 and 0.1 < first.reset_s <= 0.25
    await asyncio.sleep(0.1)
    later = await store.incr_window("w", 1, 0.25)
    assert later.count == 4 and later.reset_s < first.reset_s  # the window is not extended by traffic
    await asyncio.sleep(0.25)
    assert (await store.get_window("w", 0.25)).count == 0
    fresh = await store.incr_window("w", 1, 0.25)
    assert fresh.count == 1 and fresh.reset_s > 0.15


async def test_counter_on_a_non_integer_value_is_refused_without_marking_down(store: Store) -> None:
    await store.set("text", b"not a number")
    with pytest.raises(StoreUnavailable):
        await store.incr_window("text", 1, 1.0)
    with pytest.raises(StoreUnavailable):
        await store.reserve("text", 1.0, 10.0, None)
    assert store.healthy  # the server answered: a bad key is not an outage
    assert await store.get("text") == b"not a number"


# -- contract: reservations --------------------------------------------------------------------------------


async def test_reserve_never_exceeds_the_limit_under_concurrency(store: Store) -> None:
    results = await asyncio.gather(*(store.reserve("budget", 0.3, 10.0, None) for _ in range(50)))
    granted = [r for r in results if r.ok]
    assert len(granted) == 33  # 33 * 0.3 = 9.9 fits, a 34th would be 10.2
    assert sorted(r.total for r in granted) == pytest.approx([0.3 * i for i in range(1, 34)])
    refused = [r for r in results if not r.ok]
    assert len(refused) == 17 and all(r.total == pytest.approx(9.9) for r in refused)
    assert all(r.remaining == pytest.approx(0.1) and r.limit == 10.0 for r in refused)
    assert (await store.reserve("budget", 0.1, 10.0, None)).ok  # exactly up to the limit
    assert not (await store.reserve("budget", 0.000001, 10.0, None)).ok


async def test_reserve_sums_are_exact(store: Store) -> None:
    # In binary floating point 0.1 + 0.1 + 0.1 > 0.3; integer millionths keep the third reservation in.
    assert [(await store.reserve("exact", 0.1, 0.3, None)).ok for _ in range(4)] == [True, True, True, False]
    assert (await store.reserve("exact", 0.0, 0.3, None)).total == 0.3
    assert not (await store.reserve("big", 11.0, 10.0, None)).ok
    assert (await store.reserve("big", 10.0, 10.0, None)).ok


async def test_settle_up_and_down_never_below_zero(store: Store) -> None:
    assert (await store.reserve("spend", 5.0, 10.0, None)).total == 5.0
    assert await store.settle("spend", reserved=5.0, actual=1.25, ttl_s=None) == 1.25  # cheaper than feared
    assert (await store.reserve("spend", 8.0, 10.0, None)).ok  # the freed room is usable
    assert await store.settle("spend", reserved=8.0, actual=8.5, ttl_s=None) == 9.75  # dearer than estimated
    assert not (await store.reserve("spend", 0.5, 10.0, None)).ok
    assert await store.settle("spend", reserved=20.0, actual=0.0, ttl_s=None) == 0.0  # clamped at zero
    assert await store.get("spend") == b"0"
    assert await store.settle("never-reserved", reserved=0.0, actual=0.5, ttl_s=None) == 0.5


async def test_reservation_ttl_is_set_once_and_not_extended(store: Store) -> None:
    assert (await store.reserve("day", 1.0, 10.0, ttl_s=0.4)).total == 1.0
    await asyncio.sleep(0.2)
    assert (await store.reserve("day", 1.0, 10.0, ttl_s=0.4)).total == 2.0
    await store.settle("day", reserved=1.0, actual=1.0, ttl_s=0.4)
    await asyncio.sleep(0.3)  # 0.5 s after creation: gone, although the last call was 0.3 s ago
    assert (await store.reserve("day", 1.0, 10.0, ttl_s=0.4)).total == 1.0


async def test_reserve_window_is_exact_under_concurrency_and_reports_its_reset(store: Store) -> None:
    results = await asyncio.gather(*(store.reserve_window("rpm", 1, 20, 60.0) for _ in range(50)))
    assert sum(r.ok for r in results) == 20  # exactly the limit, never one more
    assert sorted(r.total for r in results if r.ok) == [float(i) for i in range(1, 21)]
    assert all(r.total == 20 and r.remaining == 0 for r in results if not r.ok)
    assert all(50 < r.reset_s <= 60 for r in results)  # (a loaded machine may take seconds over the 50 calls)
    assert await store.settle("rpm", reserved=1, actual=0, ttl_s=60.0) == 19  # a refused request undone
    assert (await store.reserve_window("rpm", 1, 20, 60.0)).ok


async def test_reserve_window_resets_after_its_length(store: Store) -> None:
    first = await store.reserve_window("tpm", 30, 40, 0.3)
    assert first.ok and first.remaining == 10
    refused = await store.reserve_window("tpm", 30, 40, 0.3)
    assert not refused.ok and 0 < refused.reset_s <= 0.3
    await asyncio.sleep(0.4)
    assert (await store.reserve_window("tpm", 30, 40, 0.3)).total == 30


async def test_slots_are_limited_released_and_leased(store: Store) -> None:
    taken = await asyncio.gather(*(store.acquire_slot("conc", f"r{i}", 3, 30.0) for i in range(10)))
    assert sum(ok for ok, _ in taken) == 3
    assert await store.acquire_slot("conc", "r-late", 3, 30.0) == (False, 3)
    holder = next(f"r{i}" for i, (ok, _) in enumerate(taken) if ok)
    assert await store.acquire_slot("conc", holder, 3, 30.0) == (True, 3)  # the same holder again: no new slot
    await store.release_slot("conc", holder)
    await store.release_slot("conc", "never-held")
    assert (await store.acquire_slot("conc", "r-late", 3, 30.0))[0]
    # a holder that never releases (its replica died) frees its slot when the lease ends
    assert (await store.acquire_slot("lease", "crashed", 1, 0.2))[0]
    assert not (await store.acquire_slot("lease", "next", 1, 0.2))[0]
    await asyncio.sleep(0.35)
    assert await store.acquire_slot("lease", "next", 1, 0.2) == (True, 1)


# -- contract: pub/sub and prefixes ------------------------------------------------------------------------


async def test_pubsub_fans_out_in_order_and_ends_on_close(store: Store) -> None:
    first = await store.subscribe("breakers")
    second = await store.subscribe("breakers")
    other = await store.subscribe("reload")
    for i in range(3):
        await store.publish("breakers", b"m%d" % i)
    assert [await next_message(first) for _ in range(3)] == [b"m0", b"m1", b"m2"]
    assert [await next_message(second) for _ in range(3)] == [b"m0", b"m1", b"m2"]
    with pytest.raises(TimeoutError):
        await next_message(other, timeout=0.2)
    await first.aclose()
    with pytest.raises(StopAsyncIteration):
        await next_message(first)
    await store.publish("breakers", b"after")
    assert await next_message(second) == b"after"
    async with other:
        await store.publish("reload", b"r")
        assert [m async for m in _take(other, 1)] == [b"r"]


async def _take(channel: Any, n: int) -> AsyncIterator[bytes]:
    async for message in channel:
        yield message
        n -= 1
        if n == 0:
            return


async def test_prefixes_isolate_stores(stores: Stores) -> None:
    a, b = await stores.new(), await stores.new()
    await a.set("shared-name", b"a")
    await b.set("shared-name", b"b")
    assert await a.get("shared-name") == b"a" and await b.get("shared-name") == b"b"
    await a.incr_window("w", 5, 5.0)
    assert (await b.get_window("w", 5.0)).count == 0
    assert (await a.reserve("r", 1.0, 1.0, None)).ok and (await b.reserve("r", 1.0, 1.0, None)).ok
    listener = await b.subscribe("ch")
    await a.publish("ch", b"for a only")
    with pytest.raises(TimeoutError):
        await next_message(listener, timeout=0.2)
    await a.delete("shared-name")
    assert await b.get("shared-name") == b"b"


async def test_redis_keys_carry_the_prefix(redis_url: str) -> None:
    prefix = new_prefix()
    store = RedisStore(StoreConfig(backend="redis", url=redis_url, key_prefix=prefix))
    await store.start()
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await store.set("k", b"v")
        await store.incr_window("w", 2, 5.0)
        assert await raw.get(prefix + "k") == b"v"
        assert await raw.get(prefix + "w") == b"2"
    finally:
        await store.aclose()
        await raw.aclose()
        await delete_prefixed(redis_url, prefix)


# -- memory backend: bounded -------------------------------------------------------------------------------


async def test_memory_store_is_bounded_and_sweeps_expired_keys() -> None:
    now = [100.0]
    store = MemoryStore(StoreConfig(max_entries=3), clock=lambda: now[0])
    for key in ("a", "b", "c"):
        await store.set(key, b"1")
    assert await store.get("a") == b"1"  # "a" is now the most recently used
    await store.set("d", b"1")
    assert len(store) == 3 and await store.get("b") is None  # the least recently used went
    await store.set("e", b"1", ttl_s=1.0)
    now[0] += 2.0
    assert store.sweep() == 1 and len(store) == 2
    channel = await store.subscribe("ch")
    for i in range(StoreConfig().channel_buffer + 5):
        await store.publish("ch", b"%d" % i)
    assert await next_message(channel) == b"5"  # a slow subscriber loses the oldest, memory stays bounded
    await store.aclose()
    with pytest.raises(StopAsyncIteration):
        while True:
            await next_message(channel)


async def test_memory_store_bounds_cache_entries_by_bytes_and_spares_other_keys() -> None:
    now = [100.0]
    store = MemoryStore(StoreConfig(max_bytes=1_000, bytes_prefix="cache:"), clock=lambda: now[0])
    await store.set("budget", b"7")  # not under the prefix: never evicted for bytes
    for name in ("a", "b", "c"):
        await store.set(f"cache:{name}", b"x" * 300)
    assert store.bytes == 900 and store.evictions == 0
    assert await store.get("cache:a") is not None  # "a" is now the most recently used
    await store.set("cache:d", b"y" * 300)
    assert await store.get("cache:b") is None and store.evictions == 1 and store.bytes == 900
    await store.set("cache:a", b"z" * 100)  # replacing a value counts its new size only
    assert store.bytes == 700
    await store.set("cache:huge", b"h" * 2_000)  # larger than the bound on its own: dropped, nothing else is
    assert await store.get("cache:huge") is None and store.bytes == 700 and store.evictions == 2
    assert await store.get("budget") == b"7"
    await store.set("cache:e", b"e" * 10, ttl_s=1.0)
    assert await store.delete("cache:a") and store.bytes == sum(
        len(v) for v in [await store.get(k) for k in ("cache:c", "cache:d", "cache:e")] if v)
    now[0] += 2.0
    store.sweep()
    assert await store.get("cache:e") is None and store.bytes == 600
    await store.aclose()
    assert store.bytes == 0
    with pytest.raises(ValueError):
        StoreConfig(max_bytes=0)


async def test_memory_store_evicts_cache_entries_before_counters_at_its_key_bound() -> None:
    """Many small cache entries reach `max_entries` before `max_bytes`: they give way to each other, never to a
    budget's spend or a window's count, however long those have been idle."""
    store = MemoryStore(StoreConfig(max_entries=4, max_bytes=1_000_000, bytes_prefix="cache:"))
    await store.reserve("budget:tenant", 2.5, 10.0, None)
    await store.set("keys:record", b"{}")
    for n in range(10):
        await store.set(f"cache:{n}", b"x")
    assert len(store) == 4 and store.evictions == 8
    assert await store.get("keys:record") == b"{}" and await store.get("budget:tenant") is not None
    assert [await store.get(f"cache:{n}") for n in (8, 9)] == [b"x", b"x"]
    await store.set("other", b"1")  # with no cache entry left to drop, the least recently used key goes
    await store.set("more", b"1")
    await store.set("again", b"1")
    assert len(store) == 4 and await store.get("keys:record") is None and store.evictions == 11
    await store.aclose()


async def test_memory_store_evicts_feedback_records_before_keys_budgets_and_usage() -> None:
    """Each answered request leaves a feedback record while feedback is on: one tenant's traffic filled the memory
    store with them and pushed out another tenant's run-time key (401 for good), budget and usage counters, the
    least recently used keys. Records that may be lost go after the cache entries and before any other key."""
    store = MemoryStore(StoreConfig(max_entries=5, max_bytes=1_000_000))
    await store.set("keys:rec:b", b"{}")  # tenant B's run-time key, budget and usage, idle from now on
    await store.reserve("acct:budget:tenant:tb", 2.5, 10.0, None)
    await store.settle("acct:usage:tenant:tb:requests", 0.0, 1.0, None)
    for n in range(200):  # tenant A's traffic: a cache entry and a feedback record a request
        await store.set(f"cache:{n}", b"x")
        await store.set(record_key("ta", f"req-{n}"), b"{}", ttl_s=86_400)
    assert len(store) == 5
    assert await store.get("keys:rec:b") == b"{}"
    assert (await store.reserve("acct:budget:tenant:tb", 0.0, 10.0, None)).total == 2.5
    assert await store.get("acct:usage:tenant:tb:requests") is not None
    assert await store.get(record_key("ta", "req-199")) == b"{}"  # the newest record: the oldest went first
    assert await store.get(record_key("ta", "req-0")) is None
    await store.aclose()


def test_feedback_records_are_under_an_expendable_prefix() -> None:
    assert record_key("t", "r").startswith(StoreConfig().expendable_prefixes)


async def test_memory_store_hands_out_each_eviction_once() -> None:
    """The cache's eviction counter reads `take_evictions`: after a reload the old policy's cache and the new one's
    share the store, and an eviction is counted by whichever asks first, never by both."""
    store = MemoryStore(StoreConfig(max_entries=2))
    for n in range(5):
        await store.set(f"k{n}", b"1")
    assert store.take_evictions() == 3 and store.take_evictions() == 0
    await store.set("k5", b"1")
    assert store.take_evictions() == 1 and store.evictions == 4
    await store.aclose()



async def test_counters_read_and_write_like_values_on_both_sides(store: Store) -> None:
    """Counters set as bytes count on; counted ones read back as ASCII digits, and compare as such."""
    await store.set("n", b"41000000")  # amounts are kept as integer millionths
    assert (await store.reserve_window("n", 1, 100, 60.0)).total == 42
    assert await store.get("n") == b"42000000"
    assert await store.get_many(["n", "absent"]) == [b"42000000", None]
    assert await store.compare_and_set("n", b"42000000", b"7", None) is True
    assert (await store.incr_window("n", 3, 60.0)).count == 10
    assert await store.settle("n", reserved=0.0, actual=0.0, ttl_s=60.0) == pytest.approx(10 / 1_000_000)
    assert await store.get("n") == b"10"


async def test_memory_counters_under_the_byte_bound_are_sized() -> None:
    store = MemoryStore(StoreConfig(max_bytes=1_000, bytes_prefix="cache:"))
    assert (await store.reserve("cache:count", 1.0, 10.0, None)).ok
    assert store.bytes == len(b"1000000") and await store.get("cache:count") == b"1000000"
    assert await store.settle("cache:count", reserved=1.0, actual=0.25, ttl_s=None) == 0.25
    assert store.bytes == len(b"250000")
    await store.aclose()


# -- configuration and URLs --------------------------------------------------------------------------------


def test_store_config_is_validated() -> None:
    with pytest.raises(ValueError):
        StoreConfig(backend="memcached")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StoreConfig(backend="redis")
    with pytest.raises(ValueError):
        StoreConfig(op_timeout_s=0)
    with pytest.raises(ValueError):
        StoreConfig(on_unavailable="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_store(StoreConfig(backend="redis", url="http://localhost:6379"))
    assert isinstance(build_store(StoreConfig()), MemoryStore)
    assert build_store(StoreConfig(on_unavailable="closed")).on_unavailable == "closed"


def suite_redis_urls() -> None:
    assert parse_redis_url("redis://:pw@localhost:6380/2").mode == "standalone"
    assert parse_redis_url("rediss://localhost").ssl
    assert parse_redis_url("unix:///run/redis.sock?db=1").mode == "standalone"
    sentinel = parse_redis_url("redis+sentinel://user:p%40ss@s1:26380,s2,[::1]:5000/mymaster/3?sentinel_password=x")
    assert (sentinel.mode, sentinel.service, sentinel.db) == ("sentinel", "mymaster", 3)
    assert sentinel.nodes == (("s1", 26380), ("s2", 26379), ("::1", 5000))
    assert (sentinel.username, sentinel.password, sentinel.options) == ("user", "p@ss", {"sentinel_password": "x"})
    assert "p@ss" not in repr(sentinel)
    cluster = parse_redis_url("rediss+cluster://n1:7000,n2:7001")
    assert (cluster.mode, cluster.ssl, cluster.nodes) == ("cluster", True, (("n1", 7000), ("n2", 7001)))
    for bad in ("memcached://x", "redis+sentinel://s1", "redis+cluster://n1/1", "redis+cluster://n1:99999",
                "redis+sentinel://s1/m?bogus=1", "redis+cluster://:pw@"):
        with pytest.raises(ValueError) as info:
            parse_redis_url(bad)
        assert "pw" not in str(info.value)


# -- faults: private redis-servers -------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def started_store(url: str, **options: Any) -> RedisStore:
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=new_prefix(), **{**FAST, **options}))
    await store.start()
    return store


OPERATIONS: list[Callable[[Store], Awaitable[Any]]] = [
    lambda s: s.get("k"),
    lambda s: s.set("k", b"v", ttl_s=5),
    lambda s: s.delete("k"),
    lambda s: s.compare_and_set("k", None, b"v", None),
    lambda s: s.compare_and_delete("k", b"v"),
    lambda s: s.incr_window("w", 1, 1.0),
    lambda s: s.get_window("w", 1.0),
    lambda s: s.reserve("b", 1.0, 10.0, None),
    lambda s: s.settle("b", 1.0, 0.5, None),
    lambda s: s.reserve_window("rw", 1.0, 10.0, 60.0),
    lambda s: s.acquire_slot("slot", "me", 1, 60.0),
    lambda s: s.release_slot("slot", "me"),
    lambda s: s.publish("ch", b"x"),
]


async def test_redis_killed_then_restarted(private_redis: RedisServer) -> None:
    store = await started_store(private_redis.url)
    try:
        await store.set("k", b"v")
        assert store.healthy
        load = [asyncio.create_task(elapsed(op(store))) for op in OPERATIONS * 5]
        await asyncio.to_thread(private_redis.stop)
        in_flight = await asyncio.gather(*load)
        assert all(t < OP_TIMEOUT + STALL_MARGIN for t, _ in in_flight)
        for op in OPERATIONS:  # every operation: StoreUnavailable, bounded, and fast once marked down
            took, exc = await elapsed(op(store))
            assert isinstance(exc, StoreUnavailable), exc
            assert took < OP_TIMEOUT + STALL_MARGIN
        assert not store.healthy
        took, exc = await elapsed(store.get("k"))
        # failing fast while down: sent nowhere, as its message says (a loaded suite's loop can take longer than any
        # tight bound to run even that)
        assert isinstance(exc, StoreUnavailable) and "failing fast" in str(exc) and not exc.maybe_applied, exc
        assert took < OP_TIMEOUT + STALL_MARGIN
        assert await store.ping() is False
        await asyncio.to_thread(private_redis.start)  # same port, empty data
        await wait_for(lambda: store.healthy, timeout=3)  # the background probe, no request needed
        assert await store.get("k") is None
        await store.set("k", b"back")
        assert await store.get("k") == b"back"
        assert (await store.reserve("b", 1.0, 10.0, None)).total == 1.0
    finally:
        await store.aclose()


async def test_redis_that_stops_answering_is_bounded_by_the_timeout(private_redis: RedisServer) -> None:
    store = await started_store(private_redis.url)
    try:
        await store.set("kept", b"v")  # no operation below touches it (those that timed out may yet run: `k`)
        private_redis.pause()  # accepts connections, never answers
        results = await asyncio.gather(*(elapsed(op(store)) for op in OPERATIONS * 6))
        assert all(isinstance(exc, StoreUnavailable) for _, exc in results)
        # bounded by the op timeout (not redis-py's socket timeout, none here: it would hang); the margin
        # is for a loaded CI machine
        assert max(t for t, _ in results) < OP_TIMEOUT + STALL_MARGIN
        assert not store.healthy
        took, exc = await elapsed(store.incr_window("w", 1, 1.0))
        # fails fast while marked down: sent nowhere (its message says so; a full suite's loop once took 0.7 s to
        # run it, so the time alone cannot tell)
        assert isinstance(exc, StoreUnavailable) and "failing fast" in str(exc) and not exc.maybe_applied, exc
        assert took < OP_TIMEOUT + STALL_MARGIN
        took, ok = time.monotonic(), await store.ping()
        assert ok is False and time.monotonic() - took < OP_TIMEOUT + STALL_MARGIN
        private_redis.resume()
        await wait_for(lambda: store.healthy, timeout=3)
        assert await store.get("kept") == b"v"
        assert (await store.incr_window("w", 1, 1.0)).count >= 1
    finally:
        private_redis.resume()
        await store.aclose()


async def test_a_redis_busy_with_another_clients_script_is_an_outage_not_a_refusal(
        private_redis: RedisServer) -> None:
    """A `BUSY` reply (another client's script past its time limit) says the server serves nothing now, not that the
    operation is wrong: the store is marked down, so what a flush carried is kept for the next one (a refusal of
    one operation by a Redis that answers drops it: the ledger's refused counters)."""
    store = await started_store(private_redis.url)
    blocker = aioredis.Redis.from_url(private_redis.url)
    killer = aioredis.Redis.from_url(private_redis.url)
    try:
        await wait_for(lambda: store.healthy, timeout=5)  # (a loaded suite's start once missed its 0.75 s)
        await store.set("k", b"v")
        await killer.config_set("busy-reply-threshold", 50)  # (milliseconds: Redis 7's name of lua-time-limit)
        script = asyncio.create_task(blocker.eval("while true do end", 0))
        await asyncio.sleep(0.3)  # past the threshold: every other client gets BUSY
        took, exc = await elapsed(store.settle("b", 0.0, 1.0, None))
        assert isinstance(exc, StoreUnavailable) and "unavailable" in str(exc), exc
        assert took < OP_TIMEOUT + STALL_MARGIN  # the reply came at once: no wait on the op timeout
        assert exc.maybe_applied is False  # an error reply: not applied
        assert not store.healthy
        await killer.script_kill()
        with pytest.raises(aioredis.ResponseError):
            await script
        await wait_for(lambda: store.healthy, timeout=3)
        assert await store.get("k") == b"v"
    finally:
        await blocker.aclose()
        await killer.aclose()
        await store.aclose()


async def test_subscriber_survives_a_restart(private_redis: RedisServer) -> None:
    store = await started_store(private_redis.url)
    try:
        channel = await store.subscribe("signals")
        await store.publish("signals", b"before")
        assert await next_message(channel) == b"before"
        await asyncio.to_thread(private_redis.stop)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(private_redis.start)
        await wait_for(lambda: store.healthy, timeout=3)
        deadline = time.monotonic() + 5
        received = None
        while received is None and time.monotonic() < deadline:  # at most once: publish until it is heard
            await store.publish("signals", b"after")
            try:
                received = await next_message(channel, timeout=0.2)
            except TimeoutError:
                pass
        assert received == b"after"
        assert isinstance(channel, RedisChannel) and channel.reconnects >= 1
        await store.publish("signals", b"and more")
        assert await next_message(channel) in (b"after", b"and more")
    finally:
        await store.aclose()
    with pytest.raises(StopAsyncIteration):  # closing the store ends its subscriptions
        while True:
            await next_message(channel, timeout=1)


async def test_nothing_listening_fails_fast_without_crashing() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    took, exc = await elapsed(started_store(url))
    # start does not raise: the gateway boots without Redis
    assert exc is None and took < 0.5 + OP_TIMEOUT + STALL_MARGIN
    store = RedisStore(StoreConfig(backend="redis", url=url, key_prefix=new_prefix(), **FAST))
    await store.start()
    try:
        assert not store.healthy
        assert await store.ping() is False
        for op in OPERATIONS:
            took, exc = await elapsed(op(store))  # fails fast while marked down: sent nowhere
            assert isinstance(exc, StoreUnavailable) and "failing fast" in str(exc) and not exc.maybe_applied, exc
            assert took < OP_TIMEOUT + STALL_MARGIN
        channel = await store.subscribe("ch")  # a subscription waits for Redis in the background
        await channel.aclose()
    finally:
        await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.get("k")  # closed: still the one exception, never a crash


async def test_a_store_started_before_redis_recovers_when_it_comes(private_redis: RedisServer) -> None:
    private_redis.stop()
    store = await started_store(private_redis.url)
    try:
        channel = await store.subscribe("late")
        assert not store.healthy
        await asyncio.to_thread(private_redis.start)
        await wait_for(lambda: store.healthy, timeout=3)
        await store.set("k", b"v")
        assert await store.get("k") == b"v"
        deadline, received = time.monotonic() + 5, None
        while received is None and time.monotonic() < deadline:
            await store.publish("late", b"hello")
            try:
                received = await next_message(channel, timeout=0.2)
            except TimeoutError:
                pass
        assert received == b"hello"
    finally:
        await store.aclose()


async def test_unix_socket_and_sentinel_urls() -> None:
    with RedisServer(unix_socket=True) as master:
        store = await started_store(f"unix://{master.socket_path}?db=0")
        try:
            assert store.healthy
            await store.set("k", b"over a socket")
            assert await store.get("k") == b"over a socket"
        finally:
            await store.aclose()
        with RedisServer(sentinel_of=master) as sentinel:
            store = await started_store(f"redis+sentinel://127.0.0.1:{sentinel.port}/gwmaster/0")
            try:
                assert store.healthy
                assert (await store.reserve("b", 2.5, 3.0, 10)).ok
                assert await store.get("b") == b"2500000"  # millionths, as documented
                channel = await store.subscribe("ch")
                await store.publish("ch", b"via sentinel")
                assert await next_message(channel) == b"via sentinel"
            finally:
                await store.aclose()
