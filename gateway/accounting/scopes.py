"""Who a request is limited and billed as: its key, its key's tenant, the alias it asked for (and an alias it
reaches by a hop: `hops`).

Limits and budgets of the key come from the `VirtualKey` the request authenticated with (filled from the
policy for static keys, by the admin API for keys made at run time), never from the policy's key list.
"""

from __future__ import annotations

from ..auth.keys import VirtualKey
from ..pipeline.context import RequestContext
from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..policy.compiled import ModelRoute, Policy
from ..store._common import to_units
from .gauges import BudgetLeft
from .outright import reach_rates
from .periods import PeriodKeys

__all__ = ["OTHER", "BoundedLabels", "Scope", "ScopeIndex", "Scopes", "hop_scopes", "may_hop", "scopes_of"]

OTHER = "other"


class Scope:
    """One scope's limits and budget, with the store keys it counts under (made once, not per request)."""

    __slots__ = ("budget", "budget_cap", "budget_keys", "budget_left", "kind", "limits", "name", "rpm", "rpm_cap",
                 "rpm_key", "shown", "slot_key", "tpm_cap", "tpm_key")

    def __init__(self, kind: str, name: str, limits: LimitSpec | None, budget: BudgetSpec | None,
                 counted: str | None = None) -> None:
        self.kind = kind  # "key", "tenant" or "model"
        self.name = name  # (its metrics' label)
        # The caller's own (its key's, its tenant's) windows are what the `x-ratelimit-*` headers show; an alias's is
        # every tenant's traffic together, which no tenant may read: it shows only in the 429 it causes.
        self.shown = kind != "model"
        self.limits = limits
        self.budget = budget
        # What its counters are kept under: its name, or a key made at run time's id (`counted`): a new key that
        # takes a revoked one's name starts from nothing, and a rotated key (the same id) goes on.
        counted = counted or name
        self.slot_key = f"acct:conc:{kind}:{counted}"
        self.rpm_key = f"acct:rpm:{kind}:{counted}"
        self.tpm_key = f"acct:tpm:{kind}:{counted}"
        self.budget_keys = PeriodKeys(f"acct:budget:{kind}:{counted}:", budget) if budget is not None else None
        self.budget_left: BudgetLeft | None = None  # its gauges, once the accounting stage looked them up
        # The limits in the store's integer millionths (`to_units`), converted once for the in-process store's
        # integer operations (`MemoryStore.reserve_units_now`...); 0 where there is no such limit.
        self.rpm = limits.rpm if limits is not None and limits.rpm else 0
        self.rpm_cap = to_units(self.rpm, "limit")
        self.tpm_cap = to_units(limits.tpm, "limit") if limits is not None and limits.tpm else 0
        self.budget_cap = to_units(budget.usd, "limit") if budget is not None else 0

    def __repr__(self) -> str:
        return f"Scope({self.kind!r}, {self.name!r})"


class Scopes:
    """The scopes of one request, and what follows from them alone (looked up, not rebuilt, per request)."""

    __slots__ = ("_key_budget", "_key_limits", "_tenant", "all", "budgeted", "hops", "limited", "model",
                 "needs_tokens", "rates", "rpm_only")

    def __init__(self, scopes: list[Scope], key: VirtualKey | None, route: ModelRoute | None = None,
                 rates: tuple[float, float] = (0.0, 0.0), hops: bool = False) -> None:
        self.all = scopes
        self.hops = hops  # a rule or a context fallback may take it to an alias with limits (`may_hop`)
        self.limited = [s for s in scopes if s.limits is not None]
        self.budgeted = [s for s in scopes if s.budget is not None]
        # A reservation's size (prompt estimate, completion cap) is needed by budgets and token windows only.
        self.needs_tokens = bool(self.budgeted) or any(s.limits is not None and s.limits.tpm for s in self.limited)
        # Every limit a requests-per-minute one (the usual case): the stage's shorter loop.
        self.rpm_only = bool(self.limited) and all(s.limits is not None and s.limits.rpm and not s.limits.tpm
                                                   and not s.limits.concurrent for s in self.limited)
        # What follows from the alias (`route`: the one these scopes were made for): the model whose encoding
        # sizes the prompt, and the dearest rates of the targets it may reach (`rates`, from `reach_rates`): a
        # reservation must cover any of them.
        self.model = route.upstream_model if route is not None else None
        self.rates = rates
        # What the key said when these were made: a key record changed at run time no longer matches.
        self._key_limits = key.limits if key is not None else None
        self._key_budget = key.budget if key is not None else None
        self._tenant = key.tenant if key is not None else None

    def made_for(self, key: VirtualKey | None) -> bool:
        if key is None:
            return self._tenant is None
        return key.limits is self._key_limits and key.budget is self._key_budget and key.tenant == self._tenant


class ScopeIndex:
    """`scopes_of` for a running policy: each (key, alias) pair's `Scopes` made once and kept (at most `cap`
    pairs; past that, made per request). Tenants' and aliases' limits are the policy's and never change;
    a key's are re-read when its record is another (a run-time key updated by the admin API)."""

    __slots__ = ("_cap", "_found", "_hops", "_policy", "rates")

    def __init__(self, policy: Policy, cap: int = 10_000) -> None:
        self._policy = policy
        self._hops = may_hop(policy)
        self.rates = reach_rates(policy.models)  # by alias: the dearest a request for it may reach
        self._cap = cap
        self._found: dict[tuple[str | None, str], Scopes] = {}

    def of(self, ctx: RequestContext) -> Scopes:
        key = ctx.key
        pair = (key.name if key is not None else None, ctx.alias_label)
        found = self._found.get(pair)
        if found is not None and (found.made_for(key) if key is None else  # `made_for`, in line for a key
                                  key.limits is found._key_limits and key.budget is found._key_budget
                                  and key.tenant == found._tenant):
            return found
        found = Scopes(scopes_of(ctx, self._policy), key, ctx.route, self.rates.get(ctx.alias_label, (0.0, 0.0)),
                       ctx.alias_label in self._hops)
        if pair in self._found or len(self._found) < self._cap:
            self._found[pair] = found
        return found


    def budgeted(self) -> list[Scope]:
        """The budgeted scopes of the requests seen (`of`), with repeats (one per alias a key asked for)."""
        return [scope for scopes in list(self._found.values()) for scope in scopes.budgeted]


def scopes_of(ctx: RequestContext, policy: Policy) -> list[Scope]:
    """Every scope with a limit or a budget that applies to this request (maybe none)."""
    scopes: list[Scope] = []
    key = ctx.key
    if key is not None:
        if key.limits is not None or key.budget is not None:
            scopes.append(Scope("key", key.name, key.limits, key.budget, key.key_id))
        tenant = policy.tenants.get(key.tenant)
        if tenant is not None and (tenant.limits is not None or tenant.budget is not None):
            scopes.append(Scope("tenant", key.tenant, tenant.limits, tenant.budget))
    alias = ctx.alias_label
    limits, budget = policy.alias_limits.get(alias), policy.alias_budgets.get(alias)
    if limits is not None or budget is not None:
        scopes.append(Scope("model", alias, limits, budget))
    return scopes


def hop_scopes(policy: Policy) -> dict[str, Scope]:
    """Every alias with limits, as the scope a request that reaches it by a hop takes (`hops`): the counters a
    request naming it counts under."""
    return {alias: Scope("model", alias, limits, None) for alias, limits in policy.alias_limits.items()}


def may_hop(policy: Policy) -> frozenset[str]:
    """The aliases from which a request may reach, by a rule or a context fallback (followed through), an alias with
    limits other than itself: such a request has a bill (`hops`) even when no limit or budget of its own applies.
    (A downgrade comes from a budget, and a budgeted request has its bill.)"""
    limited = frozenset(policy.alias_limits)
    found: set[str] = set()
    for alias, route in policy.models.items():
        todo = [rule.alias for rule in route.rules if rule.alias is not None]
        if route.context_fallback is not None:
            todo.append(route.context_fallback)
        reached: set[str] = set()
        while todo:
            hop = todo.pop()
            if hop not in reached:
                reached.add(hop)
                after = policy.models.get(hop)
                if after is not None and after.context_fallback is not None:
                    todo.append(after.context_fallback)
        if (reached - {alias}) & limited:
            found.add(alias)
    return frozenset(found)


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
