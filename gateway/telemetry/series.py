"""Writing the per-request series fast: what `telemetry.metrics` hands the hot path.

prometheus_client's `observe` and `inc` take a lock and check their argument on every call; a
finished request touches about a dozen series. These wrappers write the same values into the
library's own value objects (`MutexValue._value`), without the per-call checks (`fast_child`) and,
where only the event loop writes a series (one process), without the lock (`loop_child`). Each
falls back to the library's child itself when its internals are not the expected ones, and a test
compares what both write (`tests/test_telemetry_units.py`). `Children` caches labelled children
with a bound on label combinations; `RequestSeries` is one finished request's children, looked
up once per label combination and written in one call (`telemetry.batches` writes them for many
requests at once: `add`, below, is a histogram's part of that).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

__all__ = ["Children", "RequestSeries", "drop_child", "fast_child", "loop_child", "loop_value"]

_INF = float("inf")


class _Observe:
    """A labelled histogram child's `observe` without prometheus_client's per-call checks: the bucket found
    by bisection and the two values added directly (the same values the library's own `observe` adds;
    checked by a test against it). A library without these internals gets the child itself."""

    __slots__ = ("bounds", "buckets", "find", "sum")

    def __init__(self, bounds: list[float], buckets: list[Any], total: Any) -> None:
        self.bounds, self.buckets, self.sum = bounds, buckets, total
        self.find = partial(bisect_left, bounds)  # an amount's bucket (`add`)

    @staticmethod
    def of(child: Any) -> Any:
        bounds, buckets, total = (getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
        if (bounds is None or buckets is None or total is None or len(bounds) != len(buckets) or not bounds
                or bounds[-1] != _INF):
            return child
        return _Observe(list(bounds), list(buckets), total)

    def observe(self, amount: float) -> None:
        # The first bucket whose bound >= amount: there is one, the last bound is +Inf (checked by `of`).
        self.buckets[bisect_left(self.bounds, amount)].inc(1)
        self.sum.inc(amount)

    def add(self, amounts: Sequence[float]) -> None:
        """`observe` of each amount, in one write per bucket reached and one to the sum (`telemetry.batches`).
        The same bucket counts; the sum gets the amounts' sum, which may differ from adding them one by one in
        its last bits."""
        buckets = self.buckets
        for index, count in self.counts(sorted(amounts)):
            buckets[index].inc(count)
        self.sum.inc(sum(amounts))

    def counts(self, ordered: list[float]) -> list[tuple[int, int]]:
        """(bucket, how many) of the amounts `ordered` (sorted, not NaN), from the bucket of the least to that of
        the greatest: the amounts `bisect_right` finds at or below each bound in that range. A sort (in C, with
        its float comparisons) and a bisection per bucket reached cost less than a bisection of the bounds per
        amount: a batch's amounts mostly fall in a few buckets."""
        find, bounds = self.find, self.bounds
        low, high, below = find(ordered[0]), find(ordered[-1]), 0
        found = []
        for index in range(low, high):
            upto = bisect_right(ordered, bounds[index], below)
            if upto != below:
                found.append((index, upto - below))
                below = upto
        found.append((high, len(ordered) - below))
        return found


class _Increment:
    """A labelled counter child's `inc` without the per-call checks (amounts here are never negative)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    @staticmethod
    def of(child: Any) -> Any:
        value = getattr(child, "_value", None)
        return _Increment(value) if value is not None and hasattr(value, "inc") else child

    def inc(self, amount: float = 1) -> None:
        self.value.inc(amount)


class _Set:
    """A labelled gauge child's `set` without the per-call checks (`mostrecent` gauges excepted: see `of`)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    @staticmethod
    def of(child: Any) -> Any:
        value = getattr(child, "_value", None)
        if value is None or not hasattr(value, "set") or getattr(child, "_is_most_recent", True):
            return child  # a `mostrecent` multiprocess gauge also writes a timestamp: the library's own `set`
        return _Set(value)

    def set(self, amount: float) -> None:
        self.value.set(float(amount))


class _LoopObserve(_Observe):
    """`_Observe` for a series only the event loop's thread writes (`RequestSeries.record`), in a single-process
    registry: the two floats added without taking their lock (the exposition, on that same thread, reads them
    under it; no other thread writes these series). A registry of another kind gets `_Observe.of`."""

    __slots__ = ()

    @staticmethod
    def of(child: Any) -> Any:
        found = _Observe.of(child)
        if type(found) is not _Observe or not all(type(v) is MutexValue for v in (*found.buckets, found.sum)):
            return found
        return _LoopObserve(found.bounds, found.buckets, found.sum)

    def observe(self, amount: float) -> None:
        self.buckets[bisect_left(self.bounds, amount)]._value += 1  # (see `_Observe.observe`)
        self.sum._value += amount

    def add(self, amounts: Sequence[float]) -> None:
        """`_Observe.add` without the lock, and in line (a batch's time is mostly its calls): all in one bucket
        (the usual case), or each bucket from the least amount's to the greatest's given the amounts at or below
        its bound, as in `counts`. The sum added to amount by amount, in order, so that it is the very float
        `observe` after `observe` gives (`sum` with a float start, in C: on Python 3.11; from 3.12 `sum`
        compensates its rounding, as exact or more, which may differ in the last bits)."""
        ordered = sorted(amounts)
        find = self.find
        low, high = find(ordered[0]), find(ordered[-1])
        if low == high:
            self.buckets[low]._value += len(ordered)
        else:
            bounds, buckets, below = self.bounds, self.buckets, 0
            for index in range(low, high):
                upto = bisect_right(ordered, bounds[index], below)
                buckets[index]._value += upto - below  # (0 for a bucket in between that none fell in)
                below = upto
            buckets[high]._value += len(ordered) - below
        total = self.sum
        total._value = sum(amounts, total._value)


class _LoopIncrement(_Increment):
    """`_Increment` for a series only the event loop's thread writes (see `_LoopObserve`)."""

    __slots__ = ()

    @staticmethod
    def of(child: Any) -> Any:
        found = _Increment.of(child)
        return _LoopIncrement(found.value) if type(found) is _Increment and type(found.value) is MutexValue \
            else found

    def inc(self, amount: float = 1) -> None:
        self.value._value += amount


class _AddThrough:
    """Stands in for a value object that may not be added to in line (`loop_value`): `_value += amount` calls
    the child's own `inc(amount)` (the getter reads 0, so the setter is handed the amount itself)."""

    __slots__ = ("child",)

    def __init__(self, child: Any) -> None:
        self.child = child

    @property
    def _value(self) -> float:
        return 0.0

    @_value.setter
    def _value(self, amount: float) -> None:
        self.child.inc(amount)


def loop_value(child: Any) -> Any:
    """What a counter or gauge child from `loop_child` is added to in line, `loop_value(child)._value += amount`:
    no call per write (a method call costs more than the addition). Its value object itself when the child is
    lock-free (`_LoopIncrement`: one process, the event loop's thread only), else a stand-in that calls the
    child's `inc`."""
    return child.value if type(child) is _LoopIncrement else _AddThrough(child)


def loop_child(child: Any) -> Any:
    """`fast_child` for a counter, gauge or histogram (child) that only the event loop's thread writes: its
    values added without their lock when the registry is single-process (`_LoopObserve`, `_LoopIncrement`).
    A gauge gets `inc` (negative amounts included: `inc(-1)` is the library's `dec()`)."""
    if isinstance(child, Histogram):
        return _LoopObserve.of(child)
    if isinstance(child, Counter | Gauge):
        return _LoopIncrement.of(child)
    return child


def fast_child(child: Any) -> Any:
    """A labelled child for a per-request path: the same writes as the library's, fewer checks per call."""
    if isinstance(child, Histogram):
        return _Observe.of(child)
    if isinstance(child, Counter):
        return _Increment.of(child)
    if isinstance(child, Gauge):
        return _Set.of(child)
    return child


class Children:
    """One metric's labelled children by label values, each looked up once and written through `fast_child`.

    For label values from the policy's or the code's bounded sets (guard names, entity types, actions,
    places); the map stops growing at `limit` all the same, past which children are looked up each time."""

    __slots__ = ("_found", "_limit", "_metric", "_writer")

    def __init__(self, metric: Any, limit: int = 10_000, loop_only: bool = False) -> None:
        self._metric = metric
        self._found: dict[tuple[str, ...], Any] = {}
        self._limit = limit
        self._writer = loop_child if loop_only else fast_child  # loop_only: only the event loop's thread writes

    def __call__(self, *values: str) -> Any:
        found = self._found.get(values)
        if found is None:
            found = self._writer(self._metric.labels(*values))
            if len(self._found) < self._limit:
                self._found[values] = found
        return found


@dataclass(frozen=True, slots=True, eq=False)  # eq=False: hashed by identity (`batches.Batches.waiting`)
class RequestSeries:
    """The labelled children one finished request touches, looked up once per label combination
    (`Metrics.series`), and written in one call (`record`): each request's values at once, as here, where the
    children are not the expected internals; else in batches (`batches.BatchedSeries`)."""

    requests: Any  # counters: `inc`; histograms: `observe` (see `_Increment`, `_Observe`)
    duration: Any
    upstream: Any | None
    overhead: Any
    first_chunk: Any
    prompt_tokens: Any
    completion_tokens: Any
    tenant_requests: Any
    operation: Any | None
    input_usage: Any
    output_usage: Any
    per_token: Any
    error: Any | None

    def record(self, total: float, upstream: float, first_chunk: float | None, prompt_tokens: int,
               completion_tokens: int) -> None:
        """Everything about one finished request: seconds in all, upstream and to the first chunk (streams),
        and the tokens used."""
        self.requests.inc()
        self.tenant_requests.inc()
        self.duration.observe(total)
        if self.upstream is not None:
            self.upstream.observe(upstream)
            self.overhead.observe(max(0.0, total - upstream))
        if self.operation is not None:
            self.operation.observe(upstream)
        if self.error is not None:
            self.error.inc()
        if first_chunk is not None:
            self.first_chunk.observe(first_chunk)
            if completion_tokens > 1:
                self.per_token.observe(max(0.0, total - first_chunk) / (completion_tokens - 1))
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
            self.input_usage.observe(prompt_tokens)
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens)
            self.output_usage.observe(completion_tokens)


def drop_child(gauge: Any, labels: tuple[str, ...], neutral: float, multiprocess: bool) -> None:
    """A gauge series nothing will write again, dropped so that an alert reading it can clear: removed; in
    multiprocess mode, where prometheus_client cannot remove one (each worker's value stays in its file), set to
    `neutral`, what its alert reads as fine, if this process wrote it (or may have). A series already gone is left."""
    if not multiprocess:
        try:
            gauge.remove(*labels)
        except KeyError:  # (never written, or another runtime dropped it first)
            pass
    elif labels in getattr(gauge, "_metrics", (labels,)):
        gauge.labels(*labels).set(neutral)
