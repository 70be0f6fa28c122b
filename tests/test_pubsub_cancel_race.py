"""A cancel that redis-py swallows must not hang a shutdown (B40).

On Python 3.11 redis-py writes a command under `asyncio.wait_for`, which returns the write's result when a cancel
lands as the write completes: `PubSub.subscribe` then returns normally in a task being cancelled, and the cancel is
gone. The breaker's and the dynamic keys' listeners went on to wait on their channel for good, and `gateway serve`
hung at shutdown on them (it cancels once, then waits). `Swallow` reproduces that deterministically: the patched
redis-py call completes, then parks until the cancel arrives, and drops it, as `wait_for` does. The last test is
the race itself, unpatched: cancels at small random delays after `subscribe()` is called.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection

from gateway.auth.dynamic import DynamicKeys
from gateway.policy.keys_schema import DynamicKeysSpec
from gateway.policy.schema import BreakerSpec
from gateway.routing.breaker import Breakers
from gateway.store import MemoryStore, RedisStore, Store, StoreConfig
from gateway.store.base import Channel
from gateway.store.redis_pubsub import READ_SLICE_S, cancel_and_wait
from tests.support.redis_server import suite_redis_url

BOUND_S = 10.0
"""What a cancelled task gets to end in: generous (a loaded CI machine); a hang is what is tested, not speed."""
PATIENT: dict[str, Any] = {"op_timeout_s": 5.0, "connect_timeout_s": 5.0, "backoff_min_s": 0.05, "backoff_max_s": 0.2}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    prefix = f"gwtest:{uuid.uuid4().hex}:"  # pub/sub channels are server-wide: the prefix keeps them ours
    store = RedisStore(StoreConfig(backend="redis", url=redis_url, key_prefix=prefix, **PATIENT))
    await store.start()
    yield store
    await store.aclose()
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


class Swallow:
    """Patches `owner.name` so that its next call matching `when` loses a cancel: the real call completes, then
    parks (at most 30 s) until the task is cancelled, and returns the real result as if nothing happened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: type, name: str, when: Callable[..., bool]) -> None:
        self.reached = asyncio.Event()
        self.swallowed = 0
        self._armed = True
        original = getattr(owner, name)

        async def patched(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            if self._armed and when(*args, **kwargs):
                self._armed = False
                self.reached.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    self.swallowed += 1  # dropped: the caller sees a normal return
            return result

        monkeypatch.setattr(owner, name, patched)


def _writes_subscribe(conn: Any, command: Any, *args: Any, **kwargs: Any) -> bool:
    packed = command if isinstance(command, bytes) else b"".join(bytes(part) for part in command)
    return b"\r\nSUBSCRIBE\r\n" in packed


def swallow_subscribe(monkeypatch: pytest.MonkeyPatch) -> Swallow:
    """The real site: the SUBSCRIBE write (`send_packed_command`, under `wait_for` in redis-py)."""
    return Swallow(monkeypatch, AbstractConnection, "send_packed_command", _writes_subscribe)


async def _reached(swallow: Swallow) -> None:
    async with asyncio.timeout(BOUND_S):
        await swallow.reached.wait()


async def _ends_within_bound(task: asyncio.Task[Any]) -> None:
    """`task` (cancelled already) ends within the bound; if not, it is cancelled again, to clean up, and fails."""
    done, _ = await asyncio.wait((task,), timeout=BOUND_S)
    if not done:
        task.cancel()
        await asyncio.wait((task,), timeout=BOUND_S)
        pytest.fail("the cancelled task was still running: the cancel was swallowed, and whoever waits on it hangs")


# -- the store: a swallowed cancel is raised again -------------------------------------------------------------


async def test_subscribe_cancelled_as_its_write_completes_raises(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    swallow = swallow_subscribe(monkeypatch)
    task = asyncio.create_task(store.subscribe("ch"))
    await _reached(swallow)
    task.cancel()
    await _ends_within_bound(task)
    assert swallow.swallowed == 1
    if not task.cancelled():  # (before the fix: a channel, to a caller being cancelled)
        await task.result().aclose()
        pytest.fail("subscribe() returned a channel although its task was cancelled")
    assert not store._channels  # the channel nobody got is not kept by the store either


async def test_a_swallowed_cancel_in_the_reader_does_not_hang_closing_the_channel(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reader task's periodic read (a health check's write in it can swallow the same way).
    swallow = Swallow(monkeypatch, PubSub, "get_message", lambda *a, **k: k.get("timeout") == READ_SLICE_S)
    channel = await store.subscribe("ch")
    await _reached(swallow)
    closing = asyncio.create_task(channel.aclose())
    await _ends_within_bound(closing)
    assert swallow.swallowed == 1


# -- the callers, on the Redis store -----------------------------------------------------------------------------


async def test_dynamic_keys_close_while_the_listener_subscribes(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    swallow = swallow_subscribe(monkeypatch)
    keys = DynamicKeys(DynamicKeysSpec(enabled=True), store, frozenset(), "open")
    await keys.start()
    await _reached(swallow)
    await _ends_within_bound(asyncio.create_task(keys.aclose()))
    assert swallow.swallowed == 1


async def test_breaker_sync_stops_while_its_listener_subscribes(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    swallow = swallow_subscribe(monkeypatch)
    breakers = Breakers(BreakerSpec(sync_interval_s=0.05), ["t"], store)
    sync = asyncio.create_task(breakers.sync_forever())
    await _reached(swallow)
    sync.cancel()
    await _ends_within_bound(sync)
    assert swallow.swallowed == 1
    await breakers.aclose()


# -- the callers stay bounded whatever their store does -----------------------------------------------------------


class SwallowingStore(MemoryStore):
    """A store whose `subscribe` loses one cancel (as redis-py's could): the callers must not rely on the store."""

    def __init__(self) -> None:
        super().__init__(StoreConfig())
        self.reached = asyncio.Event()
        self.swallowed = 0

    async def subscribe(self, channel: str) -> Channel:
        subscribed = await super().subscribe(channel)
        if not self.reached.is_set():
            self.reached.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.swallowed += 1
        return subscribed


@pytest.mark.parametrize("service", ["dynamic_keys", "breakers"])
async def test_callers_re_cancel_a_listener_that_lost_its_cancel(service: str) -> None:
    store = SwallowingStore()
    await store.start()
    try:
        if service == "dynamic_keys":
            keys = DynamicKeys(DynamicKeysSpec(enabled=True), store, frozenset(), "open")
            await keys.start()
            await asyncio.wait_for(store.reached.wait(), BOUND_S)
            await _ends_within_bound(asyncio.create_task(keys.aclose()))
        else:
            breakers = Breakers(BreakerSpec(sync_interval_s=0.05), ["t"], store)
            sync = asyncio.create_task(breakers.sync_forever())
            await asyncio.wait_for(store.reached.wait(), BOUND_S)
            sync.cancel()
            await _ends_within_bound(sync)
        assert store.swallowed == 1
    finally:
        await store.aclose()


async def test_cancel_and_wait_gives_up_on_a_task_that_never_ends(caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass  # every cancel lost

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, "the stubborn task", within_s=0.3) is False
    assert "the stubborn task did not end" in caplog.text
    stop.set()
    await asyncio.wait((task,), timeout=BOUND_S)


async def test_cancel_and_wait_cancelled_itself_still_waits_for_the_task() -> None:
    ended = asyncio.Event()

    async def slow_to_end() -> None:  # ends some time after its first cancel, whatever cancels follow
        loop = asyncio.get_running_loop()
        until = None
        while until is None or loop.time() < until:
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                until = until or loop.time() + 0.2
        ended.set()

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cancel_and_wait(task, "the slow task"))
    await asyncio.sleep(0.05)
    waiter.cancel()  # a second cancel, of the one waiting (a shutdown's timeout)
    await asyncio.wait((waiter,), timeout=BOUND_S)
    assert ended.is_set() and task.done()  # it waited for the task to end ...
    assert waiter.cancelled()  # ... and then raised its own cancel


# -- the race itself, nothing patched ----------------------------------------------------------------------------------


async def test_cancelling_a_subscriber_at_any_moment_ends_it(store: Store) -> None:
    async def listen() -> None:
        async with await store.subscribe("race") as channel:
            async for _ in channel:
                pass

    rng = random.Random(40)
    hung: list[float] = []
    for _ in range(40):
        delay = rng.uniform(0, 0.0015)  # where redis-py's SUBSCRIBE write and its confirmation are
        task = asyncio.create_task(listen())
        await asyncio.sleep(delay)
        task.cancel()
        done, _ = await asyncio.wait((task,), timeout=BOUND_S)
        if not done:
            hung.append(delay)
            task.cancel()
            await asyncio.wait((task,), timeout=BOUND_S)
            break  # (one is enough to fail)
    assert not hung, f"a cancelled subscriber kept running (cancelled {hung[0]:.4f} s after it subscribed)"
