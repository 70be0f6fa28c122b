"""Identical misses at the same time: one request goes upstream, the others wait for its answer.

In one process the first miss of a key leads and the others await its `Flight`
(no polling). Across replicas the leader also takes a lock key in the store
(compare-and-set with a TTL, so a replica that dies frees it); a replica that
finds the lock taken polls for the entry until it appears, the lock goes, or the
wait times out, and then reads the cache again. A wait is always bounded by the
alias's `coalesce_timeout_s`; after it the waiter goes upstream itself. If the
store cannot answer, nobody waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..store.base import Store, StoreUnavailable

__all__ = ["Flight", "Flights"]

LOCK = "cache:lock:"
POLL_S = 0.05
UNLOCK_RETRY_S = 0.5


class Flight:
    """A leader's promise to the other requests of its key; `release` once its answer is stored (or not)."""

    __slots__ = ("_flights", "done", "key", "locked", "token", "until")

    def __init__(self, flights: Flights, key: str, done: asyncio.Future[None]) -> None:
        self._flights = flights
        self.key = key
        self.done = done
        self.locked = False  # holds the store's lock
        # This flight's own (not the replica's): an unlock retried after it was in fact applied never frees the
        # lock a later flight of this replica took for the same key.
        self.token = os.urandom(8)
        self.until = 0.0  # when the store's lock expires by itself (`time.monotonic()`)

    def release(self) -> None:
        """Wake the waiters (they read the cache again); safe to call twice."""
        if self.done.done():
            return
        self.done.set_result(None)
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
        self.local: dict[str, asyncio.Future[None]] = {}

    async def lead_or_wait(self, key: str, timeout_s: float, present: Callable[[], Coroutine[Any, Any, bool]]
                           ) -> Flight | None:
        """A `Flight` to lead (go upstream, then release it); None: another request led, read the cache again.

        `present` tells whether the entry exists now (polled while another replica leads).
        """
        waiting = self.local.get(key)
        if waiting is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiting), timeout_s)
            return None
        flight = Flight(self, key, asyncio.get_running_loop().create_future())
        self.local[key] = flight.done
        try:
            return await self._lead(flight, key, timeout_s, present)
        except BaseException:
            # The request left (its client went away, a shutdown) or failed before it could lead: its waiters read
            # the cache again now, rather than wait out their timeout, and its lock goes. A compare-and-set cut
            # short may have taken the lock unseen: the unlock is by this flight's token, a no-op if it did not.
            flight.locked = flight.locked or self.shared
            flight.release()
            raise

    async def _lead(self, flight: Flight, key: str, timeout_s: float,
                    present: Callable[[], Coroutine[Any, Any, bool]]) -> Flight | None:
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
        else:
            await self._poll(key, timeout_s, present)
        flight.release()  # local waiters read the cache again, as this request does
        return None

    async def _poll(self, key: str, timeout_s: float, present: Callable[[], Coroutine[Any, Any, bool]]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
            try:
                if await present() or await self.store.get(LOCK + key) is None:
                    return
            except StoreUnavailable:
                return

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
