"""One request's life: who may end it early, and why.

A request can be ended by someone other than its own code: the client leaves
(while the body is read, while the upstream thinks, or mid-stream), or the
gateway cuts it at a drain deadline: on shutdown, or when the policy it holds
was replaced by a reload that long ago. Both cancel the request's
task, which cancels the upstream call and releases its connection at once. The
`reason` tells the code that catches the cancellation what happened, so that a
client that left is recorded as 499, a cut as 503, and a bug as neither.

The client's leaving is watched from the end of the body read to the last byte
sent. Behind the gateway's own HTTP protocol (`http_server`), the protocol calls the
request back when its connection is lost (`DISCONNECT_HOOK` on uvicorn's request
cycle): no task per request. Behind any other ASGI server, one watcher task per
request waits for the client's `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

__all__ = ["DISCONNECT_HOOK", "Lifecycle"]

Reason = Literal["client_gone", "shutdown"]
# An attribute of the server's request cycle (the object whose bound method is `receive`): the
# gateway's HTTP protocol sets it to None on every cycle it makes, and calls it, if set, when the
# connection is lost. Its presence says the server calls back; a request sets it while it watches.
DISCONNECT_HOOK = "gateway_on_disconnect"


class Lifecycle:
    __slots__ = ("_cycle", "_protected", "_watcher", "reason", "response_started", "runtime", "task")

    def __init__(self, task: asyncio.Task[Any], runtime: Any = None) -> None:
        self.task = task
        self.runtime = runtime  # the policy's runtime it holds: a retired runtime's drain deadline cuts it too
        self.reason: Reason | None = None
        self.response_started = False
        self._watcher: asyncio.Task[None] | None = None
        self._cycle: Any = None  # the server's request cycle that calls us back, while watched
        self._protected = False

    def watch(self, receive: Any) -> None:
        """Start watching for the client's disconnect (after the body has been read)."""
        if self._watcher is not None or self._cycle is not None:
            return
        cycle = getattr(receive, "__self__", None)
        if cycle is not None and hasattr(cycle, DISCONNECT_HOOK):  # the server calls back: no task
            if getattr(cycle, "disconnected", False):
                self.cancel("client_gone")
                return
            setattr(cycle, DISCONNECT_HOOK, self._client_gone)
            self._cycle = cycle
            return
        self._watcher = asyncio.ensure_future(self._watch(receive))

    def _client_gone(self) -> None:
        self._cycle = None
        self.cancel("client_gone")

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.cancel("client_gone")
                return

    def cancel(self, reason: Reason) -> None:
        """End the request early. After `protect()`, only the reason is noted."""
        if self.reason is not None:
            return
        self.reason = reason
        if not self._protected:
            self.task.cancel()

    def protect(self) -> None:
        """The request is finishing (end hooks, the last write): do not cancel it any more."""
        self._protected = True

    def stop(self) -> None:
        if self._cycle is not None:
            setattr(self._cycle, DISCONNECT_HOOK, None)
            self._cycle = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
