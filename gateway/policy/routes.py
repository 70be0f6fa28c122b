"""Compile the routing parts of a policy: aliases and their targets, rules, prices; check what types cannot.

Everything a request's routing reads is decided here, once per load: each alias's
targets with their merged timeouts, retry settings and prices; each rule's
conditions as sets and lower-case header names; which rules can apply to which
alias (so an alias no rule mentions pays nothing for rules). Errors are reported
like every other policy error, with file, line and field, all at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

from .compiled import (
    HealthCheck,
    Match,
    ModelRoute,
    Price,
    PriceTable,
    ProviderConfig,
    RetryPolicy,
    Rule,
    Target,
    Timeouts,
)
from .loader import _Located, format_path
from .schema import MatchSpec, ModelSpec, PolicySpec, PriceSpec, RetrySpec, RuleSpec, TargetSpec

__all__ = ["compile_routing"]

_Path = tuple[str | int, ...]
# How many defined names a message about an unknown one lists (a policy may have thousands of keys).
_NAMES_SHOWN = 10


def compile_routing(
    spec: PolicySpec, doc: _Located, providers: Mapping[str, ProviderConfig],
    file_prices: Mapping[str, PriceSpec] | None = None, warnings: list[str] | None = None,
) -> tuple[dict[str, ModelRoute], tuple[Rule, ...], PriceTable]:
    """Aliases, rules and the price table (`file_prices`, from `prices_file`, under the inline `prices`).
    What may be a mistake but is not certainly one goes to `warnings`."""
    prices = PriceTable({name: Price.of(p) for name, p in {**(file_prices or {}), **spec.prices}.items()})
    routes: dict[str, ModelRoute] = {}
    for alias, model in spec.models.items():
        route = _alias(alias, model, spec, doc, providers, prices)
        if route is not None:
            routes[alias] = route
    rules = tuple(
        rule for index, rule_spec in enumerate(spec.rules)
        if (rule := _rule(index, rule_spec, spec, doc, providers, prices)) is not None
    )
    _check_callers(spec, doc, warnings if warnings is not None else [])
    _check_cycles(spec, doc)
    for alias, route in list(routes.items()):  # attach the rules that can apply to each alias, in order
        applicable = tuple(r for r in rules if r.match.alias is None or alias in r.match.alias)
        if applicable:
            routes[alias] = _with_rules(route, applicable)
    return routes, rules, prices


def _with_rules(route: ModelRoute, rules: tuple[Rule, ...]) -> ModelRoute:
    return ModelRoute(
        route.alias, route.targets, route.strategy, route.sticky, route.explore, route.retry_on,
        route.context_fallback, route.deadline_s, route.description, rules, route.cumulative,
    )


def _alias(
    alias: str, model: ModelSpec, spec: PolicySpec, doc: _Located, providers: Mapping[str, ProviderConfig],
    prices: PriceTable,
) -> ModelRoute | None:
    path: _Path = ("models", alias)
    shorthand = model.provider is not None or model.model is not None
    if shorthand and model.targets:
        doc.issue(path, "give either `provider` and `model` (one target) or `targets`, not both")
        return None
    if shorthand and (model.provider is None or model.model is None):
        missing = "model" if model.model is None else "provider"
        doc.issue(path, f"missing required field `{missing}` (one target needs `provider` and `model`)")
        return None
    if not shorthand and not model.targets:
        doc.issue(path, "missing `provider` and `model` (or a list of `targets`)")
        return None
    retry = model.retry or spec.routing.retry
    if model.retry is not None:
        _check_retry(model.retry, path + ("retry",), doc)
    if shorthand:
        assert model.provider is not None and model.model is not None
        one = TargetSpec(provider=model.provider, model=model.model)
        targets = [_target(one, path, retry, doc, providers, prices, shorthand=True)]
    else:
        targets = [_target(t, path + ("targets", i), retry, doc, providers, prices)
                   for i, t in enumerate(model.targets)]
    if model.context_fallback is not None:
        if model.context_fallback == alias:
            doc.issue(path + ("context_fallback",), "an alias cannot be its own context fallback")
        elif model.context_fallback not in spec.models:
            doc.issue(path + ("context_fallback",), _unknown_alias(model.context_fallback, spec))
    retry_on = model.retry_on if model.retry_on is not None else spec.routing.retry_on
    return _route(
        alias, targets, model.strategy, model.sticky, path, doc, model.explore, frozenset(retry_on),
        model.context_fallback, model.deadline_s or spec.routing.deadline_s, model.description,
    )


def _route(
    alias: str, targets: Sequence[Target | None], strategy: str, sticky: str | None, path: _Path, doc: _Located,
    explore: float = 0.05, retry_on: frozenset[str] = frozenset(), context_fallback: str | None = None,
    deadline_s: float | None = None, description: str = "",
) -> ModelRoute | None:
    if sticky is not None and strategy != "weighted":
        doc.issue(path + ("sticky",), f"`sticky` needs `strategy: weighted` (this one is `{strategy}`)")
    kept = tuple(t for t in targets if t is not None)
    if len(kept) != len(targets):
        return None
    names = [t.name for t in kept]
    for name in {n for n in names if names.count(n) > 1}:
        doc.issue(path + ("targets",), f"target `{name}` is listed twice (one provider and model, once)")
    cumulative: tuple[float, ...] = ()
    if strategy == "weighted":
        total = 0.0
        sums = []
        for target in kept:
            total += target.weight
            sums.append(total)
        if total <= 0:
            doc.issue(path + ("targets",), "the weights of a weighted alias must sum to more than zero")
        cumulative = tuple(sums)
    if strategy == "cost":
        for index, target in enumerate(kept):
            if target.price is None:
                where = path + ("targets", index) if len(kept) > 1 or "targets" in path else path
                doc.issue(where, f"`strategy: cost` needs a price for `{target.name}`: a `price` on the target "
                                 f"or an entry in `prices` (`{target.upstream_model}` or `{target.name}`)")
    return ModelRoute(alias, kept, strategy, sticky, explore, retry_on, context_fallback, deadline_s, description,
                      (), cumulative)


def _target(
    spec: TargetSpec, path: _Path, retry: RetrySpec, doc: _Located, providers: Mapping[str, ProviderConfig],
    prices: PriceTable, *, shorthand: bool = False,
) -> Target | None:
    provider = providers.get(spec.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "none"
        doc.issue(path + ("provider",), f"unknown provider `{spec.provider}` (defined: {known})")
        return None
    if spec.retry is not None:
        _check_retry(spec.retry, path + ("retry",), doc)
        retry = spec.retry
    name = f"{spec.provider}/{spec.model}"
    price = Price.of(spec.price) if spec.price else prices.price(spec.provider, spec.model)
    if price is not None:
        price = price.for_kind(provider.kind)  # (Anthropic's own rate for 1-hour cache writes, unless it says)
    timeouts = None
    if spec.timeouts is not None:
        base, over = provider.timeouts, spec.timeouts
        timeouts = Timeouts(over.connect_s or base.connect_s, over.first_byte_s or base.first_byte_s,
                            over.idle_s or base.idle_s, over.total_s or base.total_s)
        if timeouts.first_byte_s > timeouts.total_s or timeouts.connect_s > timeouts.total_s:
            doc.issue(path + ("timeouts",), "connect_s and first_byte_s must not exceed total_s")
    check = spec.health_check
    return Target(
        name=name,
        provider=spec.provider,
        upstream_model=spec.model,
        weight=spec.weight,
        retry=RetryPolicy(retry.attempts, retry.backoff_s, retry.backoff_max_s, retry.retry_after_max_s),
        price=price,
        timeouts=timeouts,
        extra_body=MappingProxyType(dict(spec.extra_body)),
        health_check=HealthCheck(check.interval_s, check.timeout_s) if check else None,
        header=(b"x-gateway-target", _header_value(name)),
    )


def _header_value(text: str) -> bytes:
    """A header-safe spelling of a policy name (printable latin-1; anything else becomes `?`)."""
    return "".join(c if c.isprintable() and ord(c) < 256 else "?" for c in text).encode("latin-1")


def _check_retry(retry: RetrySpec, path: _Path, doc: _Located) -> None:
    if retry.backoff_s > retry.backoff_max_s:
        doc.issue(path + ("backoff_s",), "backoff_s must not exceed backoff_max_s")


def _rule(
    index: int, spec: RuleSpec, policy: PolicySpec, doc: _Located, providers: Mapping[str, ProviderConfig],
    prices: PriceTable,
) -> Rule | None:
    path: _Path = ("rules", index)
    actions = [name for name in ("alias", "targets", "deny") if getattr(spec, name) is not None]
    if len(actions) != 1:
        doc.issue(path, "a rule needs exactly one of `alias`, `targets` or `deny`"
                        + (f" (it has {', '.join(actions)})" if actions else ""))
        return None
    names = [r.name for r in policy.rules]
    if names.count(spec.name) > 1 and names.index(spec.name) != index:
        doc.issue(path + ("name",), f"rule name `{spec.name}` is used twice")
    match = _match(spec.when, path + ("when",), policy, doc)
    if spec.alias is not None:
        if spec.alias not in policy.models:
            doc.issue(path + ("alias",), _unknown_alias(spec.alias, policy))
            return None
        return Rule(spec.name, match, alias=spec.alias)
    if spec.deny is not None:
        return Rule(spec.name, match, deny=spec.deny)
    assert spec.targets is not None
    if not spec.targets:
        doc.issue(path + ("targets",), "a rule's target list cannot be empty")
        return None
    retry = policy.routing.retry
    targets = [_target(t, path + ("targets", i), retry, doc, providers, prices) for i, t in enumerate(spec.targets)]
    route = _route(f"rule:{spec.name}", targets, spec.strategy, spec.sticky, path, doc,
                   retry_on=frozenset(policy.routing.retry_on), deadline_s=policy.routing.deadline_s)
    return None if route is None else Rule(spec.name, match, route=route)


def _match(spec: MatchSpec, path: _Path, policy: PolicySpec, doc: _Located) -> Match:
    for alias in spec.alias or ():
        if alias not in policy.models:
            doc.issue(path + ("alias",), _unknown_alias(alias, policy))
    for field in ("alias", "tenant", "key", "user"):
        if getattr(spec, field) == []:
            doc.issue(path + (field,), "an empty list matches nothing: the rule could never apply (leave the "
                                       "condition out to match any)")
    for field, group in (("header", spec.header or {}), ("metadata", spec.metadata or {})):
        for name, values in group.items():
            if values == []:
                doc.issue(path + (field, name), "an empty list matches nothing: the rule could never apply (`[\"*\"]`: "
                                                "present with any value)" if field == "header" else
                          "an empty list matches nothing: the rule could never apply")
    over, under = spec.prompt_tokens_over, spec.prompt_tokens_under
    if over is not None and under is not None and over + 1 >= under:
        doc.issue(path + ("prompt_tokens_under",), "no token count is both over `prompt_tokens_over` and under this")
    headers = tuple(
        (name.lower().encode("latin-1"), None if "*" in values else frozenset(values))
        for name, values in (spec.header or {}).items()
    )
    return Match(
        alias=_set(spec.alias), tenant=_set(spec.tenant), key=_set(spec.key), headers=headers, user=_set(spec.user),
        metadata=tuple((k, frozenset(v)) for k, v in (spec.metadata or {}).items()),
        prompt_tokens_over=over, prompt_tokens_under=under, has_tools=spec.has_tools,
        has_images=spec.has_images, json_response=spec.json_response,
    )


def _check_callers(policy: PolicySpec, doc: _Located, warnings: list[str]) -> None:
    """A rule's `when.key` or `when.tenant` naming no caller the policy has: a typo that turns the rule off (a
    `deny` fencing off one key then lets it through). An error when no caller can carry the name; a warning with
    `dynamic_keys`, whose keys, made at run time, may. With `auth: none` every caller is `anonymous`, keyless."""
    keyed = policy.auth == "keys"
    keys = {key.name or f"key-{index}" for index, key in enumerate(policy.keys)} if keyed else set()
    tenants = {key.tenant for key in policy.keys} if keyed else {"anonymous"}
    for index, rule in enumerate(policy.rules):
        for field, defined, wanted in (("key", keys, rule.when.key), ("tenant", tenants, rule.when.tenant)):
            unknown = ", ".join(f"`{name}`" for name in sorted(set(wanted or ()) - defined))
            if not unknown:
                continue
            message = (f"no key of the policy is named {unknown} (keys: {_listed(keys)})" if field == "key" else
                       f"no key of the policy has the tenant {unknown} (tenants: {_listed(tenants)})")
            where: _Path = ("rules", index, "when", field)
            if policy.dynamic_keys.enabled:
                warnings.append(f"{doc.where(where)}: {format_path(doc.shown(where))}: {message}; keys created at "
                                "run time may carry it")
            else:
                doc.issue(where, f"{message}: no caller can carry it, so the rule never applies")


def _listed(names: set[str]) -> str:
    """Up to `_NAMES_SHOWN` of `names`, sorted, and how many more."""
    shown = sorted(names)[:_NAMES_SHOWN]
    more = f" and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return (", ".join(shown) or "none") + more


def _set(values: list[str] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)


def _unknown_alias(alias: str, policy: PolicySpec) -> str:
    return f"unknown model alias `{alias}` (defined: {', '.join(sorted(policy.models)) or 'none'})"


def _check_cycles(spec: PolicySpec, doc: _Located) -> None:
    """A loop between aliases through rules or `context_fallback` is a mistake even where the gateway
    would not loop (rules run once per request): report it with the field that closes it."""
    edges: dict[str, list[tuple[str, _Path]]] = {alias: [] for alias in spec.models}
    for alias, model in spec.models.items():
        if model.context_fallback in edges and model.context_fallback != alias:
            edges[alias].append((model.context_fallback, ("models", alias, "context_fallback")))
    for index, rule in enumerate(spec.rules):
        if rule.alias not in edges:
            continue
        sources = rule.when.alias if rule.when.alias is not None else list(spec.models)
        for source in sources:
            if source in edges and source != rule.alias:
                edges[source].append((rule.alias, ("rules", index, "alias")))
    reported: set[_Path] = set()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(alias: str, trail: list[str]) -> None:
        state[alias] = 1
        trail = [*trail, alias]
        for successor, where in edges[alias]:
            if state.get(successor) == 1:
                if where not in reported:
                    reported.add(where)
                    loop = [*trail[trail.index(successor):], successor]
                    doc.issue(where, "a cycle between aliases: " + " -> ".join(loop))
            elif successor not in state:
                visit(successor, trail)
        state[alias] = 2

    for alias in edges:
        if alias not in state:
            visit(alias, [])
