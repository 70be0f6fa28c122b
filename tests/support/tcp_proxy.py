"""What the tests' TCP proxies in front of a Redis share: a server on a free port, its own event loop in a daemon
thread, and one relay per client connection to 127.0.0.1:`target_port`. A proxy says what its relay does to the
bytes (`_relay`) and whether it takes a connection at all (`_accept`); `stop()` closes the server and every
connection it opened (use it as a context manager).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Self

from tests.support.redis_server import free_port

__all__ = ["ThreadedProxy"]


class ThreadedProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, each connection relayed by `_relay`'s coroutines."""

    def __init__(self, target_port: int, name: str) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

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

    def _accept(self, writer: asyncio.StreamWriter) -> bool:
        """Whether to relay this new client connection (else it is cut at once)."""
        return True

    def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
               up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
        """The coroutines that carry one connection's bytes both ways, run together until the first ends."""
        raise NotImplementedError

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
        if not self._accept(writer):
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(*self._relay(reader, writer, up_reader, up_writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            self._writers.difference_update((writer, up_writer))
            with contextlib.suppress(Exception):
                await writer.wait_closed()
