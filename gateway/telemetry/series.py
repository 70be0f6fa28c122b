"""Writing the per-request series fast: what `telemetry.metrics` hands the hot path.

prometheus_client's `observe` and `inc` take a lock and check their argument on every call; a
finished request touches about a dozen series. These wrappers write the same values into the
library's own value objects (`MutexValue._value`), without the per-call checks (`fast_child`) and,
where only the event loop writes a series (one process), without the lock (`loop_child`). Each
falls back to the library's child itself when its internals are not the expected ones, and a test
compares what both write (`tests/test_telemetry_units.py`). `Children` caches labelled children
with a bound on label combinations; `RequestSeries` is one finished request's children, looked
up once per label combination and written in one call.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

__all__ = ["Children", "RequestSeries", "fast_child", "loop_child", "loop_value", "request_series"]

_INF = float("inf")


class _Observe:
    """A labelled histogram child's `observe` without prometheus_client's per-call checks: the bucket found
    by bisection and the two values added directly (the same values the library's own `observe` adds;
    checked by a test against it). A library without these internals gets the child itself."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, bounds: list[float], buckets: list[Any], total: Any) -> None:
        self.bounds, self.buckets, self.sum = bounds, buckets, total

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


@dataclass(frozen=True, slots=True)
class RequestSeries:
    """The labelled children one finished request touches, looked up once per label combination
    (`Metrics.series`), and written in one call (`record`)."""

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


class _LoopRequestSeries(RequestSeries):
    """A `RequestSeries` whose children are all the event loop's own (`_LoopObserve`, `_LoopIncrement`): the
    same writes as their `observe` and `inc`, made in line (a dozen calls fewer per request; checked by a test
    against the calls)."""

    __slots__ = ()

    def record(self, total: float, upstream: float, first_chunk: float | None, prompt_tokens: int,
               completion_tokens: int) -> None:
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


def request_series(children: tuple[Any, ...]) -> RequestSeries:
    """A finished request's children (in `RequestSeries`'s field order), written in line when every one of
    them is a lock-free loop child (one process), else child by child."""
    if all(type(child) in (_LoopObserve, _LoopIncrement) for child in children if child is not None):
        return _LoopRequestSeries(*children)
    return RequestSeries(*children)
