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
from collections.abc import Coroutine
from typing import Any

from tests.support.tcp_proxy import ThreadedProxy

__all__ = ["HOLD_LIMIT_S", "DelayProxy"]

HOLD_LIMIT_S = 30.0  # a held reply goes on after this even without `release()`: a failed test never hangs


class DelayProxy(ThreadedProxy):
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `cuts` counts the replies it lost."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port, "redis-delay-proxy")
        self.cuts = 0
        self.held = threading.Event()  # the command to hold has gone up to Redis
        self.down = False  # every new connection is refused (`cut(..., then_down=True)` until `up()`)
        self._hold: tuple[bytes, ...] | None = None
        self._cut: tuple[bytes, ...] | None = None
        self._cut_then_down = False
        self._released = asyncio.Event()

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

    def stop(self) -> None:
        if self._thread.is_alive():
            self.release()
        super().stop()

    def _accept(self, writer: asyncio.StreamWriter) -> bool:
        return not self.down

    def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
               up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
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

        return [up(), down()]
