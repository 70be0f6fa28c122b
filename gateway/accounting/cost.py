"""What one answer cost: its usage at the answering target's prices.

A request that never reached an upstream (refused, a cache hit) cost nothing upstream; one whose target has
no price counts as 0 and is flagged (`gateway_cost_unpriced_total`, and a warning when the policy loads).
"""

from __future__ import annotations

from ..pipeline.context import RequestContext
from ..schemas.openai import Usage

__all__ = ["request_cost", "usage_cost"]


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
    return price.cost(prompt, completion, usage.cached_tokens, usage.cache_write_tokens, usage.reasoning_tokens)


def request_cost(ctx: RequestContext) -> float | None:
    """The request's cost (set once by accounting when it runs, else computed here)."""
    if ctx.cost_usd is None:
        ctx.cost_usd = usage_cost(ctx, ctx.usage)
    return ctx.cost_usd
