"""Keys created at run time, looked up on the hot path: a bounded local cache in front of the `Store`.

Only a key the policy's own key ring does not know reaches this module, and only when the policy
turns run-time keys on (`dynamic_keys.enabled`); otherwise nothing here exists and authentication
costs what it always did. For a key it does reach:

* a found key is remembered for `cache_ttl_s`, an unknown one for `negative_ttl_s`; both caches
  are bounded (found keys: the least recently used dropped first; unknown ones: the one looked up in
  the store longest ago, a hit does not reorder it);
* a revocation or rotation is published on the store's `keys:changes` channel; every replica's
  listener drops that key from its cache when the message arrives, so the key stops working
  everywhere at once. Pub/sub is at most once: a replica that misses a message (Redis restarting,
  a network cut) keeps trusting its cached entry until `cache_ttl_s` runs out and then asks the
  store again; if the store cannot answer then, `on_unavailable` decides (below): with `open`, the
  cached entry, revoked or not, keeps working until the store answers again;
* a credential that does not have the shape of a generated key is refused without a store call,
  concurrent look-ups of one digest share one store call (single flight), and at most
  `max_lookups` store look-ups run at once per process, so a flood of invalid keys cannot turn
  into unbounded store traffic;
* when the store cannot answer (`StoreUnavailable`), `on_unavailable` decides. open: a key this
  process has seen keeps working (even past `cache_ttl_s`, until the store answers again), an
  unseen one gets 503, not 401 (its owner must not conclude that the key is wrong); closed: any
  key not freshly cached gets 503. Never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import AuthenticationFailed, KeysUnavailable
from ..store.base import OnUnavailable, Store, StoreUnavailable
from ..store.redis_pubsub import cancel_and_wait
from .keys import VirtualKey, digest_of
from .records import (
    CHANNEL,
    CorruptRecord,
    KeyRecord,
    decode_stored,
    digest_key,
    is_key_id,
    looks_like_key,
    record_key,
    virtual_key,
)

if TYPE_CHECKING:
    from ..policy.compiled import Policy
    from ..policy.keys_schema import DynamicKeysSpec
    from ..telemetry.metrics import Metrics

__all__ = ["DynamicKeys", "find_key"]

log = logging.getLogger("gateway.keys")
_RESUBSCRIBE_S = 1.0
_SUBSCRIBED_WITHIN_S = 2.0  # how long `start` waits for its subscription (a store that is down answers at once)


async def find_key(policy: Policy, credential: str | None, dynamic: DynamicKeys) -> VirtualKey:
    """`pipeline.stages.authenticate` for a policy with run-time keys: the policy's ring first."""
    if not credential:
        raise AuthenticationFailed("missing API key: send it as `Authorization: Bearer <key>`", code="missing_api_key")
    digest = digest_of(credential)
    key = policy.keys.find_digest(digest)
    if key is None:
        key = await dynamic.find(digest, credential)
        if key is None:
            raise AuthenticationFailed("invalid API key")
    return key


@dataclass(slots=True)
class _Found:
    key: VirtualKey
    fresh_until: float  # on the monotonic clock


class DynamicKeys:
    """One runtime's view of the run-time keys (a runtime `Service`: its listener starts and stops with it)."""

    def __init__(
        self, spec: DynamicKeysSpec, store: Store, static_names: frozenset[str], on_unavailable: OnUnavailable,
        metrics: Metrics | None = None, *, clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.spec = spec
        self.store = store
        self.static_names = static_names
        self.on_unavailable = on_unavailable
        self._clock = clock
        self._wall = wall
        self._found: OrderedDict[bytes, _Found] = OrderedDict()
        self._unknown: OrderedDict[bytes, float] = OrderedDict()  # digest -> until (monotonic)
        self._inflight: dict[bytes, asyncio.Task[VirtualKey | None]] = {}
        self._gate = asyncio.Semaphore(spec.max_lookups)
        self._epoch = 0  # bumped by every invalidation: a look-up that overlapped one is not cached
        self._listener: asyncio.Task[None] | None = None
        self._successor: DynamicKeys | None = None  # the next runtime's, once it adopted this one's keys
        # Told of every key forgotten (its id): the accounting stage's, which drops the key's budget gauges.
        self.on_forget: Callable[[str], None] | None = None
        self.store_lookups = 0  # store look-ups made (tests and the lead's check that static keys cost none)
        self._count = _Counters(metrics)

    # -- the hot path ---------------------------------------------------------------------------------

    async def find(self, digest: bytes, credential: str) -> VirtualKey | None:
        """The key `digest` opens, or None (unknown, revoked, expired); `KeysUnavailable` (503) when the
        store cannot say and `on_unavailable` does not let a cached key through."""
        now = self._clock()
        hit = self._found.get(digest)
        if hit is not None:
            if now < hit.fresh_until:
                self._found.move_to_end(digest)
                self._count.cached()
                return self._unexpired(hit.key)
        elif not looks_like_key(credential):
            self._count.malformed()
            return None
        until = self._unknown.get(digest)
        if until is not None and now < until:
            self._count.cached_unknown()
            return None
        try:
            key = await self._lookup(digest)
        except StoreUnavailable:
            if hit is not None and self.on_unavailable == "open":
                self._count.stale()
                return self._unexpired(hit.key)
            self._count.unavailable()
            raise KeysUnavailable("the key store cannot be reached to check this key; retry shortly",
                                  headers={"Retry-After": "1"}) from None
        return None if key is None else self._unexpired(key)

    def _unexpired(self, key: VirtualKey) -> VirtualKey | None:
        return None if key.expires_at is not None and self._wall() >= key.expires_at else key

    async def _lookup(self, digest: bytes) -> VirtualKey | None:
        """One store look-up per digest at a time; a waiter that leaves does not cancel it for the others."""
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda done: self._settled(digest, done))
        return await asyncio.shield(task)

    def _settled(self, digest: bytes, task: asyncio.Task[VirtualKey | None]) -> None:
        if self._inflight.get(digest) is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved here, so that nobody waiting is not an "unretrieved" warning

    async def _fetch(self, digest: bytes) -> VirtualKey | None:
        epoch = self._epoch
        async with self._gate:
            self.store_lookups += 1
            pointer = await self.store.get(digest_key(digest.hex()))
            key_id = pointer.decode("ascii", "replace") if pointer is not None else None
            raw = await self.store.get(record_key(key_id)) if key_id is not None and is_key_id(key_id) else None
        key = None
        if raw is not None:
            try:
                stored = decode_stored(raw)  # a revocation's marker opens nothing
                if isinstance(stored, KeyRecord):
                    key = virtual_key(stored, digest, self._wall(), self.static_names)
            except CorruptRecord as exc:
                log.warning("unreadable key record %s: %s", key_id, exc)
        if epoch == self._epoch:  # nothing was revoked or rotated while we asked: safe to remember
            self._remember(digest, key)
        if key is None:
            self._count.unknown()
        else:
            self._count.found()
        return key

    def _remember(self, digest: bytes, key: VirtualKey | None) -> None:
        now = self._clock()
        if key is None:
            self._found.pop(digest, None)
            self._unknown[digest] = now + self.spec.negative_ttl_s
            self._unknown.move_to_end(digest)
            while len(self._unknown) > self.spec.cache_size:
                self._unknown.popitem(last=False)
            return
        self._unknown.pop(digest, None)
        self._found[digest] = _Found(key, now + self.spec.cache_ttl_s)
        self._found.move_to_end(digest)
        while len(self._found) > self.spec.cache_size:
            self._found.popitem(last=False)

    def adopt(self, previous: DynamicKeys) -> None:
        """After a reload: keep the keys the previous runtime had found (with their freshness), so that a
        store outage right after a reload does not refuse keys this process had seen. A key whose name a
        policy key now takes is dropped (looked up again, it goes by its id). From now on every key `previous`
        forgets (a revocation its runtime's admin call or listener hears of) is forgotten here too: the new runtime
        may only serve once this one listens (`start`), and a revocation that comes before must not leave it an
        entry it copied."""
        previous._successor = self
        for digest, found in previous._found.items():
            if found.key.name not in self.static_names:
                self._found[digest] = found
        while len(self._found) > self.spec.cache_size:
            self._found.popitem(last=False)

    # -- invalidation ----------------------------------------------------------------------------------

    def forget(self, key_id: str) -> None:
        """Drop every cached secret of this key (its current one and one in a grace period), here and in the runtime
        that adopted this one's keys (`adopt`)."""
        self._epoch += 1
        for digest in [d for d, found in self._found.items() if found.key.key_id == key_id]:
            del self._found[digest]
        if self.on_forget is not None:
            try:
                self.on_forget(key_id)
            except Exception:  # a bug: logged, the key is forgotten all the same
                log.exception("a key's forget hook failed")
        if self._successor is not None:
            self._successor.forget(key_id)

    async def start(self) -> None:
        """The listener started, and (for at most `_SUBSCRIBED_WITHIN_S`) subscribed: a runtime starts before it
        serves, and its predecessor's listener, which passes revocations on (`adopt`), may stop once it serves."""
        if self._listener is None:
            subscribed = asyncio.Event()
            self._listener = asyncio.get_running_loop().create_task(self._listen(subscribed),
                                                                    name="dynamic-keys-listener")
            waiting = asyncio.ensure_future(subscribed.wait())
            try:
                await asyncio.wait([waiting, self._listener], timeout=_SUBSCRIBED_WITHIN_S,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()

    async def aclose(self) -> None:
        if self._listener is not None:  # bounded: a shutdown, or a reload under its lock, waits on this
            await cancel_and_wait(self._listener, "dynamic keys listener")
            self._listener = None
        for task in list(self._inflight.values()):
            task.cancel()

    async def _listen(self, subscribed: asyncio.Event) -> None:
        while True:
            try:
                async with await self.store.subscribe(CHANNEL) as channel:
                    subscribed.set()
                    async for message in channel:
                        self.forget(message.decode("ascii", "replace"))
            except StoreUnavailable:
                subscribed.set()  # (no store to wait for: it keeps trying below)
            except Exception:  # the cache TTL still bounds what a lost message costs
                log.exception("listening for key revocations failed")
            await asyncio.sleep(_RESUBSCRIBE_S)  # the subscription ended (store closing or failing): again

    def __len__(self) -> int:
        return len(self._found)


class _Counters:
    """`gateway_key_lookups_total{result}`, children bound once (results are a closed set, no key ids)."""

    __slots__ = ("cached", "cached_unknown", "found", "malformed", "stale", "unavailable", "unknown")

    def __init__(self, metrics: Metrics | None) -> None:
        for result in self.__slots__:
            child = metrics.key_lookups.labels(result) if metrics is not None else None
            setattr(self, result, child.inc if child is not None else _nothing)

    cached: Callable[[], None]
    cached_unknown: Callable[[], None]
    found: Callable[[], None]
    malformed: Callable[[], None]
    stale: Callable[[], None]
    unavailable: Callable[[], None]
    unknown: Callable[[], None]


def _nothing() -> None:
    return None
