"""`ConnectionGate`: the permit taken without `Semaphore.locked()` when one is free keeps the semaphore's rules."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import GatewayBusy
from gateway.upstream.client import ConnectionGate


class _Observer:
    def __init__(self) -> None:
        self.waits: list[int] = []
        self.timeouts = 0

    def waiting(self, provider: str, delta: int) -> None:
        self.waits.append(delta)

    def timed_out(self, provider: str) -> None:
        self.timeouts += 1


async def test_free_permits_are_taken_at_once_and_the_next_waits_its_turn_in_order() -> None:
    observer = _Observer()
    gate = ConnectionGate("up", 2, 5.0, observer)
    assert gate._counted
    await gate.acquire()
    await gate.acquire()
    assert observer.waits == []  # no wait: the counted path
    order: list[int] = []

    async def waiter(n: int) -> None:
        await gate.acquire()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == []
    gate.release()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert order == [0]
    gate.release()
    gate.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert observer.waits == [1, 1, 1, -1, -1, -1]


async def test_a_released_permit_goes_to_a_waiter_not_to_a_newcomer() -> None:
    gate = ConnectionGate("up", 1, 5.0)
    await gate.acquire()
    first = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # the permit is handed to `first`, whose task has not run yet
    newcomer = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    await first
    assert not newcomer.done()  # the waiter's permit was not taken by the newcomer's counted path
    gate.release()
    await newcomer


async def test_a_full_gate_times_out_busy_and_falls_back_without_the_counted_path() -> None:
    observer = _Observer()
    gate = ConnectionGate("up", 1, 0.05, observer)
    await gate.acquire()
    with pytest.raises(GatewayBusy):
        await gate.acquire()
    assert observer.timeouts == 1
    gate.release()
    gate._counted = False  # a semaphore without CPython's attributes: `locked()` and `acquire()` only
    await gate.acquire()
    with pytest.raises(GatewayBusy):
        await gate.acquire()
    gate.release()
    await gate.acquire()
