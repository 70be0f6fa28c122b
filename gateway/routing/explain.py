"""`gateway route`: which rule a request matches and the order its targets would be tried, offline.

Nothing is sent: the policy is compiled as for serving, the request decoded as the
endpoint would, and `route_plan` (the same rules and strategies that
serve traffic) orders the targets. Breakers read as closed and latency and load as
unknown, since an offline command sees no traffic; a weighted alias without a
sticky key shows one random draw and the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from ..errors import NoRoute
from ..pipeline.stages import authenticate, decode_body, model_not_found
from ..policy.compiled import ModelRoute, Policy, Target
from ..schemas.endpoints import Endpoint
from ..telemetry.metrics import Metrics
from ..telemetry.tokens import TokenCounter
from .router import Router
from .rules import Facts, first_match
from .strategies import order_targets

__all__ = ["explain_route", "route_plan", "wire_headers"]


def wire_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Headers given as text (`--header`, a case file), as the served gateway receives them from a client: the
    bytes a client sends, UTF-8, which the rules then read as UTF-8 (`Facts.header`). So a rule matches the same
    requests in a dry run as when serving."""
    return [(_wire(name.strip().lower()), _wire(value.strip())) for name, value in headers]


def _wire(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")  # a command line's undecodable bytes: the bytes as given
    except UnicodeEncodeError:  # a lone surrogate from a YAML escape: no client could send it
        return text.encode("utf-8", "replace")


def explain_route(
    policy: Policy, raw: bytes, key: str | None = None, headers: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """The report's lines; raises `GatewayError` (as the gateway would answer) for a refused request."""
    endpoint = _endpoint(raw)
    body, _ = decode_body(raw, endpoint)
    virtual_key = authenticate(policy, key)
    alias = body["model"]
    if alias not in policy.models or (virtual_key is not None and not virtual_key.allows(alias)):
        raise model_not_found(alias)
    tokens = TokenCounter()
    if any(rule.match.needs_tokens for rule in policy.rules):
        tokens.load(route.upstream_model for route in policy.models.values())
    facts = Facts(body, virtual_key, wire_headers(headers), tokens, policy.models[alias].upstream_model,
                  endpoint=endpoint)
    router = Router(policy, {}, None, Metrics(), tokens)
    stream = body.get("stream") is True
    rule, route, order = route_plan(router, facts, alias, stream, endpoint)
    lines = [
        f"endpoint: /v1/{endpoint.path}" + (" (streamed)" if stream else ""),
        f"alias: {alias}" + (f"  (tenant {virtual_key.tenant}, key {virtual_key.name})" if virtual_key else ""),
        f"rule: {rule or 'none matched'}",
        f"route: {route.alias}  strategy: {route.strategy}{_strategy_note(route, facts)}",
        f"retry_on: {', '.join(sorted(route.retry_on)) or 'nothing'}"
        + (f"  context_fallback: {route.context_fallback}" if route.context_fallback else "")
        + (f"  deadline: {route.deadline_s:g} s" if route.deadline_s else ""),
        "candidates, in the order they would be tried:",
    ]
    if any(rule.match.needs_tokens for rule in policy.models[alias].rules):
        lines.insert(3, f"prompt tokens: {facts.prompt_tokens}" + ("" if tokens.exact else " (estimated)"))
    for index, target in enumerate(order, 1):
        lines.append(f"  {index}. {target.name}{_target_note(route, target)}")
    lines.append("(offline: breakers read as closed, latency and load as unknown; nothing was sent)")
    return lines


def _endpoint(raw: bytes) -> Endpoint:
    try:
        data: Any = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # (msgspec: RecursionError past ~1,000 levels of nesting)
        return Endpoint.CHAT  # decode_body reports it
    if isinstance(data, dict) and "messages" not in data:
        if "input" in data:
            return Endpoint.RESPONSES if _responses(data) else Endpoint.EMBEDDINGS
        if "prompt" in data:
            return Endpoint.COMPLETIONS
    return Endpoint.CHAT


# A Responses request's own fields (an embeddings request has `input` too, but none of these).
_RESPONSES_FIELDS = frozenset({"instructions", "previous_response_id", "conversation", "text", "reasoning", "tools",
                               "tool_choice", "store", "stream", "max_output_tokens", "include", "background"})


def _responses(data: dict[str, Any]) -> bool:
    """Whether a body with `input` is a Responses request, not an embeddings one: a field only Responses has, or
    items (objects) in `input`, where embeddings take texts and token ids."""
    items = data.get("input")
    return not _RESPONSES_FIELDS.isdisjoint(data) or (
        isinstance(items, list) and any(isinstance(item, dict) for item in items))


def _strategy_note(route: ModelRoute, facts: Facts) -> str:
    if route.strategy != "weighted":
        return ""
    if route.sticky is None:
        return "  (one random draw by weight; each request draws again)"
    value = facts.sticky_value(route.sticky)
    return f"  (sticky on {route.sticky}: " + (f"{value!r})" if value is not None else "absent: drawn at random)")


def _target_note(route: ModelRoute, target: Target) -> str:
    notes = []
    if route.strategy == "weighted":
        notes.append(f"weight {target.weight:g}")
    if target.price is not None:
        notes.append(f"${target.price.input_per_mtok:g}/${target.price.output_per_mtok:g} per Mtok")
    if target.retry.attempts:
        notes.append(f"{target.retry.attempts} {'retry' if target.retry.attempts == 1 else 'retries'}")
    return f"  ({', '.join(notes)})" if notes else ""



def route_plan(router: Router, facts: Facts, alias: str, stream: bool, endpoint: Endpoint | None = None
               ) -> tuple[str | None, ModelRoute, Sequence[Target]]:
    """The rule that matches and the candidate order, as `Router.select` decides them (for `endpoint`: only the
    targets that serve it, when some do), without sending anything (`gateway route`, `explain`, `test`)."""
    route = router.policy.models[alias]
    rule = first_match(route.rules, alias, facts) if route.rules else None
    if rule is not None and rule.deny is not None:
        raise NoRoute(rule.deny)
    if rule is not None:
        route = rule.route if rule.route is not None else router.policy.models[rule.alias or alias]
    order = order_targets(route, facts, router.stats, stream, router.rng)
    return (rule.name if rule else None), route, router.serving(endpoint, order) if endpoint is not None else order
