"""Cache reads from a shared store, batched: the lookups of one event-loop turn go out as one `MGET`.

A hit from Redis spent most of its CPU on the round trip, not on the answer: the
client's command machinery, a socket write and a read, per request. Under load
many requests reach the cache in the same turn of the loop (their bodies arrived
together), so their lookups are gathered and sent together. The first lookup of
a turn starts the batch's task; the task's first step runs after every request
step already queued, so each of them has added its key by then. Nothing waits
for a timer: a lone request pays one extra loop turn, no more.

A batch fails as a whole (the store is unavailable: every lookup in it is a
miss, as a single `GET` would have been), and a lookup that is cancelled (its
client left) only stops waiting: the others still get their values.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..store.base import StoreUnavailable

__all__ = ["MAX_BATCH", "BatchedGets"]

MAX_BATCH = 64  # keys per MGET: a larger batch starts a second one rather than grow one command without end

GetMany = Callable[[Sequence[str]], Awaitable[list[bytes | None]]]
Spawn = Callable[[Any], None]


class BatchedGets:
    __slots__ = ("_get_many", "_open", "_spawn")

    def __init__(self, get_many: GetMany, spawn: Spawn) -> None:
        self._get_many = get_many
        self._spawn = spawn  # runs the batch's coroutine as a task the cache tracks (cancelled at close)
        self._open: dict[str, list[asyncio.Future[bytes | None]]] | None = None  # the batch still taking keys

    async def get(self, key: str) -> bytes | None:
        """The value of `key` (None: absent); `StoreUnavailable` if the store could not be read."""
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        batch = self._open
        if batch is None:
            batch = self._open = {}
            self._spawn(self._fetch(batch))
        waiters = batch.get(key)
        if waiters is None:
            batch[key] = [future]
            if len(batch) >= MAX_BATCH:
                self._open = None  # full: the next lookup starts another
        else:
            waiters.append(future)
        return await future

    async def _fetch(self, batch: dict[str, list[asyncio.Future[bytes | None]]]) -> None:
        if self._open is batch:
            self._open = None  # from here, lookups go into the next batch
        keys = list(batch)
        try:
            values = await self._get_many(keys)
        except BaseException as exc:
            why = str(exc) if isinstance(exc, StoreUnavailable) else f"cache read stopped ({type(exc).__name__})"
            for waiters in batch.values():
                for future in waiters:
                    if not future.done():
                        future.set_exception(StoreUnavailable(why))
            if not isinstance(exc, StoreUnavailable):
                raise
            return
        for key, value in zip(keys, values, strict=True):
            for future in batch[key]:
                if not future.done():
                    future.set_result(value)
