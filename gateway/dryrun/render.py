"""`gateway explain`'s text: one line per kind of decision, in pipeline order."""

from __future__ import annotations

from .decisions import AppliedBudget, AppliedLimit, Decisions

__all__ = ["render"]


def render(d: Decisions, source: str) -> list[str]:
    lines = [f"policy:   {source} (version {d.policy_version})",
             f"request:  /v1/{d.endpoint}" + (f"  model {d.alias}" if d.alias else "") + ("  (streamed)" if d.stream
                                                                                           else "")]
    if d.auth is not None:
        a = d.auth
        who = {"anonymous": "anonymous (auth: none)", "refused": "no valid key"}.get(
            a.caller, f"key {a.key}, tenant {a.tenant}")
        lines.append(f"auth:     {who}" + ("" if d.alias is None else
                                          f"; {'may' if a.allowed else 'may not'} use {d.alias}"))
    if d.limits is not None:
        applied = [_limit(limit) for limit in d.limits.limits] + [_budget(b) for b in d.limits.budgets]
        lines.append("limits:   " + ("; ".join(applied) if applied else "none apply"))
        if d.limits.tokens or d.limits.max_usd:
            lines.append(f"          reserves {d.limits.tokens} tokens, ${d.limits.max_usd:.6f} at most"
                         + (f"; more than the whole {d.limits.refused}: refused whatever is counted"
                            if d.limits.refused else "; what is already counted decides (not read offline)"))
    if d.guards is not None:
        each = ", ".join(f"{g.guard}: {g.verdict}" + (f" [{' '.join(g.types)}]" if g.types else "")
                         + (" (shadow)" if g.mode == "shadow" else "") for g in d.guards.guards)
        lines.append(f"guards:   {d.guards.verdict}  ({each})")
    if d.cache is not None:
        c = d.cache
        lookup = ("yes, exact and semantic" if c.semantic else "yes, exact") if c.lookup else "no"
        lines.append(f"cache:    lookup {lookup}, store {'yes' if c.store else 'no'}"
                     + (f" ({c.reason})" if c.reason else ""))
    if d.route is not None:
        r = d.route
        lines.append(f"route:    rule {r.rule} denies: {r.denied}" if r.denied else
                     f"route:    {'rule ' + r.rule if r.rule else 'no rule matched'} -> {r.route} ({r.strategy})")
    if d.targets is not None:
        order = "  ".join(f"{i}. {name}" for i, name in enumerate(d.targets.order, 1))
        note = "" if d.targets.deterministic else "  (the order depends on chance or live traffic)"
        lines.append(f"targets:  {order}{note}")
    if d.blocked:
        # Refused by limits after the cache's lookup (the limits of the alias a rule moves it to, taken at the route):
        # an answer the store holds would be served before that refusal.
        first = " (unless the cache answers it first)" if d.blocked_by == "limits" and d.route is not None \
            and d.cache is not None and d.cache.lookup else ""
        lines.append(f"outcome:  refused with {d.status} by {d.blocked_by}: {d.error}{first}")
    else:
        lines.append("outcome:  sent to the first target")
    lines.append("(offline: nothing was sent; breakers read as closed, latency and load as unknown)")
    return lines


def _limit(limit: AppliedLimit) -> str:
    parts = [f"{name} {value}" for name, value in (("rpm", limit.rpm), ("tpm", limit.tpm),
                                                   ("concurrent", limit.concurrent)) if value is not None]
    by = f" (by rule {limit.by_rule})" if limit.by_rule is not None else ""
    return f"{limit.scope} {limit.name}{by}: {', '.join(parts) or 'no rate limit'}"


def _budget(budget: AppliedBudget) -> str:
    text = f"{budget.scope} {budget.name}: budget ${budget.usd:g}/{budget.period} ({budget.mode})"
    if budget.downgrade_alias:
        text += f", past {budget.downgrade_at:.0%} -> {budget.downgrade_alias}"
    return text
