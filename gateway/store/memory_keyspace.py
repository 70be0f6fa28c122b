"""The embedded store's keys: entries with their expiry, the bounds that evict them, and the counters' steps.

What `MemoryStore` answers its operations from (`gateway.store.memory`), kept apart so that each module fits
on a few screens. Every structure is bounded: keys by `max_entries` (least recently used evicted first, like
Redis's `allkeys-lru`, except that cache entries go first, then other keys that may be lost without harm:
`expendable_prefixes`, then any other key), cache entries (keys under
`bytes_prefix`) also by `max_bytes` in all, expired keys by lazy expiry plus a periodic sweep (`sweep`).
Values are kept as bytes; counters as Python integers (read back as ASCII digits, exactly what Redis
returns for them), so that counting needs no parsing and formatting per operation.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.store._common import to_units, ttl_ms
from gateway.store.base import StoreConfig, StoreRefused

__all__ = ["Entry", "Keyspace", "as_bytes"]

_NOT_A_COUNTER = "the value at this key is not an integer counter"
_KNOWN = 256  # limits and window lengths kept checked and converted (a policy's few values)


@dataclass(slots=True)
class Entry:
    value: bytes | int  # int: a counter (never under the byte-bounded prefix, whose sizes are of bytes)
    expires_at: float | None  # on the store's clock


def as_bytes(value: bytes | int) -> bytes:
    return value if isinstance(value, bytes) else b"%d" % value


class Keyspace:
    """The keys of one `MemoryStore`, on its clock, within its config's bounds."""

    def __init__(self, config: StoreConfig | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config or StoreConfig()
        self._clock = clock
        self._data: OrderedDict[str, Entry] = OrderedDict()
        self._sized: OrderedDict[str, int] = OrderedDict()  # byte-bounded keys: their sizes, in LRU order
        # Keys are kept without `key_prefix`: it keeps stores that share a backend apart, and no other store
        # shares these maps (and a key the caller keeps has its hash computed once, not per operation).
        self._sized_prefix = self._config.bytes_prefix
        self._expendable_prefixes = self._config.expendable_prefixes
        self._expendable: OrderedDict[str, None] = OrderedDict()  # keys under those prefixes, in LRU order
        self.bytes = 0  # the sum of `_sized`
        self.evictions = 0  # keys dropped to stay within max_entries or max_bytes (not expiries)
        self._evictions_taken = 0  # of `evictions`, those `take_evictions` handed out
        self._slots: dict[str, dict[str, float]] = {}  # key -> {holder: lease expiry}; emptied sets are dropped
        self._caps: dict[float, int] = {}  # limit -> its integer millionths, for at most _KNOWN limits
        self._windows: dict[float, int] = {}  # window_s -> milliseconds, likewise

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
                    entry.value = as_bytes(entry.value)
                    self._sized[key] = len(entry.value)
                    self.bytes += len(entry.value)
        before = self.evictions
        while self.bytes > max_bytes and self._sized:
            self._evict(next(iter(self._sized)))
        return self.evictions - before

    def _live(self, key: str) -> Entry | None:
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

    def _counter(self, key: str, now: float) -> tuple[Entry | None, int]:
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
            raise StoreRefused(_NOT_A_COUNTER) from None

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

    def _write(self, key: str, entry: Entry | None, count: int, expires_at: float | None) -> None:
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
        self._data[key] = Entry(value, expires_at)
        self._data.move_to_end(key)
        if key.startswith(self._expendable_prefixes):
            self._expendable[key] = None
            self._expendable.move_to_end(key)
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
            # then records that may be lost (a feedback record); a counter (a budget's spend, a window's count)
            # or a run-time key cannot
            victims = self._sized or self._expendable or self._data
            self._evict(next(iter(victims)))

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
        self._expendable.pop(key, None)
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
