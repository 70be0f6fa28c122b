"""The idle timeout and the total deadline of reading one upstream body, with one lazy timer.

Each read of an upstream body may wait at most `idle_s`, and no read may wait past
the exchange's deadline. `asyncio.timeout_at` around every read enforced that with a
new timeout context, a new timer handle and a task cancellation armed per network
read: on a slow stream, one event a read, that was about a tenth of the gateway's
instructions per forwarded event.

Here one timer per body does it. A read only notes when it started; the timer is
armed at the first read for the moment that read would expire. When it fires it
looks at the read in progress, if any: past its limit, the read fails with
`TimeoutError` (set on aiohttp's `StreamReader`, which wakes the waiting read; no
task is cancelled); otherwise the timer is re-armed for the moment the current read
would expire. With no read in progress (the consumer is busy, e.g. writing to a slow
client: that time never counted) the timer stops, and the next read arms it again.
So the bound is the same as one timeout per read: a read that waits fails exactly
at `min(deadline, its start + idle_s)`, give or take the loop's timer resolution,
and the timer fires about once per `idle_s` on a stream that flows.

Whose doing a passed deadline is depends on what the gateway was waiting for when it passed. A read in
progress then (or one past its idle limit) waited on the upstream: `TimeoutError`, the upstream timed out. With
no read in progress, or a read that only began after it, the consumer held the stream (blocked writing to a
client that reads slowly, or busy otherwise): `HeldPastDeadline`, a `TimeoutError` that is not the upstream's
(`transport_error` maps it to `StreamDeadlinePassed`, on which the breaker passes no verdict). The body is
failed as soon as the timer sees that, with bytes still buffered: the stream ends at its next read, whether or
not that read would have waited, so the deadline bounds every stream alike (unless the whole body is in: the
exchange with the upstream is over then). All of this is decided in the
timer's callback, which runs about once per `idle_s`: nothing is added per read.

The stream loops read with `ready()` and `wait()` rather than `readany()`: see `body.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp

from .body import adopt, release, take
from .handler import StreamingResponseHandler

__all__ = ["HeldPastDeadline", "ReadTimer"]


class HeldPastDeadline(TimeoutError):
    """The body's deadline passed while the consumer held the stream (no read waited on the upstream then)."""


class ReadTimer:
    """`read()` = `content.readany()` under the idle timeout and the deadline (or `begin()` ... `end()`,
    or `ready()`, `wait()` ... `end()`). `stop()` when done."""

    __slots__ = ("_content", "_deadline", "_failed", "_fast", "_got", "_handle", "_idle_s", "_loop", "_since")

    def __init__(self, content: aiohttp.StreamReader, deadline: float, idle_s: float) -> None:
        self._content = content
        self._deadline = deadline
        self._idle_s = idle_s
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._since: float | None = None  # when the read in progress started; None between reads
        self._fast = adopt(content)
        self._got: bytes | None = None  # what the public path's `wait()` read, for `ready()`
        self._failed: Exception | None = None  # how the public path's `wait()` failed, for `ready()` to raise

    async def read(self) -> bytes:
        """The bytes that have arrived (waiting for some), or b"" at the end of the body."""
        try:
            return await self.begin()
        finally:
            self.end()

    def begin(self) -> Awaitable[bytes]:
        """`read()` without its own coroutine: await what it returns, then call `end()` (also after a failure,
        unless the timer is stopped). A stream loop saves a frame that its task resumes through on every
        event (about 1,500 instructions an event); forgetting `end()` would count the consumer's own time."""
        self._start()
        return self._content.readany()

    def ready(self) -> bytes | None:
        """The bytes that have arrived since the last read (b"" at the end of the body), or None when none
        has yet: then await `wait()`, call `end()`, and ask again. Raises the body's failure, as `readany()`.

        On aiohttp's own `StreamReader` (see `body.py`) this takes the bytes off its buffer without the two
        coroutines `readany()` resumes through, and without resuming the transport and feeding the parser
        an empty chunk on every read when nothing was paused: about a sixth of the instructions per event.
        Asking ends the read a `wait()` started, as `end()` does (a reader that polls need not call it)."""
        self._since = None
        if not self._fast:
            if self._failed is not None:
                raise self._failed
            got, self._got = self._got, None
            return got
        content = self._content  # `take(content)` when there is exactly one read's bytes (a slow stream's every
        # event), without the call (an adopted body keeps no chunk ends)
        if content._exception is None and len(buffer := content._buffer) == 1 and not content._buffer_offset:
            data: bytes = buffer.popleft()
            content._size -= len(data)
            content._cursor += len(data)
            if content._size < content._low_water:
                protocol = content._protocol
                if protocol._reading_paused or protocol._buffer_paused:  # see `take`
                    protocol.resume_reading()
            return data
        return take(content)

    def wait(self) -> Awaitable[object]:
        """Wait for the body's next bytes, its end or its failure, under the idle timeout and the deadline
        (`end()` after), then ask `ready()`. When they are there already, it is over at once: a reader that
        just took everything there was may wait without asking `ready()` first (it would say None).

        The wait fails with the body's failure (a timeout too); `ready()` raises it again after, so a reader
        may leave handling it to where it calls `ready()`. Errors raised by this call itself (a closed
        connection, a second reader) are not the body's: they are not raised again."""
        if not self._fast:
            self._start()
            return self._read()
        since = self._since = self._loop.time()  # `_start()`, without the call
        if self._handle is None:
            self._handle = self._loop.call_at(min(self._deadline, since + self._idle_s), self._check)
        content = self._content
        if content._buffer or content._eof or content._exception is not None:
            done: asyncio.Future[None] = self._loop.create_future()
            done.set_result(None)
            return done
        if content._protocol.transport is None:  # as `readany()` waits: aiohttp's own checks
            raise RuntimeError("Connection closed.")
        if content._waiter is not None and not content._waiter.done():
            raise RuntimeError("wait() called while another coroutine is already waiting for incoming data")
        waiter: asyncio.Future[None] = self._loop.create_future()
        content._waiter = waiter  # `feed_data`, `feed_eof` and `set_exception` wake it, and unset it
        return waiter

    def pump(self, pump: Callable[[], bool]) -> bool:
        """Let the connection hand the body's bytes to `pump()` while a `wait()` is pending, instead of ending the
        wait (see `StreamingResponseHandler.pump`); `pump()` reads them with `ready()`, and calls `waits_on()`
        when it took them all. False when the body is not read on that path (then `wait()` ends as usual)."""
        if not self._fast:
            return False
        protocol = self._content._protocol
        return isinstance(protocol, StreamingResponseHandler) and protocol.pump(self._content, pump)

    def waits_on(self) -> None:
        """The pending `wait()` goes on after a pump read the bytes that came: its idle time counts from now."""
        self._since = self._loop.time()

    async def _read(self) -> None:
        try:
            self._got = await self._content.readany()
        except Exception as exc:  # as the fast path's wait: `ready()` raises it
            self._failed = exc
            raise

    def _start(self) -> None:
        since = self._since = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(min(self._deadline, since + self._idle_s), self._check)

    def end(self) -> None:
        """The read that `begin()` or `wait()` started is over: time from here on is the consumer's."""
        self._since = None

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._fast:
            content = self._content
            if content._waiter is not None and content._waiter.done():  # a wait that was cancelled
                content._waiter = None
            release(content)

    def _check(self) -> None:
        self._handle = None
        since = self._since
        deadline = self._deadline
        if since is None or since >= deadline:  # no read waits (the next one arms the timer again), or it began late
            # past the deadline, which passed while the consumer held the stream: unless the whole body is in
            if (since is not None or self._loop.time() >= deadline) and not self._content.is_eof():
                self._content.set_exception(HeldPastDeadline())
            return
        expires = min(deadline, since + self._idle_s)
        if self._loop.time() >= expires:
            self._content.set_exception(TimeoutError())  # the upstream's: a read waited past its limit
        else:
            self._handle = self._loop.call_at(expires, self._check)
