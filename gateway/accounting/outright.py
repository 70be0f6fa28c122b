"""What the accounting stage decides before any counter is read: the request's size, and refusals that
no counter can change.

A request reserves its prompt estimate plus its completion cap on every tokens-per-minute window, and its
largest possible cost on every budget. One that needs more than a whole window or a whole hard budget is
refused on an empty counter too, so `gateway explain`/`gateway test` can say so offline. The stage and the
decider share the request's size (`completion_cap`); `refused_outright` is the decider's, comparing as the stage
does (a cost in the store's whole millionths, `to_units`) so that the two cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..schemas.endpoints import Endpoint
from ..schemas.openai import MAX_USAGE_TOKENS, listed_prompts
from ..store._common import to_units

__all__ = ["MAX_TOKENS", "completion_cap", "endpoint_named", "max_rates", "reach_rates", "refused_outright",
           "requested_cap"]

_CHAT, _COMPLETIONS, _RESPONSES = Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES

MAX_TOKENS = MAX_USAGE_TOKENS  # the most tokens one count may hold (`Usage.usable`)
"""The most tokens one request is reserved, or billed, in one count: 10x the largest context window, with room
for `n` and batched embeddings. A larger `max_tokens` is reserved as this (so that a hard budget or a token
limit refuses it, and no amount reaches the store that it cannot keep); a larger count in an upstream's usage
is an upstream's error (settling.py `usable`). Twice this, in the store's millionths, is exact."""


def requested_cap(body: dict[str, Any], endpoint: Endpoint | None = None) -> int | None:
    """The completion tokens a request allows itself, in the field the API it came in by honours: a chat's
    `max_completion_tokens` (else, when it is absent or null, `max_tokens`) times `n`; a completion's `max_tokens`
    times `n` (or `best_of`, if more) and the number of prompts it lists; a Responses request's
    `max_output_tokens`. At most `MAX_TOKENS`; None when it sets none.

    Read by `endpoint`, never by the fields a body has: an upstream ignores a field its API lacks and would not
    stop at it (`max_completion_tokens: 1` beside a completion's real `max_tokens` was reserved as 1, and its
    stream never cut). `endpoint` None: the API the body's fields name (`endpoint_named`; an `input` the Responses
    API's, as embeddings ask for no cap), for a caller that does not know it."""
    if endpoint is None:
        endpoint = endpoint_named(body)
        endpoint = _RESPONSES if endpoint is Endpoint.EMBEDDINGS else endpoint
    if endpoint is _CHAT:
        cap = body.get("max_completion_tokens")
        if cap is None:
            cap = body.get("max_tokens")  # (as the translations and `with_max_completion_tokens` read them)
    elif endpoint is _COMPLETIONS:
        cap = body.get("max_tokens")
    elif endpoint is _RESPONSES:
        cap = body.get("max_output_tokens")
    else:
        return None  # embeddings generate nothing
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        return None
    if endpoint is _CHAT:
        cap *= _count(body.get("n"))
    elif endpoint is _COMPLETIONS:
        cap *= max(_count(body.get("n")), _count(body.get("best_of")))  # `best_of` answers are generated and billed
        cap *= len(listed_prompts(body.get("prompt")))  # a completion (or `n`) for each prompt listed
    return cap if cap <= MAX_TOKENS else MAX_TOKENS


def endpoint_named(body: dict[str, Any]) -> Endpoint:
    """The API a body's own fields name (a list of `messages` chat; a `prompt` completions, unless an object: a
    Responses template; `input` with `instructions` or items the Responses API, else embeddings): only for a
    caller that does not know the endpoint it came in by (a unit test); the gateway passes its own, as a body may
    carry any field."""
    if isinstance(body.get("messages"), list):
        return _CHAT
    if "prompt" in body and not isinstance(body["prompt"], dict):
        return _COMPLETIONS
    given, instructions = body.get("input"), body.get("instructions")
    if (isinstance(instructions, str) and instructions) or (
            isinstance(given, list) and given and type(given[0]) is dict):
        return _RESPONSES
    return Endpoint.EMBEDDINGS


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 1 else 1


def completion_cap(streams: bool, body: dict[str, Any], default: int, endpoint: Endpoint | None = None
                   ) -> tuple[int, bool]:
    """(the completion tokens reserved, whether the request set them); embeddings (no stream) generate none."""
    cap = 0 if not streams else requested_cap(body, endpoint)
    return (cap, True) if cap is not None else (default, False)


def max_rates(targets: Any) -> tuple[float, float]:
    """The dearest input and output rates among an alias's targets (a reservation must cover any of them)."""
    rate_in = rate_out = 0.0
    for target in targets:
        price = target.price
        if price is not None:
            rate_in = max(rate_in, price.input_per_mtok, price.cache_write_per_mtok or 0.0,
                          price.cache_write_1h_per_mtok or 0.0)  # (an Anthropic prompt written to the 1-hour cache)
            rate_out = max(rate_out, price.output_per_mtok, price.reasoning_per_mtok or 0.0)
    return rate_in, rate_out


def reach_rates(models: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """By alias, `max_rates` over every target a request for it may reach: its own targets, those of each rule
    that may send it elsewhere (a target list, or an alias with that alias's reach), and its context fallback's,
    followed through. The rules are decided after the reservation (`SelectTarget`): reserved at the asked
    alias's rates alone, a request a rule sent to a dearer model overran a hard budget by their ratio."""

    def targets(alias: str, seen: set[str]) -> Iterator[Any]:
        route = models.get(alias)
        if route is None or alias in seen:
            return
        seen.add(alias)
        yield from route.targets
        for rule in route.rules:
            if rule.route is not None:
                yield from rule.route.targets
            if rule.alias is not None:
                yield from targets(rule.alias, seen)
        if route.context_fallback is not None:
            yield from targets(route.context_fallback, seen)

    return {alias: max_rates(list(targets(alias, set()))) for alias in models}


def refused_outright(
    scopes: Iterable[tuple[str, str, LimitSpec | None, BudgetSpec | None]], tokens: int, cost_usd: float,
) -> tuple[str, str, str] | None:
    """(what, scope kind, scope name) of the first limit (`tpm`) or hard budget (`budget`) that `tokens` or
    `cost_usd` exceeds on its own, whatever is already counted; None when only live counters could refuse."""
    scopes = list(scopes)
    for kind, name, limits, _ in scopes:  # the stage asks every limit before any budget
        if limits is not None and limits.tpm and tokens > limits.tpm:
            return "tpm", kind, name
    for kind, name, _, budget in scopes:
        if budget is not None and budget.mode == "hard" and to_units(cost_usd) > to_units(budget.usd):
            return "budget", kind, name
    return None
