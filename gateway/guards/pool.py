"""Where CPU-bound analysis runs: a thread or process pool per runtime, with a bounded queue.

A spaCy analysis holds the CPU for tens of milliseconds, and a regex scan of a
long prompt (longer than `INLINE_CHARS`) as long or far longer; on the event loop it
would stall every other request. The pool's size and kind come from the policy.
Its queue is bounded: a full queue is a guard failure (`fail:` decides), so a
burst of long prompts cannot pile up unbounded work and memory. A job counts
until its worker is done with it, not until its check stops waiting: a check
that timed out cannot stop a thread (or a process's call), and work that
overruns (a slow classifier, an analysis) keeps its place in the queue, so such
work cannot pile up behind the checks that gave up on it either.

A process pool sidesteps the GIL but pays for pickling and for one analyzer per
worker (a spaCy pipeline each); it is started with `spawn`, never `fork`, so
that workers do not inherit the server's threads and sockets.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

from ..policy.guard_schema import GuardPoolSpec

__all__ = ["INLINE_CHARS", "INLINE_DIGITS", "GuardPool", "QueueFull", "digit_count"]

T = TypeVar("T")

# Texts up to this long are checked on the event loop (a thread hop costs more than their check); longer ones
# are handed to the pool, whose guards' regexes would otherwise hold the loop for many milliseconds. Every
# guard kind uses this one rule (`pii.py`, `secrets.py`, `denylist.py`, `injection.py`).
INLINE_CHARS = 16_384
# A pii guard that looks for phone numbers hands the pool any text with more digits than this, however short:
# libphonenumber tries each cluster of digits once per region, up to 0.4 ms a digit ("1/1/1...": 3 s for 16K
# characters on the loop; this bounds what one text holds it to about 25 ms, a few phone numbers to 1 or 2 ms).
INLINE_DIGITS = 64
_ASCII_DIGITS = b"0123456789"
_DIGIT = re.compile(r"\d")


def digit_count(text: str) -> int:
    """How many digits `text` holds, of any script (as the matcher's `\\d` reads them): about 1 us per 1,500 ASCII
    characters."""
    if text.isascii():
        return len(text) - len(text.encode().translate(None, _ASCII_DIGITS))
    return len(_DIGIT.findall(text))


class QueueFull(Exception):
    """More analyses waiting than `max_queue`."""


class GuardPool:
    def __init__(self, spec: GuardPoolSpec) -> None:
        self.spec = spec
        self._executor: Executor | None = None
        self._pending = 0

    def start(self, warm: Callable[..., Any] | None = None, *args: Any) -> None:
        if self._executor is not None:
            return
        if self.spec.kind == "process":
            self._executor = ProcessPoolExecutor(self.spec.workers, mp_context=multiprocessing.get_context("spawn"))
            if warm is not None:  # build the analyzers in every worker now, not on the first requests
                for _ in range(self.spec.workers):
                    self._executor.submit(warm, *args)
        else:
            self._executor = ThreadPoolExecutor(self.spec.workers, thread_name_prefix="gateway-guard")

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker; counted in `pending` until the worker is done with it (see the module)."""
        if self._pending >= self.spec.max_queue:
            raise QueueFull
        if self._executor is None:
            self.start()
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        job = self._executor.submit(fn, *args)
        self._pending += 1
        job.add_done_callback(lambda _: _on_loop(loop, self._done))  # (in the worker's thread, or at a cancel)
        return await asyncio.wrap_future(job, loop=loop)

    def _done(self) -> None:
        self._pending -= 1

    async def aclose(self) -> None:
        """Stop the workers (off the loop: a worker may be finishing an analysis)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """`callback` on `loop`'s thread, unless the loop has closed (its pool then counts nothing any more)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass
