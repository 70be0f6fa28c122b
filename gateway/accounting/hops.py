"""The limits of an alias a request reaches without naming it: a rule's alias, a budget's downgrade, a context fallback.

Admission runs before routing, on the alias asked for; where a request is then served is known only later (a rule
is matched by the router, a downgrade by the budgets, a context fallback after an upstream refused the prompt). An
alias's `limits` protect its upstream from all its callers together, however they come: so the router, about to
serve a request by an alias with limits that the request did not name, asks here (`HOP`, set by the accounting
stage around the call when a hop is possible: `Scopes.hops`, or a downgrade), and the request is counted against
that alias's windows and slots, or refused with 429 like a request that named it. What it takes goes on the
request's bill, settled and given back with the rest. An alias's `budget` is not taken so: it counts the requests
that name the alias. A refusal gives back only what the hop took; the requests and tokens already counted
elsewhere stay, as for any request that went out and failed.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

from ..errors import RateLimited
from ..pipeline.context import RequestContext
from ..store.base import StoreUnavailable
from .bill import Bill

if TYPE_CHECKING:
    from .admission import Admission

__all__ = ["HOP", "AliasHop"]


class AliasHop:
    """One request's way into the aliases it did not name: each one's limits taken once, into its bill."""

    __slots__ = ("bill", "entered", "stage")

    def __init__(self, stage: Admission, bill: Bill, asked: str) -> None:
        self.stage = stage
        self.bill = bill
        self.entered: tuple[str, ...] = (asked,)  # the alias asked for: admission took its limits

    async def enter(self, ctx: RequestContext, alias: str) -> None:
        """Take `alias`'s limits for this request (once), or raise 429 (503 when the store is away and the policy
        says `closed`)."""
        if alias in self.entered:
            return
        self.entered = (*self.entered, alias)
        stage = self.stage
        scope = stage.hop_scopes.get(alias)
        if scope is None:
            return
        bill = self.bill
        taken = Bill()  # what this hop takes: given back alone if it is refused
        limits = scope.limits
        assert limits is not None
        if limits.tpm:
            if bill.prompt_estimate or bill.completion_cap:  # sized by admission already
                taken.prompt_estimate, taken.completion_cap = bill.prompt_estimate, bill.completion_cap
            else:
                await stage.presize(ctx, taken, ctx.route.upstream_model if ctx.route is not None else None)
                stage._size(ctx, taken)
        try:
            if stage._in_line is not None:
                stage._limits_in_line(ctx, taken, [scope])
            else:
                ops = stage._limit_ops(ctx, taken, [scope])
                stage._limits(taken, ops, *await stage._taken(ops))
        except StoreUnavailable:
            stage._unavailable(taken, [])  # (`closed`: what it took given back, 503; `open`: served)
        except RateLimited:  # (in line: given back already)
            await stage._given_back(taken)
            raise
        bill.requests.extend(taken.requests)
        if taken.tokens:
            bill.tokens = (*bill.tokens, *taken.tokens)
        if taken.slots:
            bill.slots = (*bill.slots, *taken.slots)


HOP: ContextVar[AliasHop | None] = ContextVar("gateway_alias_hop", default=None)  # the request's, during its call
