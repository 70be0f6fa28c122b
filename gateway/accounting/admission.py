"""The accounting stage before the call: limits, then budgets (see stage.py for the whole).

Limits first, then budgets: on a remote store each group's operations are planned (`_limit_ops`,
`_budget_ops`), taken together, all or nothing (`taking`), and their answers applied (`_limits`, `_budgets`);
on the in-process store each operation is answered in line as it is planned (`_admit_in_line`, which takes the
usual shapes itself and leaves token and concurrency limits to `_limits_in_line`), on the store's integer
operations: each scope's limits are converted to the store's millionths once (`Scope.rpm_cap`...), a request's
reservation once for all its budgets. Both share the refusals and the per-budget step; a refused request
gives back what it took before its refusal is answered (`taking`).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

from ..errors import BudgetExceeded, LimitsUnavailable, RateLimited
from ..pipeline.context import RequestContext
from ..policy.compiled import ModelRoute
from ..schemas.endpoints import Endpoint
from ..store._common import AMOUNT_SCALE, to_units
from ..store.base import Reservation, StoreUnavailable, WindowReservation
from .bill import NO_RATES, WINDOW_S, Bill, Held, Op
from .gauges import policy_budgets
from .headers import (
    duration,
    given_back,
    headers_given_back,
    rate_limit_headers,
    refused_windows,
    request_headers,
    tightest,
)
from .headers import tighter as _tighter  # (the name the in-line paths, and their unit test, use)
from .ledger import new_op
from .outright import completion_cap
from .scopes import Scope, Scopes
from .taking import Taking

__all__ = ["Admission"]

_new = tuple.__new__  # a named tuple made without its Python-level __new__ (`Held`, per budget per request)
_FOREVER = math.inf  # a budget's `Held.until`: its counter has no window to leave
_FAST_AMOUNT = 9e9  # costs in [0, this) become millionths in line (`to_units` checks the rest, and refuses NaN)
_CHAT = Endpoint.CHAT


def _too_large(refused: tuple[str, Scope, float], tokens: float) -> bool:
    """Whether a refusal is a tokens-per-minute window's of a request larger than the whole window: one no wait
    makes room for (`outright.refused_outright`, which `gateway explain` asks offline)."""
    limits = refused[1].limits
    return refused[0] == "tpm" and limits is not None and limits.tpm is not None and tokens > limits.tpm


def _refuses(refused: tuple[str, Scope, float] | None, kind: str, scope: Scope, tokens: float) -> bool:
    """Whether a window that did not fit (`kind`, of `scope`) is the refusal to answer, rather than `refused` (the
    first found, if any): the first, unless this one is a tokens-per-minute window smaller than the whole request
    and the first is not (one no wait makes room for: `_refuse` tells the client so). Asked only of a window that
    did not fit (`_limits_in_line`, `_limits`): an admitted request never calls it."""
    return refused is None or (_too_large((kind, scope, 0.0), tokens) and not _too_large(refused, tokens))


def _harder(hard: Scope | None, scope: Scope, units: int) -> Scope:
    """The hard budget a refusal names, of `hard` (the first found, if any) and `scope` (one more that refused): the
    first, unless `scope`'s whole amount is smaller than the request's reservation (`units`, the store's
    millionths, as it compares them) and the first's is not: no period makes room for it (`_budgets_done` tells
    the client so). Asked only of a hard budget that refused."""
    if hard is None:
        return scope
    return scope if scope.budget_cap < units <= hard.budget_cap else hard


def _usd(amount: float) -> str:
    """An amount in USD as a message shows it: to the millionth the budgets count in, without trailing zeros."""
    return f"{amount:.6f}".rstrip("0").rstrip(".")


class Admission(Taking):
    """Limits and budgets before the call: what a request may take, and the headers that say so."""

    async def _admit(self, ctx: RequestContext, bill: Bill, scopes: Scopes) -> None:
        """On a remote store: each group's operations together (one round trip's wait for all)."""
        if scopes.needs_tokens:
            self._size(ctx, bill)
        try:
            if scopes.limited:
                ops = self._limit_ops(ctx, bill, scopes.limited)
                self._limits(bill, ops, *await self._taken(ops))
            if scopes.budgeted:
                ops = self._budget_ops(ctx, bill, scopes.budgeted)
                self._budgets(ctx, bill, ops, *await self._taken(ops))
        except StoreUnavailable:
            self._unavailable(bill, scopes.budgeted)
        except (RateLimited, BudgetExceeded):  # what it took (limits, when a budget refused) given back first
            await self._given_back(bill)
            raise
        except asyncio.CancelledError:  # the client left while the budgets were asked: the limits' given back
            if bill.requests or bill.tokens or bill.slots:  # (the step cut owes its own: `Taking._taken`)
                self._spawn(self._release(bill))
            raise

    def _admit_in_line(self, ctx: RequestContext, bill: Bill, scopes: Scopes) -> None:
        """`_admit` on the in-process store: the same steps, each operation answered in line as it is planned
        (no plan to build: this runs on every limited request), on the store's integer operations. The usual
        shapes (a chat of role-and-text messages, requests-per-minute limits only, budgets without a
        downgrade) are taken here, without a call per step. A counter that fails stops the checks there."""
        if scopes.needs_tokens:  # `_size`, in line
            body = ctx.body
            endpoint = ctx.endpoint
            if not bill.prompt_estimate:  # (else a large body's, counted in a thread: `presize`)
                messages = body.get("messages") if endpoint is _CHAT else None  # (another API's: not read)
                estimate = self.prompts.plain(messages, scopes.model) if type(messages) is list \
                    and "tools" not in body else None  # (the general count's answer for such a chat, without its steps)
                bill.prompt_estimate = (self.prompts.estimate_body(body, scopes.model, endpoint)
                                        + ctx.continued_tokens if estimate is None else estimate)
            if ("max_tokens" in body or "max_completion_tokens" in body or "max_output_tokens" in body
                    or not endpoint.streams):
                bill.completion_cap, bill.explicit_cap = completion_cap(endpoint.streams, body, self.default_cap,
                                                                        endpoint)
            else:  # no cap asked for (the usual case): `completion_cap`'s answer, without its two calls
                bill.completion_cap = self.default_cap  # (`explicit_cap` stays False)
        store = self._in_line
        assert store is not None
        try:
            if scopes.rpm_only:  # `_limits_in_line` for requests-per-minute limits only
                requests: WindowReservation | None = None
                refused: tuple[Scope, float] | None = None
                full: WindowReservation | None = None
                for scope in scopes.limited:
                    answer = store.reserve_window_units_now(scope.rpm_key, AMOUNT_SCALE, scope.rpm_cap,
                                                            scope.rpm, WINDOW_S)
                    if scope.shown and (requests is None or _tighter(answer, requests)):
                        requests = answer
                    if answer[0]:  # `answer.ok`
                        bill.requests.append(scope.rpm_key)
                    elif refused is None:
                        refused, full = (scope, answer[3]), answer  # `answer.reset_s`
                if refused is not None:  # the window that refused (`refused_windows`)
                    requests = full
                if requests is not None:
                    bill.headers = request_headers(requests)
                if refused is not None:
                    self._refuse(bill, "rpm", *refused)
            elif scopes.limited:
                self._limits_in_line(ctx, bill, scopes.limited)
            if scopes.budgeted:  # `_budget_ops` and `_budgets` in one pass, the reservation converted once
                rate_in, rate_out = scopes.rates  # `_reservation`
                cost = bill.cost_reserved = (bill.prompt_estimate * rate_in
                                             + bill.completion_cap * rate_out) / 1_000_000
                units = round(cost * AMOUNT_SCALE) if 0.0 <= cost < _FAST_AMOUNT else to_units(cost)  # `to_units`
                now = time.time()
                hard: Scope | None = None
                for scope in scopes.budgeted:
                    budget, keys = scope.budget, scope.budget_keys
                    assert budget is not None and keys is not None
                    key, ttl = keys.at(now)
                    reservation = store.reserve_units_now(key, units, scope.budget_cap, budget.usd, ttl)
                    if reservation[0] and budget.downgrade is None:  # the usual case: `_budget_answer`'s first steps
                        left = budget.usd - reservation[1]  # `reservation.limit - reservation.total`
                        left = left if left > 0.0 else 0.0
                        (scope.budget_left or self._budget_left(scope)).show(left, left / budget.usd)
                        bill.budgets.append(_new(Held, (key, cost, ttl, scope, budget, units, _FOREVER, "")))
                    elif not self._budget_answer(bill, scope, key, cost, ttl, reservation, units):
                        hard = _harder(hard, scope, units)
                if hard is not None or bill.downgrade is not None:
                    self._budgets_done(ctx, bill, hard)
        except StoreUnavailable:
            self._unavailable(bill, scopes.budgeted)

    def _limits_in_line(self, ctx: RequestContext, bill: Bill, scopes: list[Scope]) -> None:
        """`_limit_ops` and `_limits` in one pass over the scopes (the tightest window of each kind kept as it
        goes: no lists to pick it from), on the store's integer operations (the scope's limits converted once)."""
        store = self._in_line
        assert store is not None
        refused: tuple[str, Scope, float] | None = None
        requests: WindowReservation | None = None  # the tightest of the caller's own (`Scope.shown`)
        token_window: WindowReservation | None = None
        full: WindowReservation | None = None  # the window that refused (`refused_windows`)
        requests_over: WindowReservation | None = None  # the tightest of the caller's own that did not fit (a
        tokens_over: WindowReservation | None = None  # refusal's only: the tightest once it gave back, if any)
        holder = ""
        for scope in scopes:
            limits = scope.limits
            assert limits is not None
            if limits.concurrent:
                holder = holder or ctx.request_id + ":" + secrets.token_hex(4)
                if store.acquire_slot_now(scope.slot_key, holder, limits.concurrent, self.lease_s)[0]:
                    bill.slots = (*bill.slots, (scope.slot_key, holder))
                elif refused is None:
                    refused = ("concurrent", scope, 1.0)
            if limits.rpm:
                answer = store.reserve_window_units_now(scope.rpm_key, AMOUNT_SCALE, scope.rpm_cap, limits.rpm,
                                                        WINDOW_S)
                if scope.shown and (requests is None or _tighter(answer, requests)):
                    requests = answer
                if answer.ok:
                    bill.requests.append(scope.rpm_key)
                else:
                    if scope.shown and (requests_over is None or _tighter(answer, requests_over)):
                        requests_over = answer
                    if refused is None:
                        refused, full = ("rpm", scope, answer.reset_s), answer
            if limits.tpm:
                tokens = bill.prompt_estimate + bill.completion_cap
                answer = store.reserve_window_units_now(scope.tpm_key, tokens * AMOUNT_SCALE, scope.tpm_cap,
                                                        limits.tpm, WINDOW_S)
                if scope.shown and (token_window is None or _tighter(answer, token_window)):
                    token_window = answer
                if answer.ok:
                    bill.tokens = (*bill.tokens, Held(scope.tpm_key, float(tokens), WINDOW_S, scope, None,
                                                      tokens * AMOUNT_SCALE, time.monotonic() + answer.reset_s))
                else:
                    if scope.shown and (tokens_over is None or _tighter(answer, tokens_over)):
                        tokens_over = answer
                    if _refuses(refused, "tpm", scope, tokens):
                        refused, full = ("tpm", scope, answer.reset_s), answer
        if refused is not None:  # shown as they stand once it gave back what it took (as `reserve_together` does):
            # of a kind, a window that did not fit has fewer left than any that did, once they are given back
            tokens = bill.prompt_estimate + bill.completion_cap
            requests, token_window = refused_windows(
                refused[0], full, requests_over if requests_over is not None else given_back(requests, 1.0),
                tokens_over if tokens_over is not None else given_back(token_window, float(tokens)),
                _too_large(refused, tokens))
        bill.headers = rate_limit_headers(requests, token_window)
        if refused is not None:
            self._refuse(bill, *refused)

    def _size(self, ctx: RequestContext, bill: Bill) -> None:
        route = ctx.route
        if not bill.prompt_estimate:  # (else a large body's, counted in a thread: `presize`)
            model = route.upstream_model if route is not None else None
            bill.prompt_estimate = self.prompts.estimate_body(ctx.body, model, ctx.endpoint) + ctx.continued_tokens
        bill.completion_cap, bill.explicit_cap = completion_cap(ctx.endpoint.streams, ctx.body, self.default_cap,
                                                                ctx.endpoint)

    def _unavailable(self, bill: Bill, budgeted: list[Scope]) -> None:
        """The store failed: refuse (`closed`), or serve and owe each budget not reserved what is spent."""
        if not self.fail_open:
            self.metrics.accounting_store_errors.labels("refused").inc()
            self._spawn(self._release(bill))
            raise LimitsUnavailable("limits and budgets cannot be checked right now; retry shortly",
                                    headers={"Retry-After": "1"}) from None
        self.metrics.accounting_store_errors.labels("served").inc()
        # Served unchecked: what it spends is added to each budget when the store answers again.
        held = {h.key for h in bill.budgets}
        for scope in budgeted:
            assert scope.budget_keys is not None
            key, ttl = scope.budget_keys.at(time.time())
            if key not in held:
                bill.unreserved = (*bill.unreserved, (key, ttl, scope))

    def _limit_ops(self, ctx: RequestContext, bill: Bill, scopes: list[Scope]) -> list[Op]:
        ops: list[Op] = []
        holder = ""
        tokens = bill.prompt_estimate + bill.completion_cap
        for scope in scopes:
            limits = scope.limits
            assert limits is not None
            if limits.concurrent:
                holder = holder or ctx.request_id + ":" + secrets.token_hex(4)
                ops.append(("concurrent", scope, (scope.slot_key, holder, limits.concurrent, self.lease_s)))
            if limits.rpm:
                ops.append(("rpm", scope, (scope.rpm_key, 1, limits.rpm, WINDOW_S)))
            if limits.tpm:
                ops.append(("tpm", scope, (scope.tpm_key, tokens, limits.tpm, WINDOW_S)))
        return ops

    def _limits(self, bill: Bill, ops: list[Op], results: list[Any], taken: bool = True) -> None:
        """The limits' answers (`taken`: whether those that fit are held, `Store.reserve_together`)."""
        refused: tuple[str, Scope, float] | None = None
        requests: list[WindowReservation] = []  # the caller's own windows (`Scope.shown`)
        token_windows: list[WindowReservation] = []
        full: WindowReservation | None = None  # the window that refused (`refused_windows`)
        failure: BaseException | None = None
        for index, (kind, scope, args) in enumerate(ops):  # results[index] answers ops[index]
            result = results[index]
            if isinstance(result, BaseException):
                failure = failure or result
                if kind == "concurrent":  # a take that timed out may still be applied: given back later
                    self._owe_release(args[0], args[1])
                continue
            key = args[0]
            if kind == "concurrent":
                ok, _held = result
                if ok:
                    if taken:
                        bill.slots = (*bill.slots, (key, args[1]))
                elif refused is None:
                    refused = (kind, scope, 1.0)
                continue
            answer: WindowReservation = result
            if scope.shown:
                (requests if kind == "rpm" else token_windows).append(answer)
            if answer.ok:
                if not taken:
                    continue
                if kind == "tpm":
                    bill.tokens = (*bill.tokens, Held(key, float(args[1]), WINDOW_S, scope, None, 0,
                                                      time.monotonic() + answer.reset_s))
                else:
                    bill.requests.append(key)
            elif _refuses(refused, kind, scope, args[1]):
                refused, full = (kind, scope, answer.reset_s), answer
        if failure is not None:
            raise failure
        tokens = bill.prompt_estimate + bill.completion_cap
        if refused is not None and taken:  # what fit is held, and given back with the refusal: shown without it
            requests = [given_back(answer, 1.0) or answer for answer in requests]
            token_windows = [given_back(answer, float(tokens)) or answer for answer in token_windows]
        # One window of a kind (the usual case) is its own tightest: no call to find it.
        shown = (requests[0] if len(requests) == 1 else tightest(requests),
                 token_windows[0] if len(token_windows) == 1 else tightest(token_windows))
        if refused is not None:
            shown = refused_windows(refused[0], full, *shown, _too_large(refused, tokens))
        bill.headers = rate_limit_headers(*shown)
        if refused is not None:
            self._refuse(bill, *refused)

    def _refuse(self, bill: Bill, kind: str, scope: Scope, reset: float) -> None:
        """A limit refused: undo what the request took, answer 429 with `Retry-After`; a request larger than a
        whole tokens-per-minute window, which no wait makes room for, without it, and with `x-should-retry: false`
        (the OpenAI and Anthropic SDKs then do not retry it): OpenAI answers such a request 429 as well."""
        self.metrics.limit_rejections.labels(kind, scope.kind).inc()
        self._give_back(bill)
        headers = {n.decode(): v.decode() for n, v in bill.headers}
        prompt, cap = bill.prompt_estimate, bill.completion_cap
        if _too_large((kind, scope, reset), prompt + cap):
            assert scope.limits is not None
            headers["x-should-retry"] = "false"
            raise RateLimited(
                f"request too large for the tokens per minute of this {scope.kind}: it may use up to {prompt + cap} "
                f"tokens (a prompt of about {prompt}, and up to {cap} for the completion), more than the whole "
                f"limit of {scope.limits.tpm}, so it is refused however long it waits; ask for fewer completion tokens "
                f"(max_tokens, or max_output_tokens on the Responses API) or send a shorter prompt", headers=headers)
        what = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrent": "concurrent requests"}
        headers["Retry-After"] = str(max(1, math.ceil(reset)))
        raise RateLimited(f"rate limit reached: {what[kind]} of this {scope.kind}; retry after "
                          f"{duration(reset)}", headers=headers)

    def _reservation(self, ctx: RequestContext, bill: Bill) -> float:
        """The request's largest possible cost, at the dearest rates of the alias's targets."""
        rate_in, rate_out = self.rates.get(ctx.alias_label, NO_RATES)
        return (bill.prompt_estimate * rate_in + bill.completion_cap * rate_out) / 1_000_000

    def _budget_ops(self, ctx: RequestContext, bill: Bill, scopes: list[Scope]) -> list[Op]:
        """Every budget's reservation, under the request's operation id (one per request: the store keeps each
        counter's record apart), which its steps and its settle go under too, leased for `accounting.lease_s` (a
        remote store gives back one its dead replica never settled, after that)."""
        cost = bill.cost_reserved = self._reservation(ctx, bill)
        now = time.time()
        op = bill.op = new_op()
        ops: list[Op] = []
        for scope in scopes:
            budget, keys = scope.budget, scope.budget_keys
            assert budget is not None and keys is not None
            key, ttl = keys.at(now)
            ops.append(("budget", scope, (key, cost, budget.usd, ttl, op, 0.0, self.lease_s)))  # `Store.reserve`'s
        return ops

    def _budgets(self, ctx: RequestContext, bill: Bill, ops: list[Op], results: list[Any], taken: bool = True) -> None:
        """The budgets' answers (`taken`: whether those that fit are held; if not, a hard one refused)."""
        failure: BaseException | None = None
        hard: Scope | None = None
        held = bill if taken else Bill()  # (not taken: what fit is shown in the gauges, and held nowhere)
        for index, (_, scope, (key, cost, _, ttl, op, *_)) in enumerate(ops):  # results[index] answers ops[index]
            result = results[index]
            if isinstance(result, BaseException):
                failure = failure or result
                if isinstance(result, StoreUnavailable) and result.maybe_applied:  # it may be applied all the same
                    self.ledger.owe_op(key, op, 0.0, 0.0, ttl)  # (late): settled to nothing, given back or stopped
            elif not self._budget_answer(held, scope, key, cost, ttl, result, op=op):
                hard = _harder(hard, scope, to_units(cost))
        if failure is not None:
            raise failure
        self._budgets_done(ctx, bill, hard)

    def _budget_answer(self, bill: Bill, scope: Scope, key: str, cost: float, ttl: float, answer: Reservation,
                       units: int = 0, op: str = "") -> bool:
        """One budget's answer, taken into the bill (`units`: `cost` in the store's millionths, when the
        in-process store reserved it; `op`: its id, when a remote one did); False when a hard budget refused."""
        budget = scope.budget
        assert budget is not None
        left = answer.limit - answer.total  # `answer.remaining`, without a property call
        left = left if left > 0.0 else 0.0
        (scope.budget_left or self._budget_left(scope)).show(left, left / budget.usd)
        if answer.ok:
            bill.budgets.append(Held(key, cost, ttl, scope, budget, units, _FOREVER, op))
            spent = answer.total / budget.usd
        elif budget.mode == "soft":
            bill.unreserved = (*bill.unreserved, (key, ttl, scope))
            self.metrics.budget_soft_exceeded.labels(scope.kind).inc()
            bill.headers.append((b"x-gateway-budget-exceeded", scope.kind.encode()))
            spent = 1.0
        else:
            return False
        if budget.downgrade is not None and spent >= budget.downgrade.at and bill.downgrade is None:
            bill.downgrade = budget.downgrade.alias
        return True

    def _budgets_done(self, ctx: RequestContext, bill: Bill, hard: Scope | None) -> None:
        """After every budget answered: refuse (a hard one had no room), or downgrade (one is past its mark).

        A refusal gives back what the request took, its limits' windows too: its headers show them as they then
        stand (`headers_given_back`), as a limit's refusal does. A request whose reservation alone is more than the
        budget's whole amount is refused on an empty counter too, in every period (the reservation is the same
        each time it is sent): no `Retry-After` (no budget refusal has one: a period may be a month), and
        `x-should-retry: false`, as a request larger than a whole `tpm` window (`_refuse`)."""
        if hard is not None:
            self.metrics.limit_rejections.labels("budget", hard.kind).inc()
            self._give_back(bill)
            prompt, cap = bill.prompt_estimate, bill.completion_cap
            bill.headers = headers_given_back(bill.headers, prompt + cap)
            headers = {n.decode(): v.decode() for n, v in bill.headers}
            cost = bill.cost_reserved
            if to_units(cost) > hard.budget_cap:
                budget = hard.budget
                assert budget is not None
                headers["x-should-retry"] = "false"
                raise BudgetExceeded(
                    f"request too large for the budget of this {hard.kind}: it may cost up to {_usd(cost)} USD (a "
                    f"prompt of about {prompt} tokens, and up to {cap} for the completion, at the dearest prices of "
                    f"the models it may reach), more than the whole budget of {_usd(budget.usd)} USD a period, so it "
                    f"is refused however long it waits; ask for fewer completion tokens (max_tokens, or "
                    f"max_output_tokens on the Responses API) or send a shorter prompt", headers=headers)
            raise BudgetExceeded(f"the {hard.kind}'s budget for this period is spent", headers=headers)
        downgrade = bill.downgrade
        if downgrade is not None and downgrade != ctx.alias_label:
            route = ctx.runtime.policy.models.get(downgrade)
            key = ctx.key
            # never an alias the key may not use, nor one no target of which serves the request's endpoint (an
            # Anthropic-only alias for a Responses or an embeddings request: a 400 `unsupported_endpoint` to every
            # such request past the mark, where the alias asked for serves it)
            if route is not None and (key is None or key.allows(downgrade)) and _serves(ctx, route):
                ctx.route = route
                bill.headers.append((b"x-gateway-budget-downgrade", downgrade.encode()))

    async def show_budgets(self) -> None:
        """Every budget of the policy shown in its gauges as the store counts it now: once this stage's policy is
        swapped in (and again when the one it replaced has retired). Until a scope's next request its gauges read
        what the retired policy's stage last saw: a budget raised by a reload to end `GatewayBudgetNearlySpent`
        went on reading spent, for good without traffic."""
        budgets = policy_budgets(self.policy)
        await self._show_counted([Scope(kind, name, None, budget) for (kind, name), budget in budgets.items()], True)

    async def refresh_budgets(self) -> None:
        """`show_budgets` after the ledger wrote spend the store had missed (`Ledger.on_budget_writes`: a settle, a
        give-back, while Redis was away), which no settle's answer showed: an idle key went on reading its
        reservation as spent. The policy's budgets and those of keys made at run time this stage served; not
        claimed (`BudgetLeft.claim`: a retiring stage's ledger flushes too, and must not take the gauges back)."""
        policy = [Scope(kind, name, None, budget) for (kind, name), budget in policy_budgets(self.policy).items()]
        scopes = {scope.slot_key: scope for scope in (*policy, *self.scopes.budgeted())}  # one per counter
        await self._show_counted(list(scopes.values()), False)

    async def _show_counted(self, scopes: list[Scope], claim: bool) -> None:
        """`scopes`' budgets shown as the store counts them now (`claim`: the gauges read this stage's figures from
        now on). Off the request path: one read of every counter, and a store that does not answer (or a counter
        that holds something else) leaves those gauges as they were."""
        if not scopes:
            return
        now = time.time()
        keys = [scope.budget_keys.at(now)[0] for scope in scopes if scope.budget_keys is not None]
        try:
            counts = await self.store.get_many(keys)
        except StoreUnavailable:
            return
        for scope, raw in zip(scopes, counts, strict=True):
            budget = scope.budget
            assert budget is not None
            try:
                spent = int(raw) / AMOUNT_SCALE if raw is not None else 0.0
            except ValueError:  # not a counter: the scope's next request answers for it
                continue
            left = budget.usd - spent
            left = left if left > 0.0 else 0.0
            gauges = self._budget_left(scope)
            if claim:
                gauges.claim()
            gauges.show(left, left / budget.usd)


def _serves(ctx: RequestContext, route: ModelRoute) -> bool:
    """Whether a target of `route` has a provider that serves the request's endpoint (`Provider.endpoints`)."""
    providers = ctx.runtime.providers
    return any(ctx.endpoint in providers[target.provider].endpoints for target in route.targets
               if target.provider in providers)
