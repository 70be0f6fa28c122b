"""A response's head joined to what follows it: one `send()` for a complete answer (see `HeadJoined`).

The gateway's HTTP protocols (`http_server`) put it between uvicorn's request cycle and the
connection's transport, from the end of a request's head until the response's head has left.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["HeadJoined"]


class HeadJoined:
    """The transport as one request's cycle sees it: its first write (the response head) is held until
    the next write or the end of the loop turn, so that a complete answer leaves in one `send()`.

    uvicorn writes a response's head and its body separately, two system calls where one does; the
    head of a non-streamed answer is followed by its body in the same step of the request's task, so
    they are joined. A head with nothing after it (a stream's, a `100 Continue`) goes out at the next
    turn of the loop, and before any close. A profile of a cache hit showed the head's own `send()`
    at about a tenth of the gateway's CPU. Once the head has left, the cycle gets its transport back:
    a stream's events are written without this wrapper.

    A write to a connection that is going away is skipped: uvloop raises RuntimeError on a write once the
    connection is lost (asyncio drops it), and the request learns of the loss from the protocol (its cycle's
    `disconnected`). The check costs nothing when the write succeeds (a `try` in line, not a helper's call).
    """

    __slots__ = ("_cycle", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, cycle: Any = None) -> None:
        self._transport = transport
        self._loop = loop
        self._cycle = cycle  # once the head has left, the cycle writes to the transport itself (a stream's events)
        self._held: bytes | None = b""  # b"": nothing written yet; None: passing writes through

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            if not held:
                self._held = bytes(data)
                self._loop.call_soon(self._flush)
                return
            self._held = None
            data = held + data
            self._step_aside()
        try:
            self._transport.write(data)
        except RuntimeError:
            if not self._transport.is_closing():
                raise

    def write_all(self, data: bytes) -> None:
        """A write with nothing after it in this response (a whole reply, `api.whole_reply.send_whole`): it goes out
        now, joined to whatever is held, and the cycle gets its transport back."""
        held, self._held = self._held, None
        self._step_aside()
        try:
            self._transport.write(held + data if held else data)
        except RuntimeError:
            if not self._transport.is_closing():
                raise

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held)
        self._step_aside()

    def _step_aside(self) -> None:
        cycle, self._cycle = self._cycle, None
        if cycle is not None and cycle.transport is self:
            cycle.transport = self._transport

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)
