"""`asyncio.timeout`, as CPython 3.11 defines it, without the cost of its enum state.

Every upstream call waits for its response head under a timeout. `asyncio.Timeout` keeps its
state in an `enum.Enum` and reads it about nine times per use; on CPython 3.11 each read of an
enum class's attribute goes through the metaclass's `__getattr__` hook (about 900
instructions); this took about 1% off a proxied JSON request's instructions. `Deadline`
keeps the same state in two booleans and otherwise follows `asyncio.Timeout` step by step: at
`when` (on the next loop turn if already past) the task is cancelled; on exit, that
cancellation becomes `TimeoutError` only if no one else cancelled the task meanwhile
(`Task.uncancel` counts), so a client that leaves, or a shutdown, still ends the request.
Not rescheduled, not re-entered: one wait.
"""

from __future__ import annotations

import asyncio
import sys
from types import TracebackType
from typing import Any

__all__ = ["Deadline", "deadline_in"]

# The running task of each loop, as CPython 3.11's `asyncio.current_task` (a Python function there) reads it;
# from 3.12 that function is C's own and is called as it is.
_RUNNING_TASKS: dict[Any, Any] | None = getattr(asyncio.tasks, "_current_tasks", None) \
    if sys.version_info < (3, 12) else None


class Deadline:
    """`async with Deadline(when):` is `async with asyncio.timeout_at(when):` (loop time)."""

    __slots__ = ("_cancelling", "_entered", "_expired", "_handle", "_task", "_when")

    def __init__(self, when: float) -> None:
        self._when = when
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._entered = self._expired = False

    async def __aenter__(self) -> Deadline:
        if self._entered:
            raise RuntimeError("Timeout has already been entered")
        loop = asyncio.get_running_loop()
        task = _RUNNING_TASKS.get(loop) if _RUNNING_TASKS is not None else asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        self._entered = True
        self._task = task
        self._cancelling = task.cancelling()
        if self._when <= loop.time():
            self._handle = loop.call_soon(self._on_timeout)
        else:
            self._handle = loop.call_at(self._when, self._on_timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                        exc_tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc_val

    def expired(self) -> bool:
        """Whether the deadline passed during the wait (as `asyncio.Timeout.expired`)."""
        return self._expired

    def _on_timeout(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self._expired = True
        self._handle = None


def deadline_in(delay: float) -> Deadline:
    """`asyncio.timeout(delay)`: a `Deadline` `delay` seconds from now."""
    return Deadline(asyncio.get_running_loop().time() + delay)
