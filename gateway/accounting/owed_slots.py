"""Concurrency slots the store may still hold, owed back to it: the ledger's part that gives them back.

A slot whose release failed, or whose take timed out (it may have been applied all the same), is given back
at the ledger's later flushes until the store takes it or the slot's lease has run out anyway: a Redis stall
of a second must not hold a key's slots for the lease's 15 minutes. Releasing a slot not held changes nothing,
so owing one that was never taken is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from ..store.base import Store, StoreRefused, StoreUnavailable

__all__ = ["OwedSlots"]

_MAX_SLOTS = 100_000  # slots owed at once (each a few hundred bytes)


class OwedSlots:
    """(slot key, holder) -> when its lease ends (monotonic). Bounded: past `limit`, the oldest are left to
    their leases."""

    __slots__ = ("_limit", "_slots")

    def __init__(self, limit: int = _MAX_SLOTS) -> None:
        self._slots: dict[tuple[str, str], float] = {}
        self._limit = limit

    def __bool__(self) -> bool:
        return bool(self._slots)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._slots)

    def owe(self, key: str, holder: str, lease_s: float) -> None:
        """A slot the store may still hold for `holder`, given back for at most `lease_s` (then the store has let
        it go itself)."""
        self._slots[(key, holder)] = time.monotonic() + lease_s
        self._trim()

    def take(self, other: OwedSlots) -> None:
        """What `other` owes (a retired runtime's ledger's), owed here too, each until the later of its leases;
        `other` then owes nothing."""
        slots = self._slots
        for slot, until in other._slots.items():
            slots[slot] = max(until, slots.get(slot, until))
        other._slots = {}
        self._trim()

    def clear(self) -> None:
        """Left to their leases (a close with no heir)."""
        self._slots = {}

    async def give_back(self, store: Store) -> None:
        """Each slot released, until the store is away (the rest at the next flush); one it refuses while it
        answers is kept, and the others given back meanwhile."""
        now = time.monotonic()
        slots = self._slots
        for slot, until in list(slots.items()):
            if until <= now:  # its lease ran out: the store dropped it
                del slots[slot]
                continue
            try:
                await store.release_slot(*slot)
            except StoreUnavailable as exc:
                if not isinstance(exc, StoreRefused):  # away, or its pool busy: the rest at the next turn
                    return
                continue
            slots.pop(slot, None)

    def _trim(self) -> None:
        slots = self._slots
        while len(slots) > self._limit:
            del slots[next(iter(slots))]
