"""Circuit breakers, one per target (`provider/model`), kept locally and shared through the `Store`.

Why local first: a request must never wait on shared state to learn whether a target
is up, and a Redis outage must never fail or slow a request. So every decision reads
this process's state, and sharing happens beside the requests: when a breaker opens
(or closes after a probe), the change is written to the store with the cooldown as
its TTL and published; every replica applies published changes at once and re-reads
the open breakers every `sync_interval_s` (messages are at most once). Store errors
are logged and ignored: the local breaker keeps working on its own.

States: closed (traffic flows; consecutive failures and a per-window failure ratio
are counted) -> open (skipped for `cooldown_s`) -> half-open (exactly one request of
this process probes it) -> closed on success, open again on failure. An attempt that began
before it opened changes nothing when it ends within the cooldown: its failure does not put the probe
off (the cooldown runs from the opening), its success does not close it (on this replica, nor, through
the shared close, on the others). Within the cooldown only the forced try of an alias whose targets are all
open, or an active health check sent after the opening, closes it (a check is an attempt too: one sent before
the opening is no news of a recovery, `checked`). A retry of a target asks `allow` again, so that no
retry follows a failure that opened the breaker, nor runs beside another request's probe.

A stream is judged by its whole stream (`opened`, then `ended`): its opening closes a
breaker that is not closed (a probe's verdict cannot wait for a stream of minutes while
every other request is refused), and for a closed one its verdict waits for its end,
counted once, the consecutive failures left as they were until then. A stream may outlive
a reload: its verdict then counts on the state of the policy in force (the same `_State`
object when its target stayed), is shared through that policy's store, and is dropped
when its target left the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar

from ..policy.schema import BreakerSpec
from ..store.base import Store, StoreUnavailable
from ..store.redis_pubsub import cancel_and_wait, raise_if_cancelling

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breakers"]

log = logging.getLogger("gateway.routing")
CLOSED, HALF_OPEN, OPEN = 0, 1, 2  # also the values of the `gateway_breaker_state` gauge
CHANNEL = "routing:breakers"
_KEY = "breaker:"


class _State:
    __slots__ = ("consecutive", "last_failure", "open_until", "openings", "probing", "state", "window_failures",
                 "window_requests", "window_start")

    def __init__(self, now: float) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.window_start = now
        self.window_requests = 0
        self.window_failures = 0
        self.open_until = 0.0
        self.last_failure = 0.0
        self.probing = False
        self.openings = 0  # how many times it opened (here or, as learnt, on another replica): a check's mark


# The breaker that last admitted an attempt of the current request (each request runs in its own task, so
# its own context; its attempts run one after another). `allow` admits attempts only while a breaker is
# closed or as its probe, so an answer that finds its breaker open within the cooldown with this mark on
# it began before the opening: stale. The forced try (`least_recently_failed`) carries no mark: it closes the
# breaker as an answer should. The health check, which `allow` does not admit, is marked by the openings so far
# (`check_began`, `checked`).
_ADMITTED: ContextVar[_State | None] = ContextVar("breaker_admitted", default=None)


class Breakers:
    """The breakers of one runtime's targets. `on_change(target, state)` reports transitions (metrics)."""

    def __init__(
        self, spec: BreakerSpec, targets: Iterable[str], store: Store | None,
        on_change: Callable[[str, int], None] = lambda target, state: None,
        clock: Callable[[], float] = time.monotonic, previous: Breakers | None = None,
    ) -> None:
        self.spec = spec
        self._clock = clock
        now = clock()
        kept: dict[str, _State] = previous._states if previous is not None else {}
        self._states: dict[str, _State] = {name: kept.get(name) or _State(now) for name in targets}
        self._store = store
        self._on_change = on_change
        self._tasks: set[asyncio.Task[None]] = set()
        # The reloads: the breakers this runtime's replace, until it starts (`start`), and those that replaced
        # them once they did (`_next`): a stream that outlives its runtime is judged by the policy in force.
        self._previous = previous
        self._next: Breakers | None = None
        self._closed = False

    def start(self) -> None:
        """This runtime's breakers take over from those of the runtime it replaces (a reload's, once it starts:
        one that fails to build never does, one that fails to start is closed at once)."""
        if self._previous is not None:
            self._previous._next = self
            self._previous = None  # (no chain back to every runtime there was)

    def state(self, target: str) -> int:
        entry = self._states[target]
        if entry.state == OPEN and self._clock() >= entry.open_until:
            return HALF_OPEN
        return entry.state

    # -- decisions (synchronous: never wait on the store) -----------------------------------------

    def allow(self, target: str) -> bool:
        """Whether to send a request to `target` now. In half-open, True once (the probe) until it reports."""
        if not self.spec.enabled:
            return True
        entry = self._states[target]
        if entry.state == CLOSED:
            _ADMITTED.set(entry)
            return True
        if entry.state == OPEN:
            if self._clock() < entry.open_until:
                return False
            self._set(target, entry, HALF_OPEN)
        if entry.probing:
            return False
        entry.probing = True
        _ADMITTED.set(entry)
        return True

    def release(self, target: str) -> None:
        """A probe that ended without a verdict (the client left): let the next request probe."""
        self._states[target].probing = False

    def least_recently_failed(self, targets: Iterable[str]) -> str:
        """The target to try anyway when every one is open (the router's forced try, which follows at once in
        this request): the current request's mark is lifted, so that the forced try's answer closes the breaker."""
        _ADMITTED.set(None)
        return min(targets, key=lambda name: self._states[name].last_failure)

    def retry_in(self, targets: Iterable[str]) -> float:
        """Seconds until the first of `targets` may be probed."""
        now = self._clock()
        return max(0.0, min(self._states[name].open_until - now for name in targets))

    # -- outcomes ---------------------------------------------------------------------------------

    def success(self, target: str) -> None:
        entry = self._states[target]
        entry.consecutive = 0
        self._count(entry, failed=False)
        if entry.state != CLOSED and not self._stale(entry):
            entry.probing = False
            self._set(target, entry, CLOSED)
            self._share(target, None)

    def check_began(self, target: str) -> int:
        """The mark of a health check of `target` about to be sent, for `checked`: its breaker's openings so far."""
        return self._states[target].openings

    def checked(self, target: str, began: int) -> None:
        """A health check's success (`began`: its `check_began`): `success`, but one sent before an opening that is
        still within its cooldown leaves the breaker open, as an attempt's does (`_stale`): it was sent while the
        target still looked up (or before the probe that failed), and says nothing of a recovery since."""
        entry = self._states[target]
        entry.consecutive = 0
        self._count(entry, failed=False)
        stale = entry.openings != began and entry.state == OPEN and self._clock() < entry.open_until
        if entry.state != CLOSED and not stale:  # (not `success`: its mark is of the requests `allow` admitted)
            entry.probing = False
            self._set(target, entry, CLOSED)
            self._share(target, None)

    def _stale(self, entry: _State) -> bool:
        """Whether an answer of this request's attempt comes from before the opening of `entry`'s breaker, which is
        still within its cooldown: then it leaves the breaker open, as a failure from before leaves it (and the
        probe is not put off either). Past the cooldown any answer closes it, as any failure opens it again."""
        return entry.state == OPEN and _ADMITTED.get() is entry and self._clock() < entry.open_until

    def failure(self, target: str) -> None:
        entry = self._states[target]
        now = self._clock()
        entry.consecutive += 1
        entry.last_failure = now
        self._count(entry, failed=True)
        if not self.spec.enabled:
            return
        if entry.state != CLOSED:
            self._failed_while_open(target, entry, now)
            return
        spec = self.spec
        tripped = entry.consecutive >= spec.failures or (
            entry.window_requests >= spec.min_requests
            and entry.window_failures >= spec.failure_ratio * entry.window_requests
        )
        if tripped:
            self._open(target, entry, now, spec.cooldown_s)

    def _failed_while_open(self, target: str, entry: _State, now: float) -> None:
        """A failure once the breaker is not closed. Half-open (a failed probe), or open past its cooldown with
        no probe taken yet: open again, once, for a fresh cooldown. Open within its cooldown (an attempt that
        began before it opened, or the forced try of an alias whose targets are all open): nothing more, or each
        such failure would put the probe off by another cooldown and log the opening again."""
        if entry.state == OPEN and now < entry.open_until:
            return
        entry.probing = False
        self._open(target, entry, now, self.spec.cooldown_s)

    # -- streams: judged by the whole stream --------------------------------------------------------------

    def opened(self, target: str) -> None:
        """A stream of `target` answered; its verdict waits for its end (`ended`), and until then it neither counts
        nor resets the consecutive failures. A breaker that is not closed (the stream is its probe, or the forced try
        of an alias whose targets are all open) closes now, as for any answer: every other request is refused while
        a probe runs, and a stream may run for minutes. A stream that began before the breaker opened closes
        nothing within the cooldown (`_stale`), and its verdict is dropped (`ended`)."""
        entry = self._states[target]
        if entry.state != CLOSED and not self._stale(entry):
            entry.probing = False
            self._set(target, entry, CLOSED)
            self._share(target, None)

    def ended(self, target: str, failed: bool) -> None:
        """The verdict of a stream of `target` that answered (`opened`): a success or a failure of the closed
        breaker, counted once. Dropped when the breaker is no longer closed (it opened while the stream ran: what
        opened it and its probe decide it now, not a stream from before), and when a reload took `target` out of
        the policy (its breaker is gone: a state and a gauge left behind would say it is open for good)."""
        entry = self._states[target]
        if entry.state != CLOSED or (self._next is not None and self._newest()._states.get(target) is not entry):
            return  # (replaced by a reload: `entry` is in force only if the policy in force kept it)
        if failed:
            self.failure(target)
        else:
            self.success(target)

    def _newest(self) -> Breakers:
        """The breakers of the policy in force: these, or those that replaced them since (`start`). A successor
        closed without one of its own failed to start: the policy it was built for never came into force."""
        newest = self
        while (following := newest._next) is not None and (not following._closed or following._next is not None):
            newest = following
        return newest

    def _count(self, entry: _State, failed: bool) -> None:
        now = self._clock()
        if now - entry.window_start >= self.spec.window_s:
            entry.window_start, entry.window_requests, entry.window_failures = now, 0, 0
        entry.window_requests += 1
        entry.window_failures += failed

    def _open(self, target: str, entry: _State, now: float, seconds: float) -> None:
        entry.open_until = now + seconds
        entry.openings += 1
        entry.consecutive = 0
        entry.window_start, entry.window_requests, entry.window_failures = now, 0, 0
        self._set(target, entry, OPEN)
        log.warning("circuit breaker opened", extra={"fields": {"target": target, "cooldown_s": seconds}})
        self._share(target, seconds)

    def _set(self, target: str, entry: _State, state: int) -> None:
        if entry.state != state:
            entry.state = state
            self._on_change(target, state)

    # -- sharing through the store ------------------------------------------------------------------

    def _share(self, target: str, open_for: float | None) -> None:
        """Write a change in a task beside the request, through the store of the policy in force (`_newest`): a
        stream that outlives a reload ends after its own runtime's store and tasks may be closed."""
        sharing = self._newest()
        if sharing._store is None:
            return
        task = asyncio.get_running_loop().create_task(sharing._write(target, open_for))
        sharing._tasks.add(task)
        task.add_done_callback(sharing._tasks.discard)

    async def _write(self, target: str, open_for: float | None) -> None:
        assert self._store is not None
        try:
            if open_for is None:
                await self._store.delete(_KEY + target)
                await self._store.publish(CHANNEL, b"close " + target.encode())
            else:
                until = b"%.3f" % (time.time() + open_for)
                await self._store.set(_KEY + target, until, ttl_s=open_for)
                await self._store.publish(CHANNEL, b"open " + until + b" " + target.encode())
        except StoreUnavailable as exc:
            log.info("breaker state not shared (store unavailable: %s); kept locally", exc)
        except Exception:  # sharing is best effort: a bug here must not end up in a request
            log.exception("breaker state not shared")

    def apply(self, message: bytes) -> None:
        """Apply another replica's change: `open <until> <target>` or `close <target>`."""
        verb, _, rest = message.decode("utf-8", "replace").partition(" ")
        if verb == "open":
            until, _, target = rest.partition(" ")
            try:
                self._remote_open(target, float(until))
            except ValueError:
                return
        elif verb == "close":
            entry = self._states.get(rest)
            if entry is not None and entry.state != CLOSED:
                entry.probing = False
                entry.consecutive = 0
                self._set(rest, entry, CLOSED)

    def _remote_open(self, target: str, until_wall: float) -> None:
        entry = self._states.get(target)
        remaining = until_wall - time.time()
        if entry is None or remaining <= 0:
            return
        now = self._clock()
        if entry.state == OPEN and entry.open_until >= now + remaining - 0.05:
            return  # already open as long (our own message, or an older one)
        entry.open_until = now + remaining
        entry.openings += 1
        entry.last_failure = max(entry.last_failure, now)
        entry.probing = False
        self._set(target, entry, OPEN)

    async def sync_forever(self) -> None:
        """Replicas: follow published changes, and re-read open breakers now and then."""
        assert self._store is not None
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            while True:
                try:
                    await self._read_all()
                except Exception:  # keep syncing whatever one round did
                    log.exception("reading shared breaker state failed")
                raise_if_cancelling()  # (redis-py can return from a cancelled read: see `store.redis_pubsub`)
                await asyncio.sleep(self.spec.sync_interval_s)
        finally:
            await cancel_and_wait(listener, "breaker state listener")  # bounded: a shutdown waits on this

    async def _read_all(self) -> None:
        assert self._store is not None
        for target in self._states:
            try:
                value = await self._store.get(_KEY + target)
            except StoreUnavailable:
                return
            if value is not None:
                with contextlib.suppress(ValueError):
                    self._remote_open(target, float(value))

    async def _listen(self) -> None:
        assert self._store is not None
        while True:
            try:
                async with await self._store.subscribe(CHANNEL) as channel:
                    async for message in channel:
                        self.apply(message)
            except StoreUnavailable:
                pass
            except Exception:  # the poll in `sync_forever` still covers what the channel misses
                log.exception("listening for breaker changes failed")
            await asyncio.sleep(self.spec.sync_interval_s)  # the subscription ended (store closing): retry

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
