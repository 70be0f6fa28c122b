"""Helpers shared by the backends: argument checks, amount units, and the buffered subscriber channel."""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Self

__all__ = ["AMOUNT_SCALE", "QueueChannel", "check_window", "from_units", "to_units", "ttl_ms"]

AMOUNT_SCALE = 1_000_000
"""Amounts are stored as integer millionths (micro-USD, micro-tokens): sums and limit checks are exact, the
same in memory and in Redis (Lua numbers are doubles, exact for integers up to 2**53, i.e. about 9e9 whole
units per key), and no INCRBYFLOAT rounding can let a reservation slip past its limit."""
_MAX_UNITS = 2**53


def to_units(amount: float, what: str = "amount") -> int:
    """A non-negative amount as integer millionths (rounded to the nearest one)."""
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{what} must be a finite number >= 0, not {amount!r}")
    units = round(amount * AMOUNT_SCALE)
    if units >= _MAX_UNITS:
        raise ValueError(f"{what} {amount!r} is too large to be kept exactly")
    return units


def from_units(units: int) -> float:
    return units / AMOUNT_SCALE


def ttl_ms(ttl_s: float | None) -> int | None:
    """A TTL in whole milliseconds (at least 1), or None for no expiry; rejects zero, negative and NaN."""
    if ttl_s is None:
        return None
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"ttl_s must be a positive number of seconds or None, not {ttl_s!r}")
    ms = math.ceil(ttl_s * 1000)
    return ms if ms > 1 else 1  # not max(): a builtin call costs several times a comparison


def check_window(amount: int, window_s: float) -> int:
    """The window length in milliseconds, after checking both arguments."""
    if amount < 0:
        raise ValueError(f"amount must be >= 0, not {amount!r}")
    window = ttl_ms(window_s)
    assert window is not None
    return window


class QueueChannel:
    """A subscription backed by a bounded buffer: the publisher side never blocks and memory stays bounded.

    When the buffer is full the oldest message is dropped (and counted in `dropped`): a subscriber that
    falls behind loses old signals rather than slowing every publisher down.
    """

    def __init__(self, name: str, buffer: int, on_close: Callable[[QueueChannel], Awaitable[None]]) -> None:
        self._name = name
        self._buffer: deque[bytes] = deque(maxlen=buffer)
        self._ready = asyncio.Event()
        self._closed = False
        self._on_close = on_close
        self.dropped = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, message: bytes) -> None:
        if self._closed:
            return
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(message)
        self._ready.set()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()
        return self._buffer.popleft()

    def close_nowait(self) -> None:
        """End iteration (after what is buffered) without running the close callback."""
        self._closed = True
        self._ready.set()

    async def aclose(self) -> None:
        if self._closed:
            return
        self.close_nowait()
        await self._on_close(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
