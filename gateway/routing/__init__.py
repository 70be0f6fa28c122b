"""Routing by policy: rules, strategies, retries and fallbacks, circuit breakers.

`router.Router` is the entry point (the `SelectTarget` and `CallUpstream` stages call
it); `rules` evaluates the policy's compiled rules, `strategies` orders an alias's
targets, `attempts` holds the pieces of the retry loop, `breaker` the per-target
circuit breakers shared through the store, and `stats` what this process measures.
"""

from .router import DeadlineExceeded, Router, TargetsUnavailable, all_targets

__all__ = ["DeadlineExceeded", "Router", "TargetsUnavailable", "all_targets"]
