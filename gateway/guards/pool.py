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
that workers do not inherit the server's threads and sockets. On Linux its workers
die with the process that started them, even when that one is killed outright
(`_die_with_parent`). A worker that dies
(the OOM killer, a crash in a native library) breaks its `ProcessPoolExecutor`
for good: the pool is then replaced by a new one, warmed as at start, one
replacement at a time and with a back-off when replacements keep breaking; the
analysis that met the broken pool runs once more on the new one, and checks that
arrive meanwhile wait for it (within their guard's `timeout_s`). While no pool
can be had, `healthy` is false (`/readyz` shows it) and checks fail at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, TypeVar

from ..policy.guard_schema import GuardPoolSpec

__all__ = ["INLINE_CHARS", "INLINE_DIGITS", "PER_TEXT", "YIELD_CHARS", "GuardPool", "QueueFull", "digit_count"]

T = TypeVar("T")
PoolState = Literal["up", "replacing", "down"]

log = logging.getLogger("gateway.guards")

# Texts up to this long are checked on the event loop (a thread hop costs more than their check); longer ones
# are handed to the pool, whose guards' regexes would otherwise hold the loop for many milliseconds. Every
# guard kind uses this one rule (`pii.py`, `secrets.py`, `denylist.py`, `injection.py`).
INLINE_CHARS = 16_384
# A pii guard that looks for phone numbers hands the pool any text with more digits than this, however short:
# libphonenumber tries each cluster of digits once per region, up to 0.4 ms a digit ("1/1/1...": 3 s for 16K
# characters on the loop; this bounds what one text holds it to about 25 ms, a few phone numbers to 1 or 2 ms).
INLINE_DIGITS = 64
# The characters of one request (or answer) checked on the event loop between two yields to it: a request of many
# texts, each short enough to be checked inline, would otherwise hold the loop for all of them at once (240 of 16,384
# characters: 2 s). About one inline text's worth, so a request of a few texts (most) never yields.
YIELD_CHARS = INLINE_CHARS
# What one text counts for beside its characters: a check costs 12-40 us however short the text (the guards' calls,
# the verdict, the metrics), what 100-400 characters of prose cost the pii, secrets and injection guards; counted as
# characters, 128,000 empty messages never reached `YIELD_CHARS` and held the loop 2.9 s. At most 64 texts between
# two yields, a few milliseconds; a request of a few dozen short texts still never yields.
PER_TEXT = 256
_ASCII_DIGITS = b"0123456789"
_DIGIT = re.compile(r"\d")
# A broken process pool is replaced at once the first time; a replacement within `_CALM_S` of the last one waits
# `_BACKOFF_FIRST_S`, then twice as long each time, up to `_BACKOFF_MAX_S` (below `_CALM_S`, so a pool that keeps
# breaking stays backed off), so that workers dying at every start or at every analysis cannot become a storm of
# spawns and spaCy loads.
_BACKOFF_FIRST_S = 1.0
_BACKOFF_MAX_S = 30.0
_CALM_S = 60.0
_PR_SET_PDEATHSIG = 1


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
        self._warm: tuple[Callable[..., Any], tuple[Any, ...]] | None = None  # what each new process pool runs first
        self._state: PoolState = "up"
        self._attempt: asyncio.Future[None] | None = None  # done when the replacement in progress is
        self._recovery: asyncio.Task[None] | None = None  # at most one at a time
        self._last_attempt = -_CALM_S
        self._delay_s = 0.0
        self._closed = False
        self.replacements = 0

    def start(self, warm: Callable[..., Any] | None = None, *args: Any) -> None:
        if self._executor is not None:
            return
        if self.spec.kind == "process":
            if warm is not None:
                self._warm = (warm, args)
            self._executor, _ = self._new_process_pool()
        else:
            self._executor = ThreadPoolExecutor(self.spec.workers, thread_name_prefix="gateway-guard")

    def _new_process_pool(self) -> tuple[Executor, list[Future[Any]]]:
        """A process pool, and its warm-up jobs: they build the analyzers in every worker now, not on the first
        requests (spawning the workers blocks: a replacement makes its pool in a thread)."""
        executor = ProcessPoolExecutor(self.spec.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_die_with_parent, initargs=(os.getpid(),))
        if self._warm is None:
            return executor, []
        warm, args = self._warm
        return executor, [executor.submit(warm, *args) for _ in range(self.spec.workers)]

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def healthy(self) -> bool:
        """False while the pool is broken and cannot be replaced yet (a replacement failed, or it is backing off)."""
        return self._state != "down"

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a worker; counted in `pending` until the worker is done with it (see the module). On a
        broken process pool, once more on its replacement."""
        if self._pending >= self.spec.max_queue:
            raise QueueFull
        try:
            return await self._run_once(fn, *args)
        except BrokenProcessPool:
            return await self._run_once(fn, *args)

    async def _run_once(self, fn: Callable[..., T], *args: Any) -> T:
        executor = self._executor if self._state == "up" else await self._replaced()
        if executor is None:
            self.start()
            executor = self._executor
            assert executor is not None
        loop = asyncio.get_running_loop()
        try:
            job = executor.submit(fn, *args)
            self._pending += 1
            job.add_done_callback(lambda _: _on_loop(loop, self._done))  # (in the worker's thread, or at a cancel)
            return await asyncio.wrap_future(job, loop=loop)
        except BrokenProcessPool:
            self._broke(executor)
            raise

    def _done(self) -> None:
        self._pending -= 1

    async def _replaced(self) -> Executor | None:
        """The pool once the replacement in progress is done (shielded: a check that gives up does not stop it);
        `BrokenProcessPool` when there is none to be had now."""
        if self._state == "replacing":
            assert self._attempt is not None
            await asyncio.shield(self._attempt)
        if self._state != "up":
            raise BrokenProcessPool("the guard pool's workers died and it is not replaced yet")
        return self._executor

    def _broke(self, executor: Executor) -> None:
        """Start replacing `executor`, unless it was replaced already or is being replaced."""
        if executor is not self._executor or self._recovery is not None or self._closed:
            return
        quiet = time.monotonic() - self._last_attempt
        self._delay_s = 0.0 if quiet >= _CALM_S else self._longer_delay()
        wait = max(0.0, self._delay_s - quiet)
        if wait:
            self._state = "down"
        else:
            self._begin_attempt()
        self._recovery = asyncio.get_running_loop().create_task(self._recover(executor, wait))

    def _longer_delay(self) -> float:
        """The back-off after the last one: `_BACKOFF_FIRST_S`, then doubled, up to `_BACKOFF_MAX_S`."""
        return min(max(2 * self._delay_s, _BACKOFF_FIRST_S), _BACKOFF_MAX_S)

    def _begin_attempt(self) -> None:
        self._state = "replacing"
        self._attempt = asyncio.get_running_loop().create_future()
        self._last_attempt = time.monotonic()

    async def _recover(self, broken: Executor, wait: float) -> None:
        """Replace `broken` until a new pool warms up without breaking, backing off between tries."""
        try:
            while True:
                if wait:
                    await asyncio.sleep(wait)
                    self._begin_attempt()
                replaced = await self._replace(broken)
                self._state = "up" if replaced else "down"
                self._end_attempt()
                if replaced:
                    return
                assert self._executor is not None
                broken = self._executor
                wait = self._delay_s = self._longer_delay()
        finally:
            self._end_attempt()
            self._recovery = None

    def _end_attempt(self) -> None:
        if self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(None)

    async def _replace(self, broken: Executor) -> bool:
        """Shut `broken` down, start a new pool in its place and warm it: False when that one broke too."""
        self.replacements += 1
        log.warning("guard pool: a worker died; starting a new process pool (replacement %d)", self.replacements)
        await asyncio.to_thread(broken.shutdown, True, cancel_futures=True)
        making = asyncio.ensure_future(asyncio.to_thread(self._new_process_pool))
        try:
            executor, warming = await asyncio.shield(making)
        except asyncio.CancelledError:  # closing: the pool is made all the same, and `aclose` must stop it
            self._executor, _ = await making
            raise
        self._executor = executor
        results = await asyncio.gather(*(asyncio.wrap_future(job) for job in warming), return_exceptions=True)
        return not any(isinstance(result, BrokenProcessPool) for result in results)

    async def aclose(self) -> None:
        """Stop the workers (off the loop: a worker may be finishing an analysis)."""
        self._closed = True
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


def _die_with_parent(parent: int) -> None:
    """A pool worker's first step (Linux): the kernel kills it (SIGKILL) when `parent`, the gateway process that
    started it, dies, even by SIGKILL (the OOM killer); else it ran on for good, reparented to PID 1, with its
    analyzers (~190 MB with a spaCy pipeline). One whose parent died before the call exits at once.

    The signal comes when the *thread* that started the worker ends: a pool starts its workers in the thread that
    submits to it, the event loop's or (a replacement's warm-up, `_replace`) one of the loop's default executor,
    and both last as long as the process."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """`callback` on `loop`'s thread, unless the loop has closed (its pool then counts nothing any more)."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        pass
