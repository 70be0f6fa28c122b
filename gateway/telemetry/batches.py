"""Finished requests' series written in batches: what `RequestSeries.record` costs the request path.

Writing a finished request's dozen histogram and counter values one by one cost about 220 interpreter
opcodes a request, the largest part of the metrics' cost per request. Here `record` only appends the
request's values to its series' batch (about 25 opcodes), and the batch is written later, a histogram at
a time, mostly in C: the values sorted, one write per bucket reached (a batch's values mostly fall in a
few buckets: found by bisecting the sorted values, not the bounds per value) and one to the sum
(`_Observe.add`), one to each counter. Under callgrind (a complete answer's series, the call included):
one by one, 14.5 k instructions a request; in batches, about 3.9 k a request and 57 k a batch, so 11 k at
8 requests a batch, 7.5 k at 16 and 4.6 k at 64 (a steady load fills them); a batch of fewer than
`_LoopBatchedSeries.FEW` is written request by request, as before, for about 2.5 k (5 requests) to 8 k (1)
more a request than before. A batch is written:

- when it holds `BATCH` requests, at once (the request that fills it writes it);
- `APPLY_AFTER_S` after the first request of any waiting batch, on the running loop (no loop running: at
  once, so a test or a command sees its writes straight away);
- before any exposition (`Metrics.render` writes every waiting batch of its process first: one process's
  `/metrics` is always exact and current);
- at exit (an `atexit` hook: a worker stopped gracefully loses nothing), or when `Metrics.flush` is called.

The trade: with several workers (multiprocess mode), a worker's `/metrics` shows the other workers'
requests up to `APPLY_AFTER_S` late, as the access log writes its lines up to 50 ms late (`logs.py`); a
process killed outright (SIGKILL) loses at most that long's requests.

The counts are those of one request at a time: bucket counts and counters exactly (times are never NaN,
which has no place in a sort). Sums, in a single-process registry: added value by value in each series'
order, so the very float, where one label combination writes a child; a child that several share
(`gateway_overhead_seconds` by endpoint only, the upstream's time by provider...) gets one series' batch
after another's, the same values in another order, so its sum may differ in its last bits. The library's
locked values (multiprocess mode's files, any value that is not a plain `MutexValue`) get one `inc` per
bucket reached and one of the batch's sum, never a write that bypasses their lock.

Threads: only the event loop's thread records (the telemetry stage) and so only it writes batches; a call
from another thread while that thread lives (`apply`, so `render` there) leaves the batches to it, as
`JsonLinesHandler.flush` does: the lock-free writes must not meet the loop's. (`/metrics` renders on the
loop's thread; in multiprocess mode, the collector only reads the files, and another worker's batches are
that worker's to write.)
"""

from __future__ import annotations

import asyncio
import atexit
import threading
import weakref
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import and_, is_not, lt, sub, truediv
from typing import Any

from .series import RequestSeries, _Increment, _LoopIncrement, _LoopObserve, _Observe

__all__ = ["APPLY_AFTER_S", "BATCH", "BatchedSeries", "Batches", "request_series"]

BATCH = 64  # requests a series holds before they are written, at once
APPLY_AFTER_S = 0.1  # else this long after the first waiting request
_DUE = frozenset({1, BATCH})  # a batch's lengths at which `record` has more to do than append
# One finished request: seconds in all, upstream and to the first chunk (None: not a stream), tokens in and out.
_Entry = tuple[float, float, float | None, int, int]
_LIVE: weakref.WeakSet[Batches] = weakref.WeakSet()  # every `Batches` of the process, for the exit hook


class Batches:
    """One `Metrics`' series with requests waiting (`waiting`), and the one timer that writes them: the first
    waiting request of any series starts it, so each waits at most `APPLY_AFTER_S` (one timer for all, not one
    per series). A timer due on a loop that has ended never runs: the next request on another loop starts one
    there (as `JsonLinesHandler._due` does)."""

    __slots__ = ("__weakref__", "_owner", "_timed", "waiting")

    def __init__(self) -> None:
        self.waiting: dict[BatchedSeries, None] = {}  # a series with requests waiting (at least), by identity
        self._timed: asyncio.AbstractEventLoop | None = None  # the loop a timed write is due on
        self._owner = -1  # the thread that records (the event loop's), once one has
        _LIVE.add(self)

    def due(self, series: BatchedSeries) -> None:
        """`series` has its first waiting request: written within `APPLY_AFTER_S`, or now if no loop runs."""
        self.waiting[series] = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test, a command): at once
            self.apply()
            return
        if self._timed is not loop:  # none due, or due on a loop that has ended (its timer will not run)
            self._timed, self._owner = loop, threading.get_ident()
            loop.call_later(APPLY_AFTER_S, self._timed_apply)

    def _timed_apply(self) -> None:
        self._timed = None
        self.apply()

    def apply(self) -> None:
        """Every waiting batch written: by the thread that records, or by any once that thread has ended (at
        exit); another thread's call leaves them to it (see the module's docstring)."""
        owner = self._owner
        if owner not in (-1, threading.get_ident()) and any(t.ident == owner for t in threading.enumerate()):
            return
        waiting = self.waiting
        while waiting:  # one at a time: a series that failed leaves the others waiting, not lost
            waiting.popitem()[0].apply()


@atexit.register
def _apply_all() -> None:
    """At exit, what waits is written: a worker's last requests reach the multiprocess files (a single
    process's values die with it, but cost nothing to write)."""
    for batches in list(_LIVE):
        batches.apply()


@dataclass(frozen=True, slots=True, eq=False)
class BatchedSeries(RequestSeries):
    """A `RequestSeries` whose histogram children are `_Observe` (or its lock-free `_LoopObserve`) and whose
    counters are `_Increment` (or `_LoopIncrement`), so that many requests' values can be written at once
    (`_Observe.add`, `inc(n)`). `record` appends (about 25 opcodes a request); `apply` writes.

    A batch's set-up costs about as much as writing a few requests one by one (`FEW`): a batch of fewer is
    written request by request (`_each`), so that a quiet series (or one of many label combinations that
    share the traffic) costs about what it did before batches."""

    FEW = 2  # (the library's locked values: a batch of two already takes fewer locks and file writes)

    batches: Batches = field(kw_only=True)
    batch: list[_Entry] = field(default_factory=list)  # at most `BATCH` requests, oldest first

    def record(self, total: float, upstream: float, first_chunk: float | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        """`RequestSeries.record`, deferred: the request's values appended to the batch, written by `apply`."""
        batch = self.batch
        batch.append((total, upstream, first_chunk, prompt_tokens, completion_tokens))
        if len(batch) in _DUE:
            self._due()

    def _due(self) -> None:
        if len(self.batch) >= BATCH:
            self.apply()  # (still in `waiting`, since its first request: the timer finds it empty, or refilled)
        else:
            self.batches.due(self)

    def apply(self) -> None:
        """The batch's requests written, the same writes as `RequestSeries.record` for each (in the same order
        within each histogram); the batch left empty even if a write fails (it is not written twice)."""
        entries = self.batch[:]
        if not entries:
            return
        self.batch.clear()
        count = len(entries)
        if count < self.FEW:
            self._each(entries)
            return
        totals, upstreams, firsts, prompts, completions = zip(*entries, strict=True)
        self.requests.inc(count)
        self.tenant_requests.inc(count)
        if self.error is not None:
            self.error.inc(count)
        self.duration.add(totals)
        if self.upstream is not None:
            self.upstream.add(upstreams)
            overhead = tuple(map(sub, totals, upstreams))
            if min(overhead) < 0.0:  # (rare: the total includes the upstream's time) max(0.0, total - upstream)
                overhead = tuple(map(max, repeat(0.0), overhead))
            self.overhead.add(overhead)
        if self.operation is not None:
            self.operation.add(upstreams)
        if firsts.count(None) != count:  # streams among them
            self._streams(entries, firsts, completions)
        used = tuple(filter(None, prompts))  # requests with tokens in (`if prompt_tokens:`)
        if used:
            self.prompt_tokens.inc(sum(used))
            self.input_usage.add(used)
        used = tuple(filter(None, completions))
        if used:
            self.completion_tokens.inc(sum(used))
            self.output_usage.add(used)

    def _each(self, entries: list[_Entry]) -> None:
        """A few requests written one by one, by the children's own calls."""
        for entry in entries:
            RequestSeries.record(self, *entry)

    def _streams(self, entries: list[_Entry], firsts: tuple[float | None, ...], tokens: tuple[int, ...]) -> None:
        """The streams' time to first chunk, and time per token after it where more than one came:
        `max(0.0, total - first) / (tokens - 1)`, as `RequestSeries.record` has it; the streams picked out and
        the times worked out by `map` and `compress` (in C: a comprehension costs about 35 opcodes a stream)."""
        streamed = tuple(map(is_not, firsts, repeat(None)))
        self.first_chunk.add(tuple(compress(firsts, streamed)))
        picked = tuple(compress(entries, map(and_, streamed, map(lt, repeat(1), tokens))))
        if picked:
            totals, _, first, _, out = zip(*picked, strict=True)
            after = tuple(map(sub, totals, first))
            if min(after) < 0.0:  # (rare, as for the overhead)
                after = tuple(map(max, repeat(0.0), after))
            self.per_token.add(tuple(map(truediv, after, map(sub, out, repeat(1)))))


class _LoopBatchedSeries(BatchedSeries):
    """A `BatchedSeries` whose children are all the event loop's own (`_LoopObserve`, `_LoopIncrement`): a few
    requests (under `FEW`: under callgrind, a batch costs about what six requests written in line cost) are
    written in line, request by request, as before batches (the same writes as the children's calls)."""

    __slots__ = ()
    FEW = 6

    def _each(self, entries: list[_Entry]) -> None:
        for total, upstream, first_chunk, prompt_tokens, completion_tokens in entries:
            self.requests.value._value += 1
            self.tenant_requests.value._value += 1
            found = self.duration
            found.buckets[bisect_left(found.bounds, total)]._value += 1
            found.sum._value += total
            found = self.upstream
            if found is not None:
                found.buckets[bisect_left(found.bounds, upstream)]._value += 1
                found.sum._value += upstream
                overhead = total - upstream if total > upstream else 0.0  # max(0.0, total - upstream)
                found = self.overhead
                found.buckets[bisect_left(found.bounds, overhead)]._value += 1
                found.sum._value += overhead
            found = self.operation
            if found is not None:
                found.buckets[bisect_left(found.bounds, upstream)]._value += 1
                found.sum._value += upstream
            if self.error is not None:
                self.error.value._value += 1
            if first_chunk is not None:
                found = self.first_chunk
                found.buckets[bisect_left(found.bounds, first_chunk)]._value += 1
                found.sum._value += first_chunk
                if completion_tokens > 1:
                    per_token = (total - first_chunk if total > first_chunk else 0.0) / (completion_tokens - 1)
                    found = self.per_token
                    found.buckets[bisect_left(found.bounds, per_token)]._value += 1
                    found.sum._value += per_token
            if prompt_tokens:
                self.prompt_tokens.value._value += prompt_tokens
                found = self.input_usage
                found.buckets[bisect_left(found.bounds, prompt_tokens)]._value += 1
                found.sum._value += prompt_tokens
            if completion_tokens:
                self.completion_tokens.value._value += completion_tokens
                found = self.output_usage
                found.buckets[bisect_left(found.bounds, completion_tokens)]._value += 1
                found.sum._value += completion_tokens


def request_series(children: tuple[Any, ...], batches: Batches) -> RequestSeries:
    """A finished request's children (in `RequestSeries`'s field order), written in batches of `batches` when
    every one of them has the expected internals (`_Observe`, `_Increment`, or their lock-free forms; all
    lock-free: `_LoopBatchedSeries`), else request by request (`RequestSeries.record`, each child's own
    `observe` and `inc`)."""
    present = [child for child in children if child is not None]
    if all(type(child) in (_LoopObserve, _LoopIncrement) for child in present):
        return _LoopBatchedSeries(*children, batches=batches)
    if all(isinstance(child, _Observe | _Increment) for child in present):
        return BatchedSeries(*children, batches=batches)
    return RequestSeries(*children)
