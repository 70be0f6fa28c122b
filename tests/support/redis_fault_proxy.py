"""A TCP proxy in front of a Redis that can lose one reply: Redis runs the command, the client never hears back.

`arm(script)` picks the next EVALSHA of that Lua script (its SHA-1 seen in what the client sends): the reply
to it is not passed on, and the client's connection is cut instead, the case no client can tell apart from
a command that never ran. The proxy runs its own event loop in a daemon thread; `stop()` closes the server
and every connection it opened (use it as a context manager).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Coroutine
from typing import Any

from tests.support.tcp_proxy import ThreadedProxy

__all__ = ["FaultProxy"]


class FaultProxy(ThreadedProxy):
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`; `cuts` counts the replies it lost."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port, "redis-fault-proxy")
        self.cuts = 0
        self._cut_reply_to: bytes | None = None  # the SHA-1 (hex) whose next EVALSHA loses its reply

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, script: str) -> None:
        """The next EVALSHA of `script` (which names it by its SHA-1) loses its reply."""
        self._cut_reply_to = hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest().encode()

    def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
               up_writer: asyncio.StreamWriter) -> list[Coroutine[Any, Any, None]]:
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

        return [up(), down()]
