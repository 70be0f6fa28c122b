"""A TCP proxy in front of a Redis that delays every reply by a fixed time: a high-latency link to a healthy Redis.

Each chunk Redis sends back is passed on `delay_s` after the proxy read it, in order; the delays overlap (a chunk
read while an earlier one waits is not delayed twice), so a round trip costs about `delay_s` more, as on a long
link. What goes up to Redis is not delayed. `connections` counts the client connections the proxy accepted, so a
test can tell a command that reused a connection from one that opened a new one.

The proxy runs its own event loop in a daemon thread; `stop()` closes the server and every connection it opened
(use it as a context manager).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from tests.support.tcp_proxy import ThreadedProxy

__all__ = ["LatencyProxy"]

PENDING_CHUNKS = 1024  # replies waiting out their delay, per connection: past this the reader waits (bounded)


class LatencyProxy(ThreadedProxy):
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, every reply `delay_s` late."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        super().__init__(target_port, "redis-latency-proxy")
        self.delay_s = delay_s
        self.connections = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self, writer: asyncio.StreamWriter) -> bool:
        self.connections += 1
        return True

    def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
               up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(PENDING_CHUNKS)  # (when to pass it on, the chunk)
        loop = asyncio.get_running_loop()

        async def up() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(65536):
                await late.put((loop.time() + self.delay_s, data))
            await late.put((loop.time() + self.delay_s, b""))  # the end, as late as the rest

        async def deliver() -> None:
            while True:
                due, data = await late.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        return [up(), down(), deliver()]
