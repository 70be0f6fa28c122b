"""A TCP proxy in front of a Redis that can lose one reply: Redis runs the command, the client never hears back.

`arm(script)` picks the next EVALSHA of that Lua script (its SHA-1 seen in what the client sends): the reply
to it is not passed on, and the client's connection is cut instead, the case no client can tell apart from
a command that never ran. The proxy runs its own event loop in a daemon thread; `stop()` closes the server
and every connection it opened (use it as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from typing import Self

from tests.support.redis_server import free_port

__all__ = ["FaultProxy"]


class FaultProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `cuts` counts the replies it lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cuts = 0
        self._cut_reply_to: bytes | None = None  # the SHA-1 (hex) whose next EVALSHA loses its reply
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="redis-fault-proxy")
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, script: str) -> None:
        """The next EVALSHA of `script` (which names it by its SHA-1) loses its reply."""
        self._cut_reply_to = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest().encode()

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
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        doomed = asyncio.Event()  # the command that loses its reply went up on this connection

        async def up() -> None:
            while data := await reader.read(65536):
                if self._cut_reply_to is not None and self._cut_reply_to in data:
                    self._cut_reply_to = None
                    doomed.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def down() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():  # it ran in Redis; its reply never reaches the client
                    self.cuts += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
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
