"""A budget reservation made under an operation id holds a lease on Redis (`accounting.lease_s`): one whose replica
died before settling it (SIGKILL, OOM, a lost node) is given back by the next reservation against its counter once
the lease ran out, instead of counting as spend for the rest of the period. A settle arriving after that (a replica
that was only slow) still counts its actual cost, once.

Run on the suite's Redis (a key prefix of their own, plain or a hash tag) and on a one-node cluster (the sweep reads
the records of other operations, in the counter's hash slot by construction). Waits poll Redis's own clock against
the lease's expiry (`leases` beside the counter), never a duration of the test's.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.store import RedisStore, Take
from gateway.store.redis_scripts import SWEEP_LIMIT, op_key
from tests.test_accounting_idempotent import cluster_url, redis_url, remote  # noqa: F401 - fixtures

KEY = "acct:budget:key:main:d20260101"
HOUR = 3600.0


def _client(store: RedisStore) -> object:
    handle = store._handle
    assert handle is not None
    return handle.client


def _leases(prefix: str, key: str) -> str:
    name = op_key(prefix + key, "leases", prefix)
    assert name is not None
    return name


async def _redis_ms(store: RedisStore) -> int:
    seconds, micros = await _client(store).time()  # type: ignore[attr-defined]
    return int(seconds) * 1000 + int(micros) // 1000


async def _past_lease(store: RedisStore, prefix: str, key: str, op: str) -> None:
    """Until Redis's clock passed `op`'s lease on `key` (polled; bounded)."""
    score = await _client(store).zscore(_leases(prefix, key), op)  # type: ignore[attr-defined]
    assert score is not None, f"{op} holds no lease on {key}"
    deadline = time.monotonic() + 30
    while await _redis_ms(store) <= score:
        assert time.monotonic() < deadline, "Redis's clock did not pass the lease"
        await asyncio.sleep(0.05)


async def _counter(store: RedisStore, key: str) -> bytes | None:
    return await store.get(key)


async def test_an_unsettled_reservation_is_given_back_after_its_lease_and_a_late_settle_counts_once(
    remote: tuple[RedisStore, str],  # noqa: F811
) -> None:
    store, prefix = remote
    assert (await store.reserve(KEY, 2.0, 10.0, HOUR, "a" * 16, lease_s=1)).total == 2.0  # its replica dies
    await _past_lease(store, prefix, KEY, "a" * 16)
    taken = await store.reserve(KEY, 9.0, 10.0, HOUR, "b" * 16, lease_s=600)  # fits only without the dead one
    assert taken.ok and taken.total == 9.0
    leases = await _client(store).zrange(_leases(prefix, KEY), 0, -1)  # type: ignore[attr-defined]
    assert leases == [b"b" * 16]  # the swept one is gone, the new one leased
    # the replica was only slow: its settle counts its actual cost, once
    assert await store.settle(KEY, 2.0, 0.5, HOUR, "a" * 16) == pytest.approx(9.5)
    assert await store.settle(KEY, 2.0, 0.5, HOUR, "a" * 16) == pytest.approx(9.5)
    # a settle takes its lease away
    assert await store.settle(KEY, 9.0, 1.0, HOUR, "b" * 16) == pytest.approx(1.5)
    assert await _client(store).zcard(_leases(prefix, KEY)) == 0  # type: ignore[attr-defined]
    # without a lease, as before: none is taken
    assert (await store.reserve(KEY, 2.0, 10.0, HOUR, "3" * 16)).total == pytest.approx(3.5)
    assert await _client(store).exists(_leases(prefix, KEY)) == 0  # type: ignore[attr-defined]


async def test_a_settled_reservation_is_never_swept_and_a_late_step_is_replaced_by_the_settle(
    remote: tuple[RedisStore, str],  # noqa: F811
) -> None:
    store, prefix = remote
    assert (await store.reserve(KEY, 2.0, 10.0, HOUR, "c" * 16, lease_s=1)).ok
    assert (await store.reserve(KEY, 1.0, 10.0, HOUR, "d" * 16, lease_s=1)).ok
    assert await store.settle(KEY, 2.0, 1.5, HOUR, "c" * 16) == pytest.approx(2.5)  # settled: its cost is spend
    await _past_lease(store, prefix, KEY, "d" * 16)
    assert (await store.reserve(KEY, 1.0, 10.0, HOUR, "e" * 16, lease_s=600)).total == pytest.approx(2.5)
    # d's stream was alive after all: its next step holds again, and its settle replaces what it holds by its cost
    assert (await store.reserve(KEY, 0.5, 10.0, HOUR, "d" * 16, 1.0, lease_s=600)).total == pytest.approx(3.0)
    assert await store.settle(KEY, 1.5, 1.25, HOUR, "d" * 16) == pytest.approx(3.75)


async def test_a_sweep_does_not_recreate_an_expired_counter(remote: tuple[RedisStore, str]) -> None:  # noqa: F811
    store, prefix = remote
    key = "acct:budget:key:short:d20260101"
    assert (await store.reserve(key, 2.0, 10.0, 1.0, "f" * 16, lease_s=1)).ok  # a period that ends in a second
    await _past_lease(store, prefix, key, "f" * 16)
    deadline = time.monotonic() + 30
    while await _counter(store, key) is not None:
        assert time.monotonic() < deadline, "the counter did not expire"
        await asyncio.sleep(0.05)
    refused = await store.reserve(key, 11.0, 10.0, 1.0, "g" * 16, lease_s=1)  # sweeps, takes nothing
    assert not refused.ok and refused.total == 0
    assert await _counter(store, key) is None  # not recreated (without a TTL) by the sweep
    assert await _client(store).zscore(_leases(prefix, key), "f" * 16) is None  # type: ignore[attr-defined]


async def test_the_leases_are_swept_a_bounded_number_at_a_time_and_expire(
    remote: tuple[RedisStore, str],  # noqa: F811
) -> None:
    store, prefix = remote
    dead = [f"{index:016x}" for index in range(SWEEP_LIMIT + 8)]
    for op in dead:
        assert (await store.reserve(KEY, 0.25, 100.0, HOUR, op, lease_s=1)).ok
    await _past_lease(store, prefix, KEY, dead[-1])
    leases = _leases(prefix, KEY)
    assert (await store.reserve(KEY, 0.0, 100.0, HOUR, "1" * 16, lease_s=600)).total == pytest.approx(8 * 0.25)
    assert await _client(store).zcard(leases) == 8 + 1  # type: ignore[attr-defined]  # SWEEP_LIMIT swept at once
    assert (await store.reserve(KEY, 0.0, 100.0, HOUR, "2" * 16, lease_s=600)).total == 0.0
    assert await _client(store).zcard(leases) == 2  # type: ignore[attr-defined]
    assert 0 < await _client(store).pttl(leases) <= HOUR * 1000 + 60_000  # type: ignore[attr-defined]


async def test_reserve_together_leases_and_sweeps_a_budget(remote: tuple[RedisStore, str]) -> None:  # noqa: F811
    store, prefix = remote
    if store._cluster:
        pytest.skip("a cluster takes keys of different slots one by one (reserve_together answers None)")
    window = "acct:rpm:key:main"

    def takes(amount: float, op: str, lease: float) -> list[Take]:
        return [Take("reserve_window", (window, 1, 100, 60.0)),
                Take("reserve", (KEY, amount, 10.0, HOUR, op, 0.0, lease))]

    answer = await store.reserve_together(takes(2.0, "4" * 16, 1.0))  # its replica dies
    assert answer is not None and answer[0] and answer[1][1].total == 2.0
    await _past_lease(store, prefix, KEY, "4" * 16)
    answer = await store.reserve_together(takes(9.0, "5" * 16, 600.0))  # fits only without the dead one
    assert answer is not None
    taken, (_, budget) = answer
    assert taken and budget.ok and budget.total == 9.0
    assert await _client(store).zrange(_leases(prefix, KEY), 0, -1) == [b"5" * 16]  # type: ignore[attr-defined]
    assert await store.settle(KEY, 2.0, 0.5, HOUR, "4" * 16) == pytest.approx(9.5)  # late, once
    assert await store.settle(KEY, 2.0, 0.5, HOUR, "4" * 16) == pytest.approx(9.5)
    # a refused take sweeps as well (what the dead held is not spend), and holds no lease
    assert (await store.reserve(KEY, 0.0, 10.0, HOUR, "6" * 16, lease_s=1)).ok
    assert await store.settle(KEY, 9.0, 0.0, HOUR, "5" * 16) == pytest.approx(0.5)
    assert (await store.reserve(KEY, 3.0, 10.0, HOUR, "7" * 16, lease_s=1)).total == pytest.approx(3.5)
    await _past_lease(store, prefix, KEY, "7" * 16)
    answer = await store.reserve_together(takes(9.8, "8" * 16, 600.0))
    assert answer is not None and not answer[0] and answer[1][1].total == pytest.approx(0.5)
    assert await _client(store).zcard(_leases(prefix, KEY)) == 0  # type: ignore[attr-defined]
