"""Strategies: each turns an alias's targets into the order the fallback walks.

A strategy only orders; the breaker skips what is open and the attempt loop walks
the rest (`attempts`). Every input a strategy reads is precomputed at load
(cumulative weights, prices) or a field of `TargetStats`, so ordering three targets
costs a few microseconds. Sticky assignment hashes with BLAKE2b, not `hash()`,
because Python salts `hash()` per process and replicas must agree.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Mapping, Sequence

from ..policy.compiled import ModelRoute, Target
from .rules import Facts
from .stats import TargetStats

__all__ = ["order_targets", "reads_stats", "sticky_point"]

_Stats = Mapping[str, TargetStats]
_UNPRICED = float("inf")


def order_targets(
    route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random,
) -> Sequence[Target]:
    """The targets of `route` in the order to try them."""
    if route.single:
        return route.targets
    return _STRATEGIES[route.strategy](route, facts, stats, stream, rng)


def reads_stats(route: ModelRoute) -> bool:
    """Whether ordering `route` reads its targets' `TargetStats` (a lone target is never ordered)."""
    return not route.single and route.strategy in _READS_STATS


def _priority(route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random
              ) -> Sequence[Target]:
    return route.targets


def _weighted(route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random
              ) -> Sequence[Target]:
    """One target drawn by weight first; the others after it in listed order (the fallback)."""
    total = route.cumulative[-1]
    value = facts.sticky_value(route.sticky) if route.sticky is not None and facts is not None else None
    point = (sticky_point(value) if value is not None else rng.random()) * total
    first = min(bisect.bisect_right(route.cumulative, point), len(route.targets) - 1)
    targets = route.targets
    return (targets[first], *targets[:first], *targets[first + 1:])


def sticky_point(value: str) -> float:
    """A stable point in [0, 1) for a caller: the same on every replica and after every restart."""
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _latency(route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random
             ) -> Sequence[Target]:
    """Fastest average first (a failed attempt counts as a slow answer, `stats.FAILED_SAMPLE_S`, so a target
    that keeps failing goes behind those that answer). With probability `explore`, another target goes first, so that a
    recovered target is measured again and wins its traffic back."""
    ordered = sorted(route.targets, key=lambda t: stats[t.name].latency(stream))
    if route.explore and rng.random() < route.explore:
        pick = rng.randrange(1, len(ordered))
        ordered.insert(0, ordered.pop(pick))
    return ordered


def _least_busy(route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random
                ) -> Sequence[Target]:
    """Fewest requests in flight from this process first; ties keep the listed order."""
    return sorted(route.targets, key=lambda t: stats[t.name].in_flight)


def _cost(route: ModelRoute, facts: Facts | None, stats: _Stats, stream: bool, rng: random.Random
          ) -> Sequence[Target]:
    """Cheapest per token first (the breaker then skips the unhealthy); ties keep the listed order."""
    return sorted(route.targets, key=lambda t: t.price.per_token if t.price is not None else _UNPRICED)


_READS_STATS = frozenset({"latency", "least_busy"})  # the strategies whose order depends on `TargetStats`
_STRATEGIES: dict[str, Callable[[ModelRoute, Facts | None, _Stats, bool, random.Random], Sequence[Target]]] = {
    "priority": _priority,
    "weighted": _weighted,
    "latency": _latency,
    "least_busy": _least_busy,
    "cost": _cost,
}
