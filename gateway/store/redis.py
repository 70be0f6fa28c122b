"""The shared store on Redis (standalone, TLS, unix socket, Sentinel or Cluster; see `redis_url`).

Failure handling, the reason this module exists rather than plain redis-py calls:

* every operation runs under `asyncio.timeout(op_timeout_s)`; every redis (the cluster client's own errors too), OS
  and timeout error becomes `StoreUnavailable`, so no store call waits longer than that and none crashes;
* the first failure marks the store unhealthy; from then on operations fail fast (no network, no wait)
  while one background probe PINGs Redis after `backoff_min_s`, doubling up to `backoff_max_s`; the first
  answer (probe, `ping()`, or any operation still in flight) marks it healthy again, without a new store.
  A store that was up for less than `backoff_max_s` keeps the back-off it had (a flapping link is not probed
  ever faster), and the down/up log lines are rate-limited (`LOG_EVERY_S`), the probe's failures too;
* a Redis marked down by an outage reply (out of memory, read-only replica, ...) answers PING and reads all the
  while it refuses writes: only a write marks it up again (the probe and `ping()` SET a short-lived key under
  the prefix instead of PINGing; a read in flight does not count), or health flapped with every PING;
* an operation that finds every pooled connection busy (`max_connections` in use: this process is short of
  connections, see `redis_client`) fails alone and was not sent; Redis is not marked down;
* a command error from a live server (wrong type, bad argument) is also `StoreUnavailable` to the caller,
  but does not mark Redis down (one bad key must not stop every request); out-of-memory, read-only
  replica and cluster-down errors do;
* an operation that timed out may or may not have been applied (as with any remote call): its
  `StoreUnavailable` says so (`maybe_applied`, False when the operation surely was not: failing fast, or an
  error reply); callers treat it by their fail-open / fail-closed policy, and repeat a counter operation only
  under its operation id (`reserve` and `settle` with `op`: the script records it beside the counter, in the
  same hash slot, and applies it once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    DataError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)

from gateway.store import redis_scripts as lua
from gateway.store._common import QueueChannel, check_window, from_units, to_units, ttl_ms
from gateway.store.base import (
    OP_TTL_S,
    Channel,
    OnUnavailable,
    Reservation,
    StoreConfig,
    StoreRefused,
    StoreUnavailable,
    Take,
    WindowCount,
    WindowReservation,
)
from gateway.store.redis_client import ERRORS, Client, RedisHandle, open_client, warn_short_of_connections
from gateway.store.redis_pubsub import RedisChannel
from gateway.store.redis_url import parse_redis_url

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_OP_TTL_MS = round(OP_TTL_S * 1000)
_PAD = ("", "", "", "", "")  # `lua.RESERVE_TOGETHER`'s nine arguments per reservation, after those one uses
# Connections of the operations' pool a start opens (one PING each), at most `max_connections`: for the first
# operations after the runtime is swapped in. (Subscriptions have connections of their own: `redis_client`.)
WARM_CONNECTIONS = 8
_OUTAGE_REPLIES = (ClusterDownError, OutOfMemoryError, ReadOnlyError, TryAgainError)
# Error replies that redis-py has no class for and that say the server cannot serve anything now, not that this
# operation is wrong: another client's script running past its time limit, a replica without its master.
# A refusal of one operation by a Redis that answers drops what the operation carried (the ledger's refused
# counters): these must count as an outage instead, kept for the next flush.
_OUTAGE_CODES = ("BUSY ", "MASTERDOWN ", "NOREPLICAS ", "LOADING ")
# The cluster client's errors raised before anything is sent, for an operation no cluster can route (keys of
# several hash slots, no key): refusals of that operation, as a live server's error reply; any other of its own
# errors (no node reachable, a slot not covered, a topology refresh that failed) is an outage.
_MISROUTED = ("all keys must map to the same key slot", "No way to dispatch", "Invalid args in command")
PROBE_KEY = "store:probe"
"""The key (under the prefix) the probe SETs, `PROBE_TTL_MS` long, while Redis refuses writes: a PING says nothing."""
PROBE_TTL_MS = 10_000
LOG_EVERY_S = 10.0
"""At most one "unavailable" warning per this long: the next says how many outages it stood for. A probe that
still fails after it logs its cause (every `STILL_DOWN_EVERY_S` once its outage has been logged)."""
STILL_DOWN_EVERY_S = 60.0


class RedisStore:
    """`Store` on Redis; see `gateway.store.base.Store` for the contract and this module for failures."""

    def __init__(self, config: StoreConfig) -> None:
        if not config.url:
            raise ValueError("the redis store backend needs a url")
        self._config = config
        self._target = parse_redis_url(config.url)
        self._prefix = config.key_prefix
        self._cluster = self._target.mode == "cluster"
        self._handle: RedisHandle | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._healthy = False
        self._closed = False
        self._probe: asyncio.Task[None] | None = None
        self._channels: set[RedisChannel] = set()
        # Failure state, touched on the transitions only (never by an operation that succeeds while up).
        self._refusing = False  # down by an outage reply: only a write marks it up
        self._delay = config.backoff_min_s  # the probe's next wait
        self._up_since = -config.backoff_max_s
        self._last_error: BaseException | None = None
        self._warned_at = -LOG_EVERY_S  # the last "unavailable" warning (monotonic)
        self._down_logged = False  # the current outage was logged: its end is too
        self._unlogged = 0  # outages since the last warning that were not logged

    @property
    def on_unavailable(self) -> OnUnavailable:
        return self._config.on_unavailable

    @property
    def in_process(self) -> bool:
        return False

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def start(self) -> None:
        """Create the pool and open `WARM_CONNECTIONS` of it (a PING each, within `connect_timeout_s +
        op_timeout_s`): a connection's setup (TCP, CLIENT SETINFO, SELECT: several round trips) paid by a first
        operation under `op_timeout_s` overran it on a slow link, failing the first requests after a reload while
        Redis was fine. If Redis does not answer, run degraded and recover by itself."""
        if self._handle is not None:
            return
        self._closed = False
        self._handle = open_client(self._target, self._config)
        client = self._handle.client
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in ("COMPARE_AND_SET", "COMPARE_AND_DELETE", "INCR_WINDOW", "GET_WINDOW", "RESERVE", "SETTLE",
                         "RESERVE_WINDOW", "RESERVE_TOGETHER", "ACQUIRE_SLOT", "RELEASE_SLOT")
        }
        timeout_s = self._config.connect_timeout_s + self._config.op_timeout_s
        warm = min(WARM_CONNECTIONS, self._config.max_connections) - 1
        # Concurrent, so that each takes a connection of its own from the pool (and opens it).
        answered, *_ = await asyncio.gather(self._check(timeout_s), *(self._open_one(timeout_s) for _ in range(warm)))
        if not answered:
            self._warned_at, self._down_logged = time.monotonic(), True
            log.warning("store: redis did not answer at start (%s); serving without it until it does",
                        self._cause())

    async def aclose(self) -> None:
        self._closed = True
        for channel in tuple(self._channels):
            await channel.aclose()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError, *ERRORS):
                await self._probe
            self._probe = None
        handle, self._handle = self._handle, None
        self._healthy = False
        if handle is not None:
            with contextlib.suppress(*ERRORS):
                async with asyncio.timeout(self._config.connect_timeout_s):
                    await handle.aclose()

    async def ping(self) -> bool:
        """A real PING even while backing off (readiness checks want the truth), bounded by `op_timeout_s`; while
        Redis refuses writes, a write instead (`PROBE_KEY`)."""
        return await self._check(self._config.op_timeout_s)

    # -- keys ------------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value = await self._run(lambda c: c.get(self._prefix + key))
        return value.encode() if isinstance(value, str) else value  # str only with decode_responses, never set

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        full = [self._prefix + key for key in keys]
        # MGET; on a cluster, one per hash slot (keys of different slots cannot share a command)
        values: list[Any] = await self._run(
            lambda c: c.mget_nonatomic(full) if isinstance(c, RedisCluster) else c.mget(full))
        return [value.encode() if isinstance(value, str) else value for value in values]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        ttl = ttl_ms(ttl_s)
        await self._run(lambda c: c.set(self._prefix + key, value, px=ttl))

    async def delete(self, key: str) -> bool:
        removed: int = await self._run(lambda c: c.delete(self._prefix + key))
        return removed > 0

    async def compare_and_set(self, key: str, expected: bytes | None, new: bytes, ttl_s: float | None) -> bool:
        ttl = ttl_ms(ttl_s)
        args = ["0" if expected is None else "1", expected or b"", new, "" if ttl is None else ttl]
        written: int = await self._script("COMPARE_AND_SET", key, args)
        return written == 1

    async def compare_and_delete(self, key: str, expected: bytes) -> bool:
        removed: int = await self._script("COMPARE_AND_DELETE", key, [expected])
        return removed == 1

    # -- counters --------------------------------------------------------------------------------------

    async def incr_window(self, key: str, amount: int, window_s: float) -> WindowCount:
        window = check_window(amount, window_s)
        count, pttl = await self._script("INCR_WINDOW", key, [amount, window])
        return WindowCount(int(count), int(pttl) / 1000)

    async def get_window(self, key: str, window_s: float) -> WindowCount:
        window = check_window(0, window_s)
        count, pttl = await self._script("GET_WINDOW", key, [])
        return WindowCount(int(count), (int(pttl) if int(pttl) >= 0 else window) / 1000)

    async def reserve(self, key: str, amount: float, limit: float, ttl_s: float | None, op: str | None = None,
                      held: float = 0.0, lease_s: float | None = None) -> Reservation:
        units, cap, ttl = to_units(amount), to_units(limit, "limit"), ttl_ms(ttl_s)
        full = self._prefix + key
        record_keys, record_args = self._record(full, op, units, held, lease_s)
        ok, total = await self._script_keys("RESERVE", [full, *record_keys],
                                            [units, cap, "" if ttl is None else ttl, *record_args])
        return Reservation(int(ok) == 1, from_units(int(total)), limit)

    async def settle(self, key: str, reserved: float, actual: float, ttl_s: float | None,
                     op: str | None = None, leased: bool = False) -> float:
        actual_units, reserved_units = to_units(actual, "actual"), to_units(reserved, "reserved")
        ttl = ttl_ms(ttl_s)
        full = self._prefix + key
        keys = [full]
        args: list[Any] = [actual_units - reserved_units, "" if ttl is None else ttl]
        if op and (head := self._head(full)) is not None:  # (its lease dropped, if it had one)
            keys += [head + op, head + lua.LEASES]
            args += [_OP_TTL_MS, actual_units, reserved_units, op, "1" if leased else "0"]
        total = await self._script_keys("SETTLE", keys, args)
        return from_units(int(total))

    def _record(self, full: str, op: str | None, units: int, held: float, lease_s: float | None
                ) -> tuple[list[str], list[Any]]:
        """A budget reservation's operation record and, with a lease, its counter's leases: the keys and the script
        arguments they add after counter `full`'s (`RESERVE`'s, and a budget's in `RESERVE_TOGETHER`); none without
        an op, or for a key no record can share a slot with."""
        if not op or (head := self._head(full)) is None:
            return [], []
        keys = [head + op]
        args: list[Any] = [self._record_ms(lease_s), to_units(held, "held") + units]
        if lease_s is not None:
            keys.append(head + lua.LEASES)
            args += [ttl_ms(lease_s), head]
        return keys, args

    def _head(self, full: str) -> str | None:
        """The name of counter `full`'s operation records but their op id (a record is `head + op`; its leases
        `head + lua.LEASES`), in the counter's hash slot (`lua.op_key`). None for a key no record can share a slot
        with on a cluster: it goes without records (repeats are then not recognised) and leases."""
        head = lua.op_key(full, "", self._prefix)
        if head is None and not self._cluster:
            return f"{full}:op:"  # one server: any key is in its slot
        return head

    @staticmethod
    def _record_ms(lease_s: float | None) -> int:
        """An unsettled record's ttl_ms: `OP_TTL_S`, and with a lease the lease plus that margin (a sweep must find
        the record of a reservation whose lease ran out; the script keeps it as long as its counter too); a settle
        gives it back `OP_TTL_S`."""
        lease = ttl_ms(lease_s)
        return _OP_TTL_MS if lease is None else _OP_TTL_MS + lease

    async def reserve_window(self, key: str, amount: float, limit: float, window_s: float) -> WindowReservation:
        units, cap, window = to_units(amount), to_units(limit, "limit"), ttl_ms(window_s)
        ok, total, pttl = await self._script("RESERVE_WINDOW", key, [units, cap, window])
        return WindowReservation(int(ok) == 1, from_units(int(total)), limit, int(pttl) / 1000)

    async def reserve_together(self, takes: Sequence[Take]) -> tuple[bool, list[Any]] | None:
        """One script over every key (`lua.RESERVE_TOGETHER`); None on a cluster, whose keys of different hash
        slots no script can take together."""
        if self._cluster:
            return None
        keys: list[str] = []
        args: list[Any] = [len(takes)]
        for what, given, required in takes:
            if what == "acquire_slot":
                key, holder, limit, lease_s = given
                if limit < 1:
                    raise ValueError(f"limit must be at least 1, not {limit!r}")
                keys.append(self._prefix + key)
                args += ["slot", holder, limit, ttl_ms(lease_s), *_PAD]
            elif what == "reserve_window":
                key, amount, limit, window_s = given
                keys.append(self._prefix + key)
                args += ["window", to_units(amount), to_units(limit, "limit"), ttl_ms(window_s), *_PAD]
            else:  # `reserve`'s arguments: key, amount, limit, ttl_s[, op[, held[, lease_s]]]
                key, amount, limit, ttl_s, *more = given
                units, ttl = to_units(amount), ttl_ms(ttl_s)
                full = self._prefix + key
                record_keys, record_args = self._record(full, more[0] if more else None, units,
                                                        more[1] if len(more) > 1 else 0.0,
                                                        more[2] if len(more) > 2 else None)
                keys += [full, *record_keys]
                args += ["budget", units, to_units(limit, "limit"), "" if ttl is None else ttl, int(required),
                         *record_args, *_PAD[:4 - len(record_args)]]
        taken, *answers = await self._script_keys("RESERVE_TOGETHER", keys, args)
        results: list[Any] = []
        for (what, given, _), answer in zip(takes, answers, strict=True):
            ok = int(answer[0]) == 1
            if what == "acquire_slot":
                results.append((ok, int(answer[1])))
            elif what == "reserve_window":
                results.append(WindowReservation(ok, from_units(int(answer[1])), given[2], int(answer[2]) / 1000))
            else:
                results.append(Reservation(ok, from_units(int(answer[1])), given[2]))
        return int(taken) == 1, results

    async def acquire_slot(self, key: str, holder: str, limit: int, lease_s: float) -> tuple[bool, int]:
        lease = ttl_ms(lease_s)
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit!r}")
        ok, held = await self._script("ACQUIRE_SLOT", key, [holder, limit, lease])
        return int(ok) == 1, int(held)

    async def release_slot(self, key: str, holder: str) -> None:
        await self._script("RELEASE_SLOT", key, [holder])

    # -- pub/sub ---------------------------------------------------------------------------------------

    async def publish(self, channel: str, message: bytes) -> None:
        await self._run(lambda c: c.publish(self._prefix + channel, message))

    async def subscribe(self, channel: str) -> Channel:
        """Subscribe now when Redis is up (publishes after this returns are seen); else keep trying in the back."""
        if self._handle is None:
            raise StoreUnavailable("the store is not started", maybe_applied=False)
        subscriber = RedisChannel(channel, self._prefix + channel, self._handle.subscriber, self._config, self._forget)
        self._channels.add(subscriber)
        await subscriber.open(try_now=self._healthy)
        return subscriber

    async def _forget(self, channel: QueueChannel) -> None:
        self._channels.discard(channel)

    # -- failure handling ------------------------------------------------------------------------------

    async def _script(self, name: str, key: str, args: list[Any]) -> Any:
        return await self._script_keys(name, [self._prefix + key], args)

    async def _script_keys(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            raise StoreUnavailable("the store is not started", maybe_applied=False)
        return await self._run(lambda c: script(keys=keys, args=args))

    async def _run(self, op: Callable[[Client], Awaitable[T]]) -> T:
        handle = self._handle
        if handle is None:
            raise StoreUnavailable("the store is not started", maybe_applied=False)
        if not self._healthy:
            raise StoreUnavailable("redis is unavailable (failing fast; reconnecting in the background)",
                                   maybe_applied=False)
        try:
            async with asyncio.timeout(self._config.op_timeout_s):
                result = await op(handle.client)
        except MaxConnectionsError as exc:  # (a `RedisError`: first) no connection free, nothing sent: Redis is fine
            warn_short_of_connections(exc)
            raise StoreUnavailable(f"no free redis connection: {exc}", maybe_applied=False) from exc
        except ERRORS as exc:
            replied = isinstance(exc, (ResponseError, DataError))  # an error reply (or refused before it was sent)
            if (replied and not _outage_reply(exc)) or _misrouted(exc):
                raise StoreRefused(f"redis rejected the operation: {exc}") from exc  # alive
            self._mark_down(exc, refusing=replied)
            raise StoreUnavailable(f"redis unavailable: {_describe(exc)}", maybe_applied=not replied) from exc
        self._mark_up()
        return result

    async def _check(self, timeout_s: float) -> bool:
        handle = self._handle
        if handle is None:
            return False
        refusing = self._refusing
        try:
            async with asyncio.timeout(timeout_s):
                if refusing:
                    await handle.client.set(self._prefix + PROBE_KEY, b"1", px=PROBE_TTL_MS)
                else:
                    await handle.client.ping()
        except MaxConnectionsError:  # every pooled connection busy: says nothing of Redis, nothing changes
            return self._healthy
        except ERRORS as exc:
            # the probe's write refused for its own sake (an ACL, say) by a Redis not short of anything: it writes
            if not (refusing and isinstance(exc, ResponseError) and not _outage_reply(exc)):
                self._mark_down(exc, refusing=isinstance(exc, ResponseError))
                return False
        self._mark_up(wrote=refusing)
        return True

    async def _open_one(self, timeout_s: float) -> None:
        """One more pooled connection opened (by a PING); a failure here changes nothing (`_check`'s PING, beside
        it, says whether Redis answers): that connection is opened on first use instead."""
        handle = self._handle
        if handle is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await handle.client.ping()
        except ERRORS as exc:
            log.debug("store: a connection opened at start did not answer (%s)", _describe(exc))

    def _mark_up(self, wrote: bool = False) -> None:
        """Healthy again; after an outage reply, only on a write (`wrote`): a Redis refusing writes still answers
        reads and PING. The usual caller, an operation that succeeded while healthy, stops at the first test."""
        if not self._healthy and not self._closed and (wrote or not self._refusing):
            self._refusing = False
            self._healthy = True
            self._up_since = time.monotonic()
            if self._down_logged:  # (an outage whose warning was held back ends quietly too)
                log.info("store: redis is answering again")
            self._down_logged = False

    def _mark_down(self, exc: BaseException, refusing: bool = False) -> None:
        if self._closed:
            return
        self._last_error = exc
        self._refusing = self._refusing or refusing
        if self._healthy:
            self._healthy = False
            now = time.monotonic()
            if now - self._up_since >= self._config.backoff_max_s:  # a flap keeps the back-off it had
                self._delay = self._config.backoff_min_s
            if now - self._warned_at >= LOG_EVERY_S:
                more = f"; {self._unlogged} more outage(s) since the last warning" if self._unlogged else ""
                log.warning("store: redis unavailable (%s); failing fast and probing%s", _describe(exc), more)
                self._warned_at, self._down_logged, self._unlogged = now, True, 0
            else:
                self._unlogged += 1
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._recover(), name="redis-store-probe")

    async def _recover(self) -> None:
        """Probe until Redis answers; no error ends it (it alone brings a store marked down back)."""
        while not self._healthy and not self._closed:
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self._config.backoff_max_s)
            try:
                if await self._check(self._config.connect_timeout_s + self._config.op_timeout_s):
                    return
            except Exception as exc:  # a bug or an error redis-py added: the probe must go on
                self._last_error = exc
                log.error("store: the redis probe failed unexpectedly; probing on", exc_info=True)
            now = time.monotonic()
            if now - self._warned_at >= (STILL_DOWN_EVERY_S if self._down_logged else LOG_EVERY_S):
                log.warning("store: redis still unavailable (%s); probing again in %.3g s",
                            self._cause(), self._delay)
                self._warned_at, self._down_logged, self._unlogged = now, True, 0

    def _cause(self) -> str:
        return _describe(self._last_error) if self._last_error is not None else "no answer"


def _outage_reply(exc: BaseException) -> bool:
    """An error reply that says the server cannot serve now (or cannot write), not that the operation is wrong."""
    return isinstance(exc, _OUTAGE_REPLIES) or str(exc).startswith(_OUTAGE_CODES)


def _misrouted(exc: BaseException) -> bool:
    return isinstance(exc, RedisClusterException) and any(text in str(exc) for text in _MISROUTED)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
