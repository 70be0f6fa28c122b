"""What a reload passes from the runtime it retires to the new one, when both read and write the same data (the
memory store handed on, or the same Redis: URL and key prefix): the run-time keys already found, and what the old
runtime's accounting ledger has not yet got the store to take."""

from __future__ import annotations

from .accounting.ledger import Ledger
from .accounting.stage import Accounting
from .auth.dynamic import DynamicKeys
from .policy import Policy
from .runtime import Runtime
from .store import Store
from .telemetry.metrics import Metrics

__all__ = ["bequeath_ledger", "dynamic_keys"]


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
