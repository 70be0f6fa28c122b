"""The embedded store: one process, no Redis, the same contract as the shared backend.

Operations never await while they read and write, so each one is atomic on the event loop without locks.
Every structure is bounded: keys by `max_entries` (least recently used evicted first, like Redis's
`allkeys-lru`, except that cache entries go before any other key), cache entries (keys under `bytes_prefix`)
also by `max_bytes` in all, expired keys by lazy expiry plus a periodic sweep, subscriber buffers by
`channel_buffer`. The byte bound alone can change while the store runs (`rebound`): a policy reload that
changes only `cache.memory_max_bytes` keeps the store, with its keys, counters and spend.
Values are kept as bytes; counters as Python integers (read back as ASCII digits, exactly what Redis
returns for them), so that counting needs no parsing and formatting per operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.store._common import AMOUNT_SCALE, QueueChannel, check_window, to_units, ttl_ms
from gateway.store.base import (
    Channel,
    OnUnavailable,
    Reservation,
    StoreConfig,
    StoreUnavailable,
    WindowCount,
    WindowReservation,
)

__all__ = ["MemoryStore"]

SWEEP_INTERVAL_S = 5.0
_NOT_A_COUNTER = "the value at this key is not an integer counter"
_new = tuple.__new__  # a named tuple made without its Python-level __new__ (one frame fewer per answer)
_INF = float("inf")
_FAST_AMOUNT = 9e9  # amounts in [0, this) convert in line (`to_units` checks the rest, and refuses NaN)


_KNOWN = 256  # limits and window lengths kept checked and converted (a policy's few values)


@dataclass(slots=True)
class _Entry:
    value: bytes | int  # int: a counter (never under the byte-bounded prefix, whose sizes are of bytes)
    expires_at: float | None  # on the store's clock


def _bytes(value: bytes | int) -> bytes:
    return value if isinstance(value, bytes) else b"%d" % value


class MemoryStore:
    """`Store` in this process's memory; see `gateway.store.base.Store` for the contract."""

    def __init__(self, config: StoreConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config or StoreConfig()
        self._clock = clock
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._sized: OrderedDict[str, int] = OrderedDict()  # byte-bounded keys: their sizes, in LRU order
        # Keys are kept without `key_prefix`: it keeps stores that share a backend apart, and no other store
        # shares these maps (and a key the caller keeps has its hash computed once, not per operation).
        self._sized_prefix = self._config.bytes_prefix
        self.bytes = 0  # the sum of `_sized`
        self.evictions = 0  # keys dropped to stay within max_entries or max_bytes (not expiries)
        self._evictions_taken = 0  # of `evictions`, those `take_evictions` handed out
        self._channels: dict[str, set[QueueChannel]] = {}
        self._slots: dict[str, dict[str, float]] = {}  # key -> {holder: lease expiry}; emptied sets are dropped
        self._caps: dict[float, int] = {}  # limit -> its integer millionths, for at most _KNOWN limits
        self._windows: dict[float, int] = {}  # window_s -> milliseconds, likewise
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def on_unavailable(self) -> OnUnavailable:
        return self._config.on_unavailable

    @property
    def in_process(self) -> bool:
        return True

    @property
    def healthy(self) -> bool:
        return True

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-store-sweep")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for subscribers in self._channels.values():
            for channel in subscribers:
                channel.close_nowait()
        self._channels.clear()
        self._data.clear()
        self._sized.clear()
        self.bytes = 0
        self._slots.clear()

    async def ping(self) -> bool:
        return True

    def takes(self, config: StoreConfig) -> bool:
        """Whether this store can serve `config` as it is (`reconfigure`): a memory store whose key bound,
        subscriber buffers and byte-bounded prefix are this one's. What else a policy's `state:` holds
        (its key prefix, timeouts, connections) is for Redis: a memory store never reads it."""
        own = self._config
        return (config.backend == "memory" and config.max_entries == own.max_entries
                and config.channel_buffer == own.channel_buffer and config.bytes_prefix == own.bytes_prefix)

    def reconfigure(self, config: StoreConfig) -> int:
        """Take on a new policy's `config` (see `takes`): its `on_unavailable` and its byte bound (`rebound`);
        how many cache entries the bound evicted."""
        self._config = dataclasses.replace(self._config, on_unavailable=config.on_unavailable)
        return self.rebound(config.max_bytes)

    def rebound(self, max_bytes: int | None) -> int:
        """Keep cache entries (keys under `bytes_prefix`) within a new `max_bytes` from now on; how many were
        evicted for it. A smaller bound evicts cache entries, least recently used first, until they fit; no
        other key is ever touched (they hold counters and spend, which cannot be made again)."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1 (or None: no byte bound)")
        was_bounded = self._config.max_bytes is not None
        self._config = dataclasses.replace(self._config, max_bytes=max_bytes)
        if max_bytes is None:  # as a store built without a bound: nothing is sized
            self._sized.clear()
            self.bytes = 0
            return 0
        if not was_bounded:  # size the entries already there, in their least-recently-used order
            for key, entry in self._data.items():
                if key.startswith(self._sized_prefix):
                    entry.value = _bytes(entry.value)
                    self._sized[key] = len(entry.value)
                    self.bytes += len(entry.value)
        before = self.evictions
        while self.bytes > max_bytes and self._sized:
            self._evict(next(iter(self._sized)))
        return self.evictions - before

    # -- keys ------------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else _bytes(entry.value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found = [self._live(key) for key in keys]
        return [None if entry is None else _bytes(entry.value) for entry in found]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self._put(key, bytes(value), self._expiry(ttl_ms(ttl_s)))

    async def delete(self, key: str) -> bool:
        if self._live(key) is None:
            return False
        self._drop(key)
        return True

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl_s: float | None) -> bool:
        ttl = ttl_ms(ttl_s)
        entry = self._live(key)
        current = None if entry is None else _bytes(entry.value)
        if current != expected:
            return False
        self._put(key, bytes(new), self._expiry(ttl))
        return True

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        entry = self._live(key)
        if entry is None or _bytes(entry.value) != expected:
            return False
        self._drop(key)
        return True

    # -- counters --------------------------------------------------------------------------------------

    async def incr_window(self, key: str, amount: int, window_s: float) -> WindowCount:
        window = check_window(amount, window_s)
        entry, current = self._counter(key, self._clock())
        count = current + amount
        expires_at = entry.expires_at if entry and entry.expires_at is not None else self._expiry(window)
        self._write(key, entry, count, expires_at)
        return WindowCount(count, self._remaining(expires_at, window))

    async def get_window(self, key: str, window_s: float) -> WindowCount:
        window = check_window(0, window_s)
        entry, current = self._counter(key, self._clock())
        if entry is None:
            return WindowCount(0, window / 1000)
        return WindowCount(current, self._remaining(entry.expires_at, window))

    async def reserve(self, key: str, amount: float, limit: float, ttl_s: float | None) -> Reservation:
        return self.reserve_now(key, amount, limit, ttl_s)

    async def settle(self, key: str, reserved: float, actual: float, ttl_s: float | None) -> float:
        return self.settle_now(key, reserved, actual, ttl_s)

    async def reserve_window(self, key: str, amount: float, limit: float, window_s: float) -> WindowReservation:
        return self.reserve_window_now(key, amount, limit, window_s)

    async def acquire_slot(self, key: str, holder: str, limit: int, lease_s: float) -> tuple[bool, int]:
        return self.acquire_slot_now(key, holder, limit, lease_s)

    async def release_slot(self, key: str, holder: str) -> None:
        self.release_slot_now(key, holder)

    # The counter operations answered in line: the same contract as their `async` forms above, without a
    # coroutine per call (the accounting stage makes several per request, and nothing here ever waits).

    def reserve_now(self, key: str, amount: float, limit: float, ttl_s: float | None) -> Reservation:
        units = round(amount * AMOUNT_SCALE) if 0.0 <= amount < _FAST_AMOUNT else to_units(amount)
        try:
            cap = self._caps[limit]
        except KeyError:
            cap = self._cap(limit)
        if ttl_s is not None and not 0.0 < ttl_s < _INF:  # checked on every call, as `ttl_ms` would
            ttl_ms(ttl_s)
        return self.reserve_units_now(key, units, cap, limit, ttl_s)

    def settle_now(self, key: str, reserved: float, actual: float, ttl_s: float | None) -> float:
        delta = ((round(actual * AMOUNT_SCALE) if 0.0 <= actual < _FAST_AMOUNT else to_units(actual, "actual"))
                 - (round(reserved * AMOUNT_SCALE) if 0.0 <= reserved < _FAST_AMOUNT
                    else to_units(reserved, "reserved")))
        if ttl_s is not None and not 0.0 < ttl_s < _INF:
            ttl_ms(ttl_s)
        return self.settle_units_now(key, delta, ttl_s) / AMOUNT_SCALE

    def reserve_window_now(self, key: str, amount: float, limit: float, window_s: float) -> WindowReservation:
        units = round(amount * AMOUNT_SCALE) if 0.0 <= amount < _FAST_AMOUNT else to_units(amount)
        try:
            cap = self._caps[limit]
            self._windows[window_s]
        except KeyError:
            cap = self._cap(limit)
            self._window(window_s)
        return self.reserve_window_units_now(key, units, cap, limit, window_s)

    # The same three in integer millionths, for a caller that converted and checked its amounts, limits and
    # TTLs once (the accounting stage: a scope's limits once per policy, a request's cost once for all its
    # budgets): each answers as its float form for `units = to_units(amount)` and `cap = to_units(limit)`,
    # with `ttl_s` (`window_s`) None or positive and finite, and skips those conversions and checks.

    def reserve_units_now(self, key: str, units: int, cap: int, limit: float, ttl_s: float | None) -> Reservation:
        """`reserve_now` in millionths (`limit`: `cap` as the float the answer reports)."""
        entry = self._data.get(key)
        if entry is not None:
            current, expires_at = entry.value, entry.expires_at
            if type(current) is int and expires_at is not None and expires_at > self._clock():  # a live counter
                self._data.move_to_end(key)  # (the usual case): answered in this branch, changed in place
                total = current + units
                if total > cap:
                    return _new(Reservation, (False, current / AMOUNT_SCALE, limit))
                entry.value = total
                return _new(Reservation, (True, total / AMOUNT_SCALE, limit))
        entry, current = self._counter(key, self._clock())
        total = current + units
        if total > cap:
            return _new(Reservation, (False, current / AMOUNT_SCALE, limit))
        if entry is None or entry.expires_at is None or type(entry.value) is not int:
            self._write(key, entry, total, self._expiry(ttl_ms(ttl_s)))
        else:  # a live integer counter with its TTL (never byte-bounded), already the most recent: in place
            entry.value = total
        return _new(Reservation, (True, total / AMOUNT_SCALE, limit))

    def settle_units_now(self, key: str, delta: int, ttl_s: float | None) -> int:
        """`settle_now` in millionths (`delta`: the actual's less the reserved's): the total, in millionths."""
        entry = self._data.get(key)
        if entry is not None:
            current, expires_at = entry.value, entry.expires_at
            if type(current) is int and expires_at is not None and expires_at > self._clock():  # as in `reserve_now`
                self._data.move_to_end(key)
                total = current + delta
                entry.value = total = total if total > 0 else 0
                return total
        entry, current = self._counter(key, self._clock())
        total = current + delta
        total = total if total > 0 else 0
        if entry is None or entry.expires_at is None or type(entry.value) is not int:
            self._write(key, entry, total, self._expiry(ttl_ms(ttl_s)))
        else:
            entry.value = total
        return total

    def reserve_window_units_now(self, key: str, units: int, cap: int, limit: float,
                                 window_s: float) -> WindowReservation:
        """`reserve_window_now` in millionths (`limit`: `cap` as the float the answer reports)."""
        now = self._clock()
        entry = self._data.get(key)
        if entry is not None:
            expires_at, current = entry.expires_at, entry.value
            if expires_at is not None and expires_at > now and type(current) is int:  # a live counter (the usual
                self._data.move_to_end(key)  # case): answered in this branch, changed in place
                total = current + units
                if total > cap:
                    return _new(WindowReservation, (False, current / AMOUNT_SCALE, limit, expires_at - now))
                entry.value = total
                return _new(WindowReservation, (True, total / AMOUNT_SCALE, limit, expires_at - now))
        entry, current = self._counter(key, now)
        expires_at = entry.expires_at if entry is not None else None
        if expires_at is None:
            window = ttl_ms(window_s)
            assert window is not None
            expires_at = now + window / 1000
        reset = expires_at - now
        reset = reset if reset > 0.0 else 0.0
        total = current + units
        if total > cap:
            return _new(WindowReservation, (False, current / AMOUNT_SCALE, limit, reset))
        if entry is None or entry.expires_at is None or type(entry.value) is not int:
            self._write(key, entry, total, expires_at)
        else:
            entry.value = total
        return _new(WindowReservation, (True, total / AMOUNT_SCALE, limit, reset))

    def acquire_slot_now(self, key: str, holder: str, limit: int, lease_s: float) -> tuple[bool, int]:
        lease = ttl_ms(lease_s)
        assert lease is not None
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        now = self._clock()
        held = {h: at for h, at in self._slots.get(key, {}).items() if at > now}
        if holder not in held:
            if len(held) >= limit:
                self._slots[key] = held
                return False, len(held)
            held[holder] = now + lease / 1000
        self._slots[key] = held
        return True, len(held)

    def release_slot_now(self, key: str, holder: str) -> None:
        held = self._slots.get(key)
        if held is not None:
            held.pop(holder, None)
            if not held:
                del self._slots[key]

    # -- pub/sub ---------------------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        for subscriber in tuple(self._channels.get(channel, ())):
            subscriber.push(bytes(message))

    async def subscribe(self, channel: str) -> Channel:
        subscriber = QueueChannel(channel, self._config.channel_buffer, self._unsubscribe)
        self._channels.setdefault(channel, set()).add(subscriber)
        return subscriber

    async def _unsubscribe(self, subscriber: QueueChannel) -> None:
        subscribers = self._channels.get(subscriber.name)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._channels[subscriber.name]

    # -- internals -------------------------------------------------------------------------------------

    def _live(self, key: str) -> _Entry | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= self._clock():
            self._drop(key)
            return None
        self._data.move_to_end(key)
        if key in self._sized:
            self._sized.move_to_end(key)
        return entry

    def _counter(self, key: str, now: float) -> tuple[_Entry | None, int]:
        """`_live` and the counter's value in one call (the counter operations' first step): the live entry,
        if any, and its value (0 when absent; a value set as bytes is parsed, as Redis would). `now`: the
        store's clock, read once by the caller."""
        entry = self._data.get(key)
        if entry is None:
            return None, 0
        if entry.expires_at is not None and entry.expires_at <= now:
            self._drop(key)
            return None, 0
        self._data.move_to_end(key)
        value = entry.value
        if type(value) is int:
            return entry, value
        if key in self._sized:
            self._sized.move_to_end(key)
        try:
            return entry, int(value)
        except ValueError:
            raise StoreUnavailable(_NOT_A_COUNTER) from None

    def _cap(self, limit: float) -> int:
        """`to_units(limit)`, checked, and kept for the next operations (a policy has few limits)."""
        units = to_units(limit, "limit")
        if len(self._caps) < _KNOWN:
            self._caps[limit] = units
        return units

    def _window(self, window_s: float) -> int:
        """`check_window`'s window length in milliseconds, checked, and kept like `_cap`."""
        window = ttl_ms(window_s)
        assert window is not None
        if len(self._windows) < _KNOWN:
            self._windows[window_s] = window
        return window

    def _bounded(self, key: str) -> bool:
        """Whether a key's values count towards `max_bytes` (then they are kept as bytes, to be sized)."""
        return self._config.max_bytes is not None and key.startswith(self._sized_prefix)

    def _write(self, key: str, entry: _Entry | None, count: int, expires_at: float | None) -> None:
        """Store a counter just read by `_counter` (`entry`): a live key outside the byte bound is changed in
        place (it is already the most recent, and the key count is unchanged), the rest go through `_put`."""
        if entry is None or self._bounded(key):
            self._put(key, count, expires_at)
        else:
            entry.value = count
            entry.expires_at = expires_at

    def _put(self, key: str, value: bytes | int, expires_at: float | None) -> None:
        limit = self._config.max_bytes
        sized = limit is not None and key.startswith(self._sized_prefix)
        if sized and type(value) is int:
            value = b"%d" % value
        self._data[key] = _Entry(value, expires_at)
        self._data.move_to_end(key)
        if sized:
            assert limit is not None and isinstance(value, bytes)
            if len(value) > limit:  # could never fit: drop it rather than everything else
                self._evict(key)
                return
            self.bytes += len(value) - self._sized.pop(key, 0)
            self._sized[key] = len(value)
            while self.bytes > limit and self._sized:
                self._evict(next(iter(self._sized)))
        while len(self._data) > self._config.max_entries:  # cache entries go first: they can be made again,
            cached = self._sized  # a counter (a budget's spend, a window's count) cannot
            self._evict(next(iter(cached)) if cached else next(iter(self._data)))

    def take_evictions(self) -> int:
        """Evictions since the last call: what the cache adds to its counter. Kept here, not by the cache, so
        that the cache services of two policies (the old one finishing its requests after a reload, the new one)
        never count one eviction twice."""
        taken, self._evictions_taken = self.evictions - self._evictions_taken, self.evictions
        return taken

    def _evict(self, key: str) -> None:
        self._drop(key)
        self.evictions += 1

    def _drop(self, key: str) -> None:
        self._data.pop(key, None)
        size = self._sized.pop(key, None)
        if size is not None:
            self.bytes -= size

    def _expiry(self, ttl: int | None) -> float | None:
        return None if ttl is None else self._clock() + ttl / 1000

    def _remaining(self, expires_at: float | None, window_ms: int) -> float:
        if expires_at is None:
            return window_ms / 1000
        return max(0.0, expires_at - self._clock())

    def sweep(self) -> int:
        """Drop every expired key now; how many. Runs periodically after `start()`."""
        now = self._clock()
        expired = [k for k, e in self._data.items() if e.expires_at is not None and e.expires_at <= now]
        for key in expired:
            self._drop(key)
        for key, held in list(self._slots.items()):
            live = {h: at for h, at in held.items() if at > now}
            if live:
                self._slots[key] = live
            else:
                del self._slots[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._data)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()
