"""A Redis pub/sub subscription that outlives Redis restarts.

A background task owns one PubSub connection and feeds the channel's bounded buffer. When the connection
breaks (Redis restarted, network cut, no answer to an idle ping) it closes it and subscribes again with a
doubling back-off, so consumers just keep iterating; what was published in between is lost (at most once).
The connection comes from the store's subscription client, not from the operations' pool: it is held for as
long as the subscription lives, and a pool of few connections would be left with none for operations.

redis-py can lose a cancellation: on Python 3.11 its socket writes run under `asyncio.wait_for`, which returns the
write's result when the cancel lands as the write completes, so `subscribe` (or a ping) returns normally in a task
being cancelled. The cancel is then gone: a listener that goes on to wait on its channel sits there for good, and
whoever cancelled it and waits (a shutdown, a reload) hangs with it. So every await into redis-py here is followed
by `raise_if_cancelling`, and a task that owns a subscription is stopped with `cancel_and_wait` (re-cancels, bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.client import PubSub

from gateway.store._common import QueueChannel
from gateway.store.base import StoreConfig
from gateway.store.redis_client import ERRORS, Client

__all__ = ["RedisChannel", "cancel_and_wait", "raise_if_cancelling"]

log = logging.getLogger(__name__)
IDLE_PING_S = 5.0
"""A quiet subscription sends a PING this often; no answer in time means the connection is dead."""
READ_SLICE_S = 1.0
STOP_WITHIN_S = 5.0
"""`cancel_and_wait` gives a cancelled task this long to end before leaving it behind (logged)."""
RECANCEL_EVERY_S = 0.5
"""... and cancels it again this often meanwhile, in case a cancel was swallowed."""


class RedisChannel(QueueChannel):
    """One subscription: `QueueChannel`'s buffer, filled by a reconnecting reader task."""

    def __init__(
        self,
        name: str,
        full_name: str,
        client: Client,
        config: StoreConfig,
        on_close: Callable[[QueueChannel], Awaitable[None]],
    ) -> None:
        super().__init__(name, config.channel_buffer, on_close)
        self._full_name = full_name
        self._client = client
        self._config = config
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    async def open(self, try_now: bool) -> None:
        """Subscribe now if `try_now` (so that later publishes are seen), then keep the subscription alive."""
        pubsub = None
        if try_now:
            try:
                pubsub = await self._subscribe()
            except ERRORS as exc:
                log.warning("store subscription %r not established yet (%s); retrying", self.name, exc)
            except BaseException:  # cancelled: nobody gets this channel, so the store must not keep it either
                await self.aclose()
                raise
        self._task = asyncio.create_task(self._read_forever(pubsub), name=f"store-subscriber:{self.name}")

    async def aclose(self) -> None:
        if self.closed:
            return
        await super().aclose()
        if self._task is not None:
            await cancel_and_wait(self._task, f"store subscription {self.name!r}")
            self._task = None

    async def _subscribe(self) -> PubSub:
        pubsub: PubSub = self._client.pubsub()
        try:
            async with asyncio.timeout(self._config.connect_timeout_s + self._config.op_timeout_s):
                await pubsub.subscribe(self._full_name)
                raise_if_cancelling()
                while True:  # the confirmation: from here on the server delivers every publish to us
                    message = await pubsub.get_message(timeout=None)
                    raise_if_cancelling()
                    if message is not None and message["type"] == "subscribe":
                        return pubsub
        except BaseException:
            await _close(pubsub)
            raise

    async def _read_forever(self, pubsub: PubSub | None) -> None:
        delay = self._config.backoff_min_s
        try:
            while True:
                if pubsub is None:
                    try:
                        pubsub = await self._subscribe()
                    except Exception as exc:  # a redis error, or a bug: this task must go on
                        if not isinstance(exc, ERRORS):
                            log.error("store subscription %r: subscribing failed unexpectedly", self.name,
                                      exc_info=True)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, self._config.backoff_max_s)
                        continue
                    self.reconnects += 1
                    log.info("store subscription %r re-established", self.name)
                    delay = self._config.backoff_min_s
                try:
                    await self._pump(pubsub)
                except ERRORS as exc:
                    log.warning("store subscription %r lost (%s); reconnecting", self.name, exc)
                except Exception:  # a bug: logged; the subscription must outlive it
                    log.error("store subscription %r failed unexpectedly; reconnecting", self.name, exc_info=True)
                    await asyncio.sleep(delay)  # (not at once: a bug that fails every read would spin)
                await _close(pubsub)
                pubsub = None
        finally:
            if pubsub is not None:
                await _close(pubsub)

    async def _pump(self, pubsub: PubSub) -> None:
        """Move messages into the buffer until the connection fails (raises) or stops answering pings."""
        loop = asyncio.get_running_loop()
        last_seen, ping_sent = loop.time(), None
        answer_within = self._config.connect_timeout_s + self._config.op_timeout_s
        while True:
            message: dict[str, Any] | None = await pubsub.get_message(timeout=READ_SLICE_S)
            raise_if_cancelling()
            now = loop.time()
            if message is not None:
                last_seen, ping_sent = now, None
                if message["type"] == "message":
                    self.push(message["data"])
            elif ping_sent is not None and now - ping_sent > answer_within:
                raise TimeoutError("no answer to a ping on the subscription")
            elif ping_sent is None and now - last_seen > IDLE_PING_S:
                async with asyncio.timeout(self._config.op_timeout_s):
                    await pubsub.ping()
                    raise_if_cancelling()  # (inside: a swallowed expiry of this timeout reads as one)
                ping_sent = now


async def _close(pubsub: PubSub) -> None:
    with contextlib.suppress(*ERRORS):
        async with asyncio.timeout(1.0):
            await cast(Any, pubsub).aclose()  # (through Any: annotated in some redis-py releases only)


def raise_if_cancelling() -> None:
    """Raise the cancellation the current task was asked for, if an await into redis-py swallowed it (see the
    module's docstring). A cheap check, for after each such await: the usual answer is 0."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], what: str, within_s: float = STOP_WITHIN_S) -> bool:
    """Cancel `task` and wait until it ends, cancelling it again every `RECANCEL_EVERY_S` (a cancel redis-py
    swallowed is not requested again by anyone else), for at most `within_s`: a shutdown or a reload waits on
    this, and must not hang on a task that will not end; one left behind is logged. Cancelled itself meanwhile,
    the caller still waits (bounded) and then raises: the task is not left running unawaited. True when it ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    interrupted = False
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("%s did not end within %.1fs of being cancelled; left behind", what, within_s)
            break
        task.cancel()
        try:
            await asyncio.wait((task,), timeout=min(remaining, RECANCEL_EVERY_S))
        except asyncio.CancelledError:
            interrupted = True
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("%s failed while stopping", what, exc_info=task.exception())
    if interrupted:
        raise asyncio.CancelledError
    return task.done()
