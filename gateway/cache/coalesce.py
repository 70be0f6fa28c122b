"""Identical misses at the same time: one request goes upstream, the others wait for its answer.

In one process the first miss of a key leads and the others await its `Flight`
(no polling). Across replicas the leader also takes a lock key in the store
(compare-and-set with a TTL, so a replica that dies frees it); a replica that
finds the lock taken polls for the entry until it appears, the lock goes, or the
wait times out, and then reads the cache again. A wait is always bounded by the
alias's `coalesce_timeout_s`, counted from when the request began to wait; after
it the waiter goes upstream itself. If the store cannot answer, nobody waits on it.

A leader that fails without storing an answer (its upstream failed, its client
left, its stream was cut) hands the key over rather than letting every waiter go
upstream at once on the very key that is failing: in its process one waiter
leads next and the others wait for that one (`join`); its lock goes, and on the
other replicas the first poller to take it leads next while the others poll on.
A failure every waiter would meet alike (`Flight.release` without `hand_over`)
lets them all go instead: leading one at a time would spare no upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from ..store.base import Store, StoreUnavailable

__all__ = ["Flight", "Flights"]

LOCK = "cache:lock:"
POLL_S = 0.05
UNLOCK_RETRY_S = 0.5

Present = Callable[[], Coroutine[Any, Any, bool]]


class Flight:
    """A leader's promise to the other requests of its key; `release` once its answer is stored (or not)."""

    __slots__ = ("_flights", "done", "key", "locked", "token", "until")

    def __init__(self, flights: Flights, key: str, done: asyncio.Future[bool]) -> None:
        self._flights = flights
        self.key = key
        self.done = done  # its result: whether the key is handed over (one waiter leads next)
        self.locked = False  # holds the store's lock
        # This flight's own (not the replica's): an unlock retried after it was in fact applied never frees the
        # lock a later flight of this replica took for the same key.
        self.token = os.urandom(8)
        self.until = 0.0  # when the store's lock expires by itself (`time.monotonic()`)

    def release(self, hand_over: bool = False) -> None:
        """Wake the waiters; safe to call twice. They read the cache again, and go upstream if the answer is not
        there; with `hand_over` (this leader failed where the next may not) one of them leads next instead and the
        others wait for it. The lock goes either way: another replica's waiter may lead next."""
        if self.done.done():
            return
        self.done.set_result(hand_over)
        if self._flights.local.get(self.key) is self.done:
            del self._flights.local[self.key]
        if self.locked:
            self.locked = False
            self._flights.spawn(self._flights.unlock(self.key, self.token, self.until))


class Flights:
    def __init__(self, store: Store, shared: bool, spawn: Callable[[Coroutine[Any, Any, Any]], None]) -> None:
        self.store = store
        self.shared = shared  # a store other replicas see: take its lock too
        self.spawn = spawn
        self.local: dict[str, asyncio.Future[bool]] = {}

    async def join(self, key: str, timeout_s: float, present: Present) -> Flight | None:
        """A `Flight` to lead (go upstream, then release it); None: read the cache again, and go upstream alone if
        the answer is not there (it was stored, or the leader failed as this request would, or the wait ran out).

        A waiter woken by a hand-over tries again: the first to get here leads, the others wait for it. Every
        turn waits only for what is left of `timeout_s` from the first, so no chain of failing leaders makes a
        wait longer. `present` tells whether the entry exists now (polled while another replica leads).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            flight, handed = await self._turn(key, timeout_s, deadline, present)
            if flight is not None or not handed or time.monotonic() >= deadline:
                return flight

    async def lead_or_wait(self, key: str, timeout_s: float, present: Present) -> Flight | None:
        """One turn of `join`: a waiter woken by a hand-over returns None too (and so does not lead)."""
        return (await self._turn(key, timeout_s, time.monotonic() + timeout_s, present))[0]

    async def _turn(self, key: str, timeout_s: float, deadline: float, present: Present) -> tuple[Flight | None, bool]:
        """Lead (a `Flight`), or wait for this process's leader: (None, whether it handed the key over)."""
        waiting = self.local.get(key)
        if waiting is not None:
            with contextlib.suppress(TimeoutError):
                # shielded: a waiter that leaves (cancelled) never cancels the promise the others wait for
                return None, await asyncio.wait_for(asyncio.shield(waiting), deadline - time.monotonic())
            return None, False
        flight = Flight(self, key, asyncio.get_running_loop().create_future())
        self.local[key] = flight.done
        try:
            return await self._lead(flight, key, timeout_s, deadline, present), False
        except BaseException:
            # The request left (its client went away, a shutdown) or failed before it could lead: one of its
            # waiters leads now, rather than wait out its timeout, and its lock goes. A compare-and-set cut short
            # may have taken the lock unseen: the unlock is by this flight's token, a no-op if it did not.
            flight.locked = flight.locked or self.shared
            flight.release(hand_over=True)
            raise

    async def _lead(self, flight: Flight, key: str, timeout_s: float, deadline: float,
                    present: Present) -> Flight | None:
        while True:
            try:
                if self.shared:
                    flight.until = time.monotonic() + timeout_s
                    flight.locked = await self.store.compare_and_set(LOCK + key, None, flight.token, timeout_s)
            except StoreUnavailable:
                return flight
            if flight.locked or not self.shared:
                try:
                    stored = await present()  # the previous leader may have stored it and unlocked just now
                except StoreUnavailable:
                    stored = False
                if not stored:
                    return flight
                flight.release()  # local waiters read the cache again, as this request does
                return None
            polled = await self._poll(key, deadline, present)
            if polled != "free":
                # Its own wait ran out: a local waiter (which began later) waits on in its place. Stored, or the
                # store failed: all read the cache again.
                flight.release(hand_over=polled == "timeout")
                return None
            # the other replica's leader is gone without an answer: take its lock (or poll for who did)

    async def _poll(self, key: str, deadline: float, present: Present
                    ) -> Literal["stored", "free", "timeout", "unavailable"]:
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(POLL_S, left))
            try:
                if await present():
                    return "stored"
                if await self.store.get(LOCK + key) is None:
                    return "free"
            except StoreUnavailable:
                return "unavailable"
        return "timeout"

    async def unlock(self, key: str, token: bytes, until: float = 0.0) -> None:
        """Release a flight's lock (compare-and-delete: not a lock that expired and was retaken). A store that
        cannot answer is asked again every `UNLOCK_RETRY_S` until the lock would have expired (`until`): a lock
        left behind by an outage would make every replica's requests for that key wait for their whole timeout."""
        while True:
            try:
                await self.store.compare_and_delete(LOCK + key, token)
                return
            except StoreUnavailable:
                left = until - time.monotonic()
                if left <= 0:
                    return
                await asyncio.sleep(min(UNLOCK_RETRY_S, left))
