"""What a reload passes from the runtime it retires to the new one, when both read and write the same data (the
memory store handed on, or the same Redis: URL and key prefix): the run-time keys already found, and what the old
runtime's accounting ledger has not yet got the store to take. And what it leaves behind in the metrics: the gauge
series only the old policy had, and the budget gauges the new one must show afresh."""

from __future__ import annotations

import logging
import math
from typing import Any

from .accounting.gauges import policy_budgets
from .accounting.ledger import Ledger
from .accounting.stage import Accounting
from .auth.dynamic import DynamicKeys
from .policy import Policy
from .routing import all_targets
from .runtime import Runtime
from .store import Store
from .telemetry.metrics import Metrics
from .telemetry.series import drop_child

__all__ = ["bequeath_ledger", "drop_series", "dynamic_keys", "show_budgets"]

log = logging.getLogger("gateway")


def same_data(old: Runtime, new_policy: Policy, new_store: Store) -> bool:
    """Whether a runtime of `new_policy` on `new_store` reads and writes the counters and keys `old` did: the memory
    store it passed on, or the same Redis (URL and key prefix; its timeouts and pool may differ)."""
    before, after = old.policy.state, new_policy.state
    return new_store is old.store or (after.backend == "redis" and (before.backend, before.url, before.key_prefix)
                                      == ("redis", after.url, after.key_prefix))


def dynamic_keys(policy: Policy, store: Store, metrics: Metrics, previous: Runtime | None) -> DynamicKeys | None:
    """The run-time key look-up, only when the policy turns it on (off: authentication never calls the store).
    After a reload onto the same data, it starts with the keys the previous runtime had found."""
    spec = policy.dynamic_keys
    if not spec.enabled:
        return None
    keys = DynamicKeys(spec, store, policy.keys.names, spec.on_unavailable or policy.state.on_unavailable, metrics)
    if previous is not None and previous.dynamic_keys is not None and same_data(previous, policy, store):
        keys.adopt(previous.dynamic_keys)
    return keys


def bequeath_ledger(old: Runtime, new: Runtime) -> None:
    """At a reload onto the same data, what the old runtime's ledger still holds for the store when it closes
    (spend Redis did not take while it was away, operations in doubt, slots owed) passes to the new runtime's
    ledger, which sends it once Redis answers. Onto another store, or to a policy without accounting, the old
    ledger's last flush takes what it can and the rest is counted as dropped (`Ledger.aclose`)."""
    before, after = _ledger(old), _ledger(new)
    if before is not None and after is not None and same_data(old, new.policy, new.store):
        before.bequeath(after)


def _ledger(runtime: Runtime) -> Ledger | None:
    return next((s.ledger for s in runtime.services if isinstance(s, Accounting)), None)


def drop_series(old: Runtime, new: Runtime, metrics: Metrics) -> None:
    """The gauge series `old`'s policy set and `new`'s has no use for, dropped: nothing writes them again, and each
    kept its last value until the process restarted, so the alert on it never cleared (a target the reload removed
    with its breaker open read 2, the Redis it moved off to memory read down, a budget it removed read spent).
    Called at the swap, and again once `old` has retired: its requests and its breakers' syncing may write them
    until then.

    In multiprocess mode prometheus_client cannot remove a series (each worker's value stays in its file, and
    `remove` warns on stderr), so each is set to what its alert reads as fine instead: a breaker closed (0), the
    store up (1), a budget all left (ratio 1, USD +Inf: no limit)."""
    for target in all_targets(old.policy).keys() - all_targets(new.policy).keys():
        _drop(metrics, metrics.breaker_state, (target,), 0.0)
    if old.policy.state.backend != new.policy.state.backend:
        _drop(metrics, metrics.store_up, (old.policy.state.backend,), 1.0)
    for label in policy_budgets(old.policy).keys() - policy_budgets(new.policy).keys():
        _drop(metrics, metrics.budget_remaining, label, math.inf)
        _drop(metrics, metrics.budget_remaining_ratio, label, 1.0)


async def show_budgets(runtime: Runtime) -> None:
    """The budget gauges of `runtime`'s policy read from its store (`Admission.show_budgets`); a failure is
    logged, never raised: the gauges then keep what they showed until each scope's next request."""
    accounting = next((s for s in runtime.services if isinstance(s, Accounting)), None)
    if accounting is None:
        return
    try:
        await accounting.show_budgets()
    except Exception:
        log.exception("policy %s: reading its budgets for their gauges failed", runtime.policy.version)


def _drop(metrics: Metrics, gauge: Any, labels: tuple[str, ...], neutral: float) -> None:
    drop_child(gauge, labels, neutral, metrics.multiprocess)
