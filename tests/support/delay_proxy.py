"""A TCP proxy in front of a Redis that holds or loses the reply to one chosen command, for tests of what a gateway
does while a store call is in flight (a reload swapping the runtime under it) or when one fails half-way.

* `hold(*parts)`: the next command whose bytes contain every one of `parts` runs in Redis, but its reply waits in
  the proxy until `release()` (bounded: `HOLD_LIMIT_S`); `held` is set once that command has gone up. The window a
  slow network would open, made as wide as the test needs, with no timing.
* `cut(*parts, then_down=False)`: the next command whose bytes contain every one of `parts` runs in Redis, and its
  reply never arrives: the client's connection is cut instead (the case no client can tell apart from a command
  that never ran). `then_down`: from that moment Redis looks gone (every connection cut, new ones refused) until
  `up()`.

Only the connection that carried the command is affected: others (a new runtime's pool, a PING) pass freely.
The proxy runs its own event loop in a daemon thread; `stop()` closes the server and every connection it
opened (use it as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

from tests.support.redis_server import free_port

__all__ = ["HOLD_LIMIT_S", "DelayProxy"]

HOLD_LIMIT_S = 30.0  # a held reply goes on after this even without `release()`: a failed test never hangs


class DelayProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `cuts` counts the replies it lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cuts = 0
        self.held = threading.Event()  # the command to hold has gone up to Redis
        self.down = False  # every new connection is refused (`cut(..., then_down=True)` until `up()`)
        self._hold: tuple[bytes, ...] | None = None
        self._cut: tuple[bytes, ...] | None = None
        self._cut_then_down = False
        self._loop = asyncio.new_event_loop()
        self._released = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-delay-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def hold(self, *parts: bytes) -> None:
        """The reply to the next command containing every one of `parts` waits for `release()`."""
        self._loop.call_soon_threadsafe(self._released.clear)
        self.held.clear()
        self._hold = parts

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    def cut(self, *parts: bytes, then_down: bool = False) -> None:
        """The next command containing every one of `parts` runs, and its client's connection is cut before the
        reply; `then_down`: and from then on Redis looks gone, until `up()`."""
        self._cut_then_down = then_down
        self._cut = parts

    def up(self) -> None:
        """Redis reachable again through the proxy."""
        self.down = False

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self.release()
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        holding = asyncio.Event()  # the command whose reply waits went up on this connection
        doomed = asyncio.Event()  # the command whose reply is lost went up on this connection

        async def up() -> None:
            while data := await reader.read(65536):
                if self._hold is not None and all(part in data for part in self._hold):
                    self._hold = None
                    holding.set()
                    self.held.set()
                if self._cut is not None and all(part in data for part in self._cut):
                    self._cut = None
                    doomed.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():  # it ran in Redis; its reply never reaches the client
                    self.cuts += 1
                    if self._cut_then_down:
                        self.down = True
                        for other in list(self._writers):
                            other.transport.abort()
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                if holding.is_set():
                    holding.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(HOLD_LIMIT_S):
                            await self._released.wait()
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._writers.difference_update((writer, up_writer))
            with contextlib.suppress(Exception):
                await writer.wait_closed()
