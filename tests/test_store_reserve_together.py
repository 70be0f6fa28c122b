"""`Store.reserve_together`: a request's reservations on several keys, all or nothing, on every backend.

A request one key refuses must hold nothing on the others, not even for an instant: another request counting it
is refused with room left (`tests/test_accounting_burst_limits.py` shows it through the gateway). A Redis Cluster
cannot take keys of different slots in one script: it answers None and the caller takes them one by one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.store import Store, Take
from tests.test_store import Stores, cluster_url, redis_url  # noqa: F401 - fixtures

MINUTE = 60.0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    factory = Stores(request.param, request.getfixturevalue("redis_url") if request.param == "redis" else None)
    yield await factory.new()
    await factory.close()


async def test_a_refusal_takes_nothing_on_the_other_keys(store: Store) -> None:
    for _ in range(3):
        assert (await store.reserve_window("key", 1, 3, MINUTE)).ok
    await store.acquire_slot("slots", "other", 2, MINUTE)
    takes = [Take("reserve_window", ("tenant", 1, 15, MINUTE)), Take("reserve_window", ("key", 1, 3, MINUTE)),
             Take("acquire_slot", ("slots", "mine", 2, MINUTE)), Take("reserve", ("budget", 0.02, 0.3, MINUTE))]
    answer = await store.reserve_together(takes)
    assert answer is not None
    taken, (tenant, key, slot, budget) = answer
    assert taken is False
    assert tenant.ok and tenant.total == 0 and tenant.limit == 15 and 0 < tenant.reset_s <= MINUTE
    assert not key.ok and key.total == 3
    assert slot == (True, 1) and budget.ok and budget.total == 0
    assert (await store.get_window("tenant", MINUTE)).count == 0
    assert await store.get("budget") in (None, b"0")
    assert await store.acquire_slot("slots", "third", 2, MINUTE) == (True, 2)  # "mine" holds none of the two


async def test_all_fit_all_are_taken(store: Store) -> None:
    takes = [Take("reserve_window", ("tenant", 2, 15, MINUTE)), Take("acquire_slot", ("slots", "mine", 1, MINUTE)),
             Take("reserve", ("budget", 0.02, 0.3, MINUTE, "op-1"))]
    answer = await store.reserve_together(takes)
    assert answer is not None
    taken, (tenant, slot, budget) = answer
    assert taken and tenant.ok and tenant.total == 2 and slot == (True, 1) and budget == (True, 0.02, 0.3)
    assert (await store.get_window("tenant", MINUTE)).count == 2_000_000
    assert not (await store.acquire_slot("slots", "other", 1, MINUTE))[0]
    # the budget's reservation settles under its id like one `reserve` made
    assert await store.settle("budget", 0.02, 0.01, MINUTE, "op-1") == pytest.approx(0.01)


async def test_a_soft_budget_that_does_not_fit_is_left_out_alone(store: Store) -> None:
    assert (await store.reserve("soft", 0.29, 0.3, MINUTE)).ok
    takes = [Take("reserve", ("hard", 0.02, 0.3, MINUTE)), Take("reserve", ("soft", 0.02, 0.3, MINUTE), False)]
    answer = await store.reserve_together(takes)
    assert answer is not None
    taken, (hard, soft) = answer
    assert taken and hard == (True, 0.02, 0.3)
    assert not soft.ok and soft.total == pytest.approx(0.29)
    assert (await store.reserve("hard", 0.0, 0.3, MINUTE)).total == pytest.approx(0.02)


async def test_a_cluster_leaves_it_to_the_caller(cluster_url: str) -> None:  # noqa: F811 - the fixture
    factory = Stores("cluster", cluster_url)
    try:
        store = await factory.new()
        assert await store.reserve_together([Take("reserve_window", ("a", 1, 3, MINUTE)),
                                             Take("reserve_window", ("b", 1, 3, MINUTE))]) is None
        assert (await store.get_window("a", MINUTE)).count == 0
    finally:
        await factory.close()
