"""Smaller per-connection objects for uvicorn's HTTP protocol: memory per open stream.

A gateway that holds thousands of slow streams keeps, for each, a client connection with its
uvicorn objects. Three of those objects are empty `collections.deque`s nearly all the time, and
an empty deque is not small: it allocates its first 64-slot block up front, 760 bytes with the
object on CPython 3.11, where an empty list is 56:

* the connection's `pipeline`: requests that arrived while one was in flight (HTTP pipelining,
  which clients rarely use); uvicorn calls `appendleft` and `pop` on it and tests its truth;
* the waiters of the connection's flow-control event (someone waits only while the client reads
  slower than the gateway writes) and of a request's `message_event` (someone waits only while
  the app waits for body bytes or for the disconnect); `asyncio.Event` only appends, removes and
  iterates its waiters.

`slim_connection` and `slim_cycle` put a list in place of each (about 2.1 KB less per held
stream, by tracemalloc, on the scale row's held streams). Each swap first checks the exact type
and emptiness of what it replaces, so a uvicorn or asyncio release that changes these
attributes keeps its own objects, and only the memory saving is lost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["SmallDeque", "slim_connection", "slim_cycle"]


class SmallDeque(list[Any]):
    """The deque methods uvicorn's pipeline uses, on a list (it rarely holds anything)."""

    __slots__ = ()

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)

    def popleft(self) -> Any:
        return self.pop(0)


def slim_connection(protocol: Any) -> None:
    """After uvicorn's `connection_made`: its pipeline and its flow-control event, without deques."""
    pipeline = getattr(protocol, "pipeline", None)
    if type(pipeline) is deque and not pipeline:
        protocol.pipeline = SmallDeque()
    flow = getattr(protocol, "flow", None)
    if flow is not None:
        _slim_event(getattr(flow, "_is_writable_event", None))


def slim_cycle(cycle: Any) -> None:
    """A new request cycle (before its task runs): its message event without a deque."""
    _slim_event(getattr(cycle, "message_event", None))


def _slim_event(event: object) -> None:
    if type(event) is asyncio.Event:
        waiters = getattr(event, "_waiters", None)
        if type(waiters) is deque and not waiters:
            event._waiters = []  # type: ignore[assignment]
