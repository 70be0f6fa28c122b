"""The embedded store: one process, no Redis, the same contract as the shared backend.

Operations never await while they read and write, so each one is atomic on the event loop without locks.
Every structure is bounded: the keys as `gateway.store.memory_keyspace` says (by `max_entries`, cache entries
also by `max_bytes`, expired keys swept every `SWEEP_INTERVAL_S`), subscriber buffers by `channel_buffer`.
The byte bound alone can change while the store runs (`rebound`): a policy reload that changes only
`cache.memory_max_bytes` keeps the store, with its keys, counters and spend.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway.store._common import AMOUNT_SCALE, QueueChannel, check_window, to_units, ttl_ms
from gateway.store.base import (
    Channel,
    OnUnavailable,
    Reservation,
    StoreConfig,
    Take,
    WindowCount,
    WindowReservation,
)
from gateway.store.memory_keyspace import Keyspace, as_bytes

__all__ = ["MemoryStore"]

SWEEP_INTERVAL_S = 5.0
_new = tuple.__new__  # a named tuple made without its Python-level __new__ (one frame fewer per answer)
_INF = float("inf")
_FAST_AMOUNT = 9e9  # amounts in [0, this) convert in line (`to_units` checks the rest, and refuses NaN)


class MemoryStore(Keyspace):
    """`Store` in this process's memory; see `gateway.store.base.Store` for the contract."""

    def __init__(self, config: StoreConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, clock=clock)
        self._channels: dict[str, set[QueueChannel]] = {}
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
        self._expendable.clear()
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
                and config.channel_buffer == own.channel_buffer and config.bytes_prefix == own.bytes_prefix
                and config.expendable_prefixes == own.expendable_prefixes)

    def reconfigure(self, config: StoreConfig) -> int:
        """Take on a new policy's `config` (see `takes`): its `on_unavailable` and its byte bound (`rebound`);
        how many cache entries the bound evicted."""
        self._config = dataclasses.replace(self._config, on_unavailable=config.on_unavailable)
        return self.rebound(config.max_bytes)

    # -- keys ------------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return None if entry is None else as_bytes(entry.value)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        found = [self._live(key) for key in keys]
        return [None if entry is None else as_bytes(entry.value) for entry in found]

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
        current = None if entry is None else as_bytes(entry.value)
        if current != expected:
            return False
        self._put(key, bytes(new), self._expiry(ttl))
        return True

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        entry = self._live(key)
        if entry is None or as_bytes(entry.value) != expected:
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

    # Operation ids (`op`, `held`) are not kept: an operation here is never in doubt (it never times out, and
    # fails only before it changes anything), so it is never repeated. Nor are leases (`lease_s`): the counters die
    # with the process whose requests held them.

    async def reserve(self, key: str, amount: float, limit: float, ttl_s: float | None, op: str | None = None,
                      held: float = 0.0, lease_s: float | None = None) -> Reservation:
        return self.reserve_now(key, amount, limit, ttl_s)

    async def settle(self, key: str, reserved: float, actual: float, ttl_s: float | None,
                     op: str | None = None, leased: bool = False) -> float:
        return self.settle_now(key, reserved, actual, ttl_s)

    async def reserve_window(self, key: str, amount: float, limit: float, window_s: float) -> WindowReservation:
        return self.reserve_window_now(key, amount, limit, window_s)

    async def acquire_slot(self, key: str, holder: str, limit: int, lease_s: float) -> tuple[bool, int]:
        return self.acquire_slot_now(key, holder, limit, lease_s)

    async def release_slot(self, key: str, holder: str) -> None:
        self.release_slot_now(key, holder)

    async def reserve_together(self, takes: Sequence[Take]) -> tuple[bool, list[Any]]:
        """Taken one by one and, when one that is required does not fit, given back, all in one step that never
        awaits (no other caller sees them between). A slot its holder held already is given back too (holders
        are per request: never the case for the accounting stage)."""
        answers: list[Any] = []
        fits = True
        for what, args, required in takes:
            if what == "acquire_slot":
                answer: Any = self.acquire_slot_now(*args)
            elif what == "reserve_window":
                answer = self.reserve_window_now(*args)
            else:
                answer = self.reserve_now(*args[:4])
            answers.append(answer)
            fits = fits and (answer[0] or not required)
        if fits:
            return True, answers
        for index, ((what, args, _), answer) in enumerate(zip(takes, answers, strict=True)):
            if not answer[0]:
                continue
            if what == "acquire_slot":
                self.release_slot_now(args[0], args[1])
                answers[index] = (True, answer[1] - 1)
            else:
                total = self.settle_now(args[0], args[1], 0.0, args[3])
                answers[index] = answer._replace(total=total)
        return False, answers

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

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()
