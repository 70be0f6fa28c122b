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
import contextlib
import threading
from typing import Self

from tests.support.redis_server import free_port

__all__ = ["LatencyProxy"]

PENDING_CHUNKS = 1024  # replies waiting out their delay, per connection: past this the reader waits (bounded)


class LatencyProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, every reply `delay_s` late."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.port = free_port()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-latency-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
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
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
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

        try:
            await asyncio.gather(up(), down(), deliver())
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._writers.difference_update((writer, up_writer))
            with contextlib.suppress(Exception):
                await writer.wait_closed()
