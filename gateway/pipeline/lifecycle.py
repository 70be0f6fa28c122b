"""One request's life: who may end it early, and why.

A request can be ended by someone other than its own code: the client leaves
(while the body is read, while the upstream thinks, or mid-stream), or the
gateway cuts it at the drain deadline on shutdown. Both cancel the request's
task, which cancels the upstream call and releases its connection at once. The
`reason` tells the code that catches the cancellation what happened, so that a
client that left is recorded as 499, a cut as 503, and a bug as neither.

One watcher task per request waits for the client's `http.disconnect`, from the
end of the body read to the last byte sent.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

__all__ = ["Lifecycle"]

Reason = Literal["client_gone", "shutdown"]


class Lifecycle:
    __slots__ = ("_protected", "_watcher", "reason", "response_started", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.reason: Reason | None = None
        self.response_started = False
        self._watcher: asyncio.Task[None] | None = None
        self._protected = False

    def watch(self, receive: Any) -> None:
        """Start watching for the client's disconnect (after the body has been read)."""
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch(receive))

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
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
