"""Who a request is limited and billed as: its key, its key's tenant, the alias it asked for.

Limits and budgets of the key come from the `VirtualKey` the request authenticated with (filled from the
policy for static keys, by the admin API for keys made at run time), never from the policy's key list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline.context import RequestContext
from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..policy.compiled import Policy

__all__ = ["OTHER", "BoundedLabels", "Scope", "scopes_of"]

OTHER = "other"


@dataclass(frozen=True, slots=True)
class Scope:
    kind: str  # "key", "tenant" or "model"
    name: str
    limits: LimitSpec | None
    budget: BudgetSpec | None


def scopes_of(ctx: RequestContext, policy: Policy) -> list[Scope]:
    """Every scope with a limit or a budget that applies to this request (maybe none)."""
    scopes: list[Scope] = []
    key = ctx.key
    if key is not None:
        if key.limits is not None or key.budget is not None:
            scopes.append(Scope("key", key.name, key.limits, key.budget))
        tenant = policy.tenants.get(key.tenant)
        if tenant is not None and (tenant.limits is not None or tenant.budget is not None):
            scopes.append(Scope("tenant", key.tenant, tenant.limits, tenant.budget))
    alias = ctx.alias_label
    limits, budget = policy.alias_limits.get(alias), policy.alias_budgets.get(alias)
    if limits is not None or budget is not None:
        scopes.append(Scope("model", alias, limits, budget))
    return scopes


class BoundedLabels:
    """Metric label values for tenants and keys: the policy's own names, plus at most `cap` others
    (keys made at run time, tenants only they name) first come, first served; the rest read `other`."""

    __slots__ = ("_cap", "_known", "_seen")

    def __init__(self, policy: Policy, cap: int) -> None:
        self._known = policy.tenant_names | policy.key_names | frozenset(policy.models)
        self._cap = cap
        self._seen: set[str] = set()

    def tenant(self, name: str) -> str:
        return self._bounded(name)

    def name(self, scope: Scope) -> str:
        return scope.name if scope.kind == "model" else self._bounded(scope.name)

    def _bounded(self, name: str) -> str:
        if name in self._known or name in self._seen:
            return name
        if len(self._seen) < self._cap:
            self._seen.add(name)
            return name
        return OTHER
