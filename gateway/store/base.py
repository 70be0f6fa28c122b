"""The shared-state `Store`: one small interface for limits, budgets, cache, breakers and reload signals.

Everything that must agree across gateway replicas sits on this interface, so that each feature is written
once and runs the same on one process (the in-memory backend, no Redis needed) and on many replicas (Redis).
The interface is deliberately narrow: a handful of atomic primitives are easy to implement exactly on both
backends and to test with one contract suite; richer behaviour belongs to the callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, Self

__all__ = [
    "OP_TTL_S",
    "Backend",
    "Channel",
    "OnUnavailable",
    "Reservation",
    "Store",
    "StoreConfig",
    "StoreRefused",
    "StoreUnavailable",
    "Take",
    "WindowCount",
    "WindowReservation",
]

Backend = Literal["memory", "redis"]
OnUnavailable = Literal["open", "closed"]

OP_TTL_S = 300.0
"""How long a counter operation's record (`reserve` and `settle` with an `op`) outlives its last step: what its
repeats are recognised for. A repeat comes from the accounting ledger, which sends an operation whose answer was
lost again at each flush until the store answers, for at most `OP_TTL_S` less a minute after the first attempt
whose answer was lost (`accounting.ledger.OP_RETRY_S`; the minute: for its last attempt to be applied late in its
turn), and from an attempt itself applied late (the stall that lost its answer: seconds). Each record holds about
250 bytes of Redis memory for this long: one per request and budget, and one per usage counter the ledger writes
(once a second)."""


class StoreUnavailable(Exception):
    """The backend did not answer within its timeout, is down, or refused the operation.

    Every backend failure (network, timeout, server error) surfaces as this one exception so that a caller
    has exactly one thing to catch and applies its own policy: fail open (serve without the limit, the cache
    or the shared breaker state) or fail closed (refuse the request). The store never makes that choice; it
    only carries the configured default in `Store.on_unavailable`.

    `maybe_applied`: whether the operation may have been applied all the same (it was sent, and its answer was
    lost: a timeout, a dropped connection); False when it surely was not (the store failed fast without sending
    it, or answered with an error). A caller that repeats an operation which may have been applied repeats it
    with the same `op` (`Store.reserve`, `Store.settle`), so that it counts once.
    """

    def __init__(self, message: str = "", *, maybe_applied: bool = True) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class StoreRefused(StoreUnavailable):
    """A live store answered this operation with an error (a key of another type, a bad argument): not applied, and
    about this operation's keys, not the store's health (a caller that reads many keys names the one at fault)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message, maybe_applied=False)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """How to build a store; frozen so that a running store can never drift from its configuration.

    `url` is already resolved from the environment by the caller (the policy names environment variables,
    never secrets). Timeouts are small on purpose: a request must never wait long on shared state, and the
    caller's `on_unavailable` policy decides what a missing answer means.
    """

    backend: Backend = "memory"
    url: str | None = None
    key_prefix: str = "gw:"
    connect_timeout_s: float = 1.0
    """Budget for a new connection, at start and for the recovery probe (operations use `op_timeout_s`)."""
    op_timeout_s: float = 0.3
    """Upper bound of every operation, including waiting for a pooled connection."""
    on_unavailable: OnUnavailable = "open"
    max_connections: int = 64
    backoff_min_s: float = 0.1
    """After a failure, operations fail fast for at least this long before Redis is probed again."""
    backoff_max_s: float = 2.0
    """The probe interval doubles while Redis stays down, up to this; recovery is noticed within it."""
    max_entries: int = 100_000
    """Memory backend: keys kept at most (least recently used evicted first, cache entries under `bytes_prefix`
    before any other key when `max_bytes` is set), so memory stays bounded."""
    channel_buffer: int = 1_000
    """Messages buffered per subscriber; when a slow subscriber falls behind, the oldest are dropped."""
    max_bytes: int | None = None
    """Memory backend: values under keys starting with `bytes_prefix` (cache entries) are kept up to this many
    bytes in all, least recently used evicted first, so that large cached answers never crowd out counters.
    The one setting a running store takes anew (`MemoryStore.rebound`), which replaces its copy of the config:
    a reload that changes only it keeps the store's keys, counters and spend."""
    bytes_prefix: str = "cache:"
    expendable_prefixes: tuple[str, ...] = ("fb:", "resp:")
    """Memory backend: keys that may be lost without harm (feedback records: a request then cannot be rated; the
    owners of Responses answers, `pipeline.response_owners`: the response then cannot be continued), evicted
    after cache entries and before any other key, so that one tenant's traffic never pushes out another's
    run-time keys, budgets or usage counters (each request leaves a feedback record while feedback is on, each
    Responses answer an owner record)."""

    def __post_init__(self) -> None:
        if self.backend not in ("memory", "redis"):
            raise ValueError(f"store backend must be 'memory' or 'redis', not {self.backend!r}")
        if self.backend == "redis" and not self.url:
            raise ValueError("the redis store backend needs a url")
        if self.on_unavailable not in ("open", "closed"):
            raise ValueError(f"on_unavailable must be 'open' or 'closed', not {self.on_unavailable!r}")
        for name in ("connect_timeout_s", "op_timeout_s", "backoff_min_s", "backoff_max_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError("backoff_max_s must not be below backoff_min_s")
        for name in ("max_connections", "max_entries", "channel_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError("max_bytes must be at least 1 (or None: no byte bound)")


@dataclass(frozen=True, slots=True)
class WindowCount:
    """A fixed-window counter after an operation: what rate limits need for 429s and their headers."""

    count: int
    """Total in the current window, this increment included."""
    reset_s: float
    """Seconds until the window closes and the count starts again from zero (`Retry-After`, `x-ratelimit-reset`)."""


class Reservation(NamedTuple):
    """The answer to `Store.reserve`: whether the amount fit under the limit, and the total it left.

    (Named tuples, not frozen dataclasses: made on every limited request, and a frozen dataclass costs
    several times as much to build.)"""

    ok: bool
    total: float
    """The total after the reservation when `ok`, else the unchanged total that refused it."""
    limit: float

    @property
    def remaining(self) -> float:
        """What is left under the limit (never negative), e.g. for `x-ratelimit-remaining-tokens`."""
        left = self.limit - self.total
        return left if left > 0.0 else 0.0  # not max(): read on every budgeted request


class WindowReservation(NamedTuple):
    """The answer to `Store.reserve_window`: a reservation in a fixed window, and when that window resets."""

    ok: bool
    total: float
    """The total after the reservation when `ok`, else the unchanged total that refused it."""
    limit: float
    reset_s: float
    """Seconds until the window closes (a refused caller's `Retry-After`; `x-ratelimit-reset-*`)."""

    @property
    def remaining(self) -> float:
        left = self.limit - self.total
        return left if left > 0.0 else 0.0


class Take(NamedTuple):
    """One reservation of `Store.reserve_together`: `what` names the operation that makes it alone
    (`acquire_slot`, `reserve_window` or `reserve`), `args` are that operation's arguments (positional: a budget's
    `lease_s` comes after its `op` and `held`)."""

    what: Literal["acquire_slot", "reserve_window", "reserve"]
    args: tuple[Any, ...]
    required: bool = True
    """Whether its refusal refuses them all (a soft budget's does not: the others are taken without it)."""


class Channel(Protocol):
    """One subscription to a pub/sub channel: iterate it for messages, `aclose()` it when done.

    Delivery is at most once: a message published while a subscriber is disconnected (Redis restarting) or
    too slow (its buffer is full) is lost. Use messages as hints to re-read state kept under keys, never as
    the only copy of that state. Iteration ends after `aclose()` (or when the store closes).
    """

    @property
    def name(self) -> str: ...

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> bytes: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...


class Store(Protocol):
    """Shared state with atomic primitives; every backend passes the same contract tests.

    Keys and channel names are the caller's; the store prefixes each with `StoreConfig.key_prefix`, so that
    several gateways (or tests) can share one Redis. Every operation raises `StoreUnavailable` when the
    backend cannot answer in time, and never anything else for a backend failure. Amounts (`reserve`,
    `settle`) are kept as integer millionths, so that sums are exact and identical on every backend.
    """

    @property
    def on_unavailable(self) -> OnUnavailable:
        """The configured default for callers' fail-open / fail-closed decisions."""
        ...

    @property
    def in_process(self) -> bool:
        """Whether operations complete without waiting on I/O (memory): callers then await them one after
        the other, in line, rather than paying for tasks that would only overlap network round trips."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether the last operations reached the backend (for `/readyz` and a store-up gauge)."""
        ...

    async def start(self) -> None:
        """Open connections and background work; an unreachable backend is not an error here (see `healthy`)."""
        ...

    async def aclose(self) -> None:
        """Close connections, stop background work and end every open subscription."""
        ...

    async def ping(self) -> bool:
        """One real round trip, bounded by the timeout; updates `healthy` and never raises."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys`, in order (None: absent), in one round trip."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        """Store `value`; with `ttl_s` the key expires after it, without it the key stays (and drops any TTL)."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the key; whether it existed."""
        ...

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl_s: float | None) -> bool:
        """Write `new` only if the value is `expected` (None: only if the key is absent); whether it wrote."""
        ...

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        """Remove the key only if its value is `expected`, atomically; whether it removed it.

        A lock taken with `compare_and_set(key, None, token, ttl)` is released with this: a holder whose lock
        expired (and was taken by another) must not release the new holder's, which a `get` then a `delete`
        could, between the two."""
        ...

    async def incr_window(self, key: str, amount: int, window_s: float) -> WindowCount:
        """Add `amount` to a fixed-window counter; the window opens at its first increment and lasts `window_s`."""
        ...

    async def get_window(self, key: str, window_s: float) -> WindowCount:
        """Read a window counter without changing it; an absent one reads as 0 with a full window ahead."""
        ...

    async def reserve(self, key: str, amount: float, limit: float, ttl_s: float | None, op: str | None = None,
                      held: float = 0.0, lease_s: float | None = None) -> Reservation:
        """Add `amount` only if the total stays at or under `limit`, atomically (reserve-then-settle budgets).

        `ttl_s` applies when the key is created (or has no TTL); later calls do not extend it, so a budget
        period is not stretched by traffic.

        `op`: an id the caller made for this reservation (unique per key), which the store records with what the
        reservation holds (for `OP_TTL_S` from its last step). A reserve with an `op` it holds adds a step to it
        (`held`: what the caller knows it holds, should the record have expired); once the `op` was settled
        (`settle`), a reserve with it changes nothing and answers not ok: a reservation whose answer was lost, and
        which the caller gave up (settled to nothing), is not applied if it arrives after that. A store whose
        operations are never in doubt (memory) may ignore `op` and `held`.

        `lease_s` (with an `op`): the reservation is a lease, renewed by each step, dropped by its `settle`. One not
        settled within `lease_s` of its last step (its replica died) is given back by a later reservation on the
        same key; a settle that comes after all still replaces it by the actual amount, once, while the store keeps
        its record. Without it, a reservation counts until it is settled or the key expires. A store that dies with
        its process (memory) ignores it: nothing outlives the replica that reserved.
        """
        ...

    async def settle(self, key: str, reserved: float, actual: float, ttl_s: float | None,
                     op: str | None = None, leased: bool = False) -> float:
        """Replace an earlier reservation by the actual amount (total never below 0); the new total.

        `op`: the reservation's id (`reserve`), or a new one for a settle without a reservation: the settle is
        applied once per `op` (a repeat changes nothing and answers the total), and replaces what the store
        recorded under `op` (its steps that were applied although their answer was lost included), `reserved`
        when it recorded nothing (never applied, or its record expired). Settling an `op` whose reservation timed
        out to `reserved=0, actual=0` gives it back if it was applied, and stops it if it arrives later.
        `leased`: `reserved` was reserved under `op` with a lease (`reserve`'s `lease_s`: a budget's, whose answer
        came). A remote store keeps such a record as long as the key, so a record gone means the key no longer
        holds `reserved` either (the store lost its data, or the key expired): only `actual` is added, where
        `reserved` would take newer amounts off. A store that dies with its process ignores it.
        """
        ...

    async def reserve_window(self, key: str, amount: float, limit: float, window_s: float) -> WindowReservation:
        """`reserve` in a fixed window: the window opens at the first reservation and lasts `window_s`.

        Rate limits (requests and tokens per minute) need both the exact check-and-add and the time left in
        the window (for `Retry-After`) in one round trip. A later `settle` on the same key replaces the
        reservation by the actual amount (pass `window_s` as its `ttl_s`).
        """
        ...

    async def reserve_together(self, takes: Sequence[Take]) -> tuple[bool, list[Any]] | None:
        """Every reservation of `takes`, all or nothing, in one atomic step: (whether they were taken, each one's
        answer as its own operation gives it). When one that is `required` does not fit, none is taken (the
        answers then report the totals as they stand), so that no other caller ever counts what a refused request
        held for an instant (taken one by one, a request over its key's limit held its tenant's room until it gave
        it back, and the tenant refused others with room left). A `required=False` one that does not fit is left
        out alone. None: the backend cannot take these keys in one step (Redis Cluster: keys of different hash
        slots); the caller takes them one by one."""
        ...

    async def acquire_slot(self, key: str, holder: str, limit: int, lease_s: float) -> tuple[bool, int]:
        """Take one of `limit` slots for `holder` for at most `lease_s`; (whether taken, slots now held).

        Slots are leases, not counters: one held by a replica that crashed before `release_slot` expires
        after `lease_s` instead of leaking for ever. Expiry is by the store's clock (Redis's for Redis).
        """
        ...

    async def release_slot(self, key: str, holder: str) -> None:
        """Give back `holder`'s slot (nothing if it expired or was never taken)."""
        ...

    async def publish(self, channel: str, message: bytes) -> None: ...

    async def subscribe(self, channel: str) -> Channel:
        """Subscribe; once this returns, every message published afterwards reaches the channel (at most once)."""
        ...
