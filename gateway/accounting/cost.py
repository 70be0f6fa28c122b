"""What one request cost: its answer's usage at the answering target's prices, and the usage of every answer the
gateway refused on the way (`RequestContext.rejected`) at the prices of the target that gave it.

A request that never reached an upstream (refused, a cache hit) cost nothing upstream; one whose target has
no price counts as 0 and is flagged (`gateway_cost_unpriced_total`, and a warning when the policy loads).
An answer the gateway refused (Gemini's `MALFORMED_FUNCTION_CALL`, ...: a 502 that routing retries or falls
back from) was generated and billed upstream: it counts, whether a later attempt answered or the request ended
in the error.
Writes to Anthropic's 1-hour prompt cache are part of the cache writes, billed at their own rate
(`Price.cost`); an answer without cache reads or writes never looks at them.
"""

from __future__ import annotations

from ..pipeline.context import RequestContext
from ..schemas.openai import Usage

__all__ = ["rejected_tokens", "request_cost", "usage_cost"]


def usage_cost(ctx: RequestContext, usage: Usage | None) -> float | None:
    """USD for `usage` at the prices of the target that answered; None when no target has a price."""
    target = ctx.target
    if target is None or not ctx.upstream_started or usage is None:
        return 0.0
    price = target.price
    if price is None:
        return None
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    given, made = usage.prompt_tokens_details, usage.completion_tokens_details
    if (prompt >= 0 and completion >= 0 and (given is None or not (given.cached_tokens or given.cache_write_tokens))
            and (made is None or not made.reasoning_tokens)):
        # Every token plain (the usual answer): `Price.cost`'s figure without its clamps, whose other terms
        # are all 0 here (adding 0.0 leaves a sum as it was: the same float; a test checks).
        return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1_000_000
    return price.cost(prompt, completion, usage.cached_tokens, usage.cache_write_tokens, usage.reasoning_tokens,
                      usage.cache_write_1h_tokens)


def _with_rejected(ctx: RequestContext, cost: float | None) -> float | None:
    """`cost` (the answer's) plus the refused answers': None only when no part had a price (an unpriced part
    counts 0, as an unpriced answer does; flagged only when nothing of the request was priced)."""
    for target, usage in ctx.rejected or ():
        price = target.price
        if price is not None:
            cost = (cost or 0.0) + price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                                              usage.cache_write_tokens, usage.reasoning_tokens,
                                              usage.cache_write_1h_tokens)
    return cost


def request_cost(ctx: RequestContext) -> float | None:
    """The request's cost (set once by accounting when it runs, else computed here)."""
    if ctx.cost_usd is None:
        cost = usage_cost(ctx, ctx.usage)
        ctx.cost_usd = cost if ctx.rejected is None else _with_rejected(ctx, cost)
    return ctx.cost_usd


def rejected_tokens(ctx: RequestContext) -> tuple[int, int, int, int]:
    """The refused answers' prompt, cached, completion and reasoning tokens, together (the usage counters and the
    token windows count them beside the answer's, as the cost does)."""
    prompt = cached = completion = reasoning = 0
    for _, usage in ctx.rejected or ():
        prompt += usage.prompt_tokens
        cached += usage.cached_tokens
        completion += usage.completion_tokens
        reasoning += usage.reasoning_tokens
    return prompt, cached, completion, reasoning
