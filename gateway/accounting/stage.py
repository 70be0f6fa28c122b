"""The accounting stage: rate limits and budgets before the call, the bill after it.

Between `Authorize` and the guards, only in a policy that sets a limit or a budget somewhere. Per request:

1. limits (requests and tokens per minute, requests in flight) of the caller's key, its tenant and the alias,
   all asked of the `Store` at once; one that refuses undoes the others and answers 429 with `Retry-After`;
2. budgets: the request's largest possible cost (its prompt estimate plus `max_tokens`, or
   `accounting.default_max_tokens`, at the dearest of the alias's targets) is reserved atomically on every
   budget that applies, so concurrent requests on any number of replicas never spend past a budget by more
   than one reservation; a hard budget without room answers 429 `budget_exceeded`, a soft one lets the
   request through with a header and a metric; past a budget's `downgrade.at`, the request goes to the
   cheaper alias;
3. the answer: each reservation is settled to the actual cost (tokens from the upstream, or counted): for a
   complete answer in line on the in-process store and in a task beside the reply on Redis (the client
   does not wait for the round trip), and at the end of a stream (`_StreamBill`), however it ends;
   a stream that outgrows its reservation reserves another step, and is cut off (`finish_reason: "length"`
   and an error event) when a hard budget refuses it.

The caller's limits and budget are read from its `VirtualKey` only, so keys from the policy file and keys
created at run time go through this one path. When the store fails, `on_unavailable` decides: `closed`
answers 503; `open` serves, and the ledger adds the spend to the store once it answers again.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..errors import BudgetExceeded, GatewayError, LimitsUnavailable, RateLimited
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamEnd
from ..policy.accounting_schema import BudgetSpec
from ..policy.compiled import Policy
from ..schemas.events import Chunk, StreamError, StreamEvent
from ..store._common import to_units
from ..store.base import Reservation, Store, StoreUnavailable, WindowReservation
from ..store.memory import MemoryStore
from ..telemetry.metrics import Children, Metrics
from ..telemetry.usage import CountTokens, answer_text, count_text, estimate_usage
from .cost import request_cost
from .gauges import BudgetLeft
from .headers import duration, rate_limit_headers, tightest
from .ledger import Ledger, UsageDelta
from .outright import completion_cap, max_rates
from .periods import day_id
from .prompt import PromptEstimator
from .scopes import BoundedLabels, Scope, ScopeIndex, Scopes

__all__ = ["Accounting"]

WINDOW_S = 60.0  # requests and tokens per minute
_NO_RATES = (0.0, 0.0)  # an alias without prices
_Op = tuple[str, Scope, tuple[Any, ...]]  # (what: a key of `Accounting._remote`, for whom, its arguments)


@dataclass(slots=True)
class _Held:
    """One reservation to settle: a budget counter, or a token window."""

    key: str
    reserved: float
    ttl_s: float
    scope: Scope
    budget: BudgetSpec | None = None  # None: a token window


class _Bill:
    """Per request: what was reserved, and what the answer must settle."""

    __slots__ = ("budgets", "completion_cap", "cost_reserved", "downgrade", "explicit_cap", "headers",
                 "prompt_estimate", "requests", "settled", "slots", "tokens", "unreserved")

    def __init__(self) -> None:  # made on every limited request: no dataclass factories
        self.prompt_estimate = 0
        self.completion_cap = 0
        self.explicit_cap = False
        self.cost_reserved = 0.0
        self.budgets: list[_Held] = []
        self.tokens: list[_Held] = []
        self.slots: list[tuple[str, str]] = []  # (key, holder)
        self.requests: list[str] = []  # request windows counted (undone if refused)
        self.unreserved: list[tuple[str, float, Scope]] = []  # budgets to add the actual to
        self.headers: list[tuple[bytes, bytes]] = []
        self.downgrade: str | None = None  # the cheaper alias a budget past its `downgrade.at` sends it to
        self.settled = False


class Accounting:
    name = "accounting"

    def __init__(self, policy: Policy, store: Store, ledger: Ledger, metrics: Metrics, counter: CountTokens) -> None:
        self.policy = policy
        self.store = store
        self.ledger = ledger
        self.metrics = metrics
        self.counter = counter
        self.prompts = PromptEstimator(counter.tokens)
        spec = policy.accounting
        self.fail_open = (spec.on_unavailable or policy.state.on_unavailable) == "open"
        self.default_cap = spec.default_max_tokens
        self.record_all = policy.has_accounting  # else only requests some limit or budget applies to
        self.lease_s = spec.lease_s
        self.labels = BoundedLabels(policy, spec.label_cap)
        self.rates = {alias: max_rates(route.targets) for alias, route in policy.models.items()}
        self.scopes = ScopeIndex(policy)
        self._tasks: set[asyncio.Task[Any]] = set()
        # The store's counter operations by what they do, awaited on a remote store.
        self._remote: dict[str, Callable[..., Awaitable[Any]]] = {
            "concurrent": store.acquire_slot, "rpm": store.reserve_window, "tpm": store.reserve_window,
            "budget": store.reserve, "spend": store.settle, "settle": store.settle, "release": store.release_slot,
        }
        # The in-process store: its operations answered in line (`_admit_in_line`, `_settle_in_line`), so that
        # a request's accounting adds no coroutine per operation.
        self._in_line = store if isinstance(store, MemoryStore) else None
        self._gauges: dict[tuple[str, str], BudgetLeft] = {}  # by scope
        self._gauges_by_label: dict[tuple[str, str], BudgetLeft] = {}
        self._reservation_drift = Children(metrics.reservation_drift)  # by alias
        self._token_drift = Children(metrics.token_estimate_drift)
        self._drifts: dict[str, tuple[Any, Any]] = {}  # alias -> both drift children (aliases: the policy's)

    async def start(self) -> None:
        await self.ledger.start()

    async def aclose(self) -> None:
        """After the runtime's last request: let pending settles finish (each op is bounded), then flush."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.ledger.aclose()

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        scopes = self.scopes.of(ctx)
        if not scopes.all:  # nothing to enforce: only count the usage, with no task and no store call
            if not self.record_all:  # built only for keys made at run time: the others pass untouched
                return await call_next(ctx)
            reply = await call_next(ctx)
            if reply.stream is not None:
                reply.stream.add(_UsageOnly(self))
            else:
                await self._answer_usage(ctx, reply)
                self._record(ctx, self._price(ctx))
            return reply
        bill = _Bill()
        if self._in_line is not None:
            self._admit_in_line(ctx, bill, scopes)
        else:
            await self._admit(ctx, bill, scopes)
        if bill.headers:
            ctx.headers = [*(ctx.headers or ()), *bill.headers]
        try:
            reply = await call_next(ctx)
        except GatewayError as exc:
            for name, value in bill.headers:
                exc.headers.setdefault(name.decode(), value.decode())
            self._spawn(self._settle(ctx, bill))
            raise
        except BaseException:
            self._spawn(self._settle(ctx, bill))
            raise
        if reply.stream is not None:
            reply.stream.add(_StreamBill(self, bill))
            return reply
        await self._answer_usage(ctx, reply)
        cost = self._price(ctx)  # the header and the access log (telemetry) read it from the context
        if self._in_line is not None:  # settling in memory never waits: no task needed beside the reply
            self._settle_in_line(ctx, bill, cost)
        elif self.store.in_process:
            await self._settle(ctx, bill)
        else:
            self._spawn(self._settle(ctx, bill))
        return reply

    async def _answer_usage(self, ctx: RequestContext, reply: Reply) -> None:
        """A complete answer without usage: counted now (the bill cannot wait for telemetry's count)."""
        if ctx.usage is None and reply.body is not None and ctx.upstream_started:
            completion = await count_text(self.counter, answer_text(reply.body))
            ctx.usage = await estimate_usage(self.counter, ctx, completion)

    # -- before the call -------------------------------------------------------------------------------
    # Limits first, then budgets: each group's operations planned (`_limit_ops`, `_budget_ops`), run, and
    # their answers applied (`_limits`, `_budgets`). Only running them differs between the stores.

    async def _admit(self, ctx: RequestContext, bill: _Bill, scopes: Scopes) -> None:
        """On a remote store: each group's operations at once (one round trip's wait for all)."""
        if scopes.needs_tokens:
            self._size(ctx, bill)
        remote = self._remote
        try:
            if scopes.limited:
                ops = self._limit_ops(ctx, bill, scopes.limited)
                self._limits(bill, ops, await self._all([remote[kind](*args) for kind, _, args in ops]))
            if scopes.budgeted:
                ops = self._budget_ops(ctx, bill, scopes.budgeted)
                self._budgets(ctx, bill, ops, await self._all([remote[kind](*args) for kind, _, args in ops]))
        except StoreUnavailable:
            self._unavailable(bill, scopes.budgeted)

    def _admit_in_line(self, ctx: RequestContext, bill: _Bill, scopes: Scopes) -> None:
        """`_admit` on the in-process store: the same steps, each operation answered in line as it is planned
        (no plan to build: this runs on every limited request). A counter that fails stops the checks there."""
        if scopes.needs_tokens:
            self._size(ctx, bill)
        try:
            if scopes.limited:
                self._limits_in_line(ctx, bill, scopes.limited)
            if scopes.budgeted:
                self._budgets_in_line(ctx, bill, scopes.budgeted)
        except StoreUnavailable:
            self._unavailable(bill, scopes.budgeted)

    def _limits_in_line(self, ctx: RequestContext, bill: _Bill, scopes: list[Scope]) -> None:
        """`_limit_ops` and `_limits` in one pass over the scopes."""
        store = self._in_line
        assert store is not None
        refused: tuple[str, Scope, float] | None = None
        requests: list[WindowReservation] = []
        token_windows: list[WindowReservation] = []
        holder = ""
        for scope in scopes:
            limits = scope.limits
            assert limits is not None
            if limits.concurrent:
                holder = holder or ctx.request_id + ":" + secrets.token_hex(4)
                if store.acquire_slot_now(scope.slot_key, holder, limits.concurrent, self.lease_s)[0]:
                    bill.slots.append((scope.slot_key, holder))
                elif refused is None:
                    refused = ("concurrent", scope, 1.0)
            if limits.rpm:
                answer = store.reserve_window_now(scope.rpm_key, 1, limits.rpm, WINDOW_S)
                requests.append(answer)
                if answer.ok:
                    bill.requests.append(scope.rpm_key)
                elif refused is None:
                    refused = ("rpm", scope, answer.reset_s)
            if limits.tpm:
                tokens = bill.prompt_estimate + bill.completion_cap
                answer = store.reserve_window_now(scope.tpm_key, tokens, limits.tpm, WINDOW_S)
                token_windows.append(answer)
                if answer.ok:
                    bill.tokens.append(_Held(scope.tpm_key, float(tokens), WINDOW_S, scope))
                elif refused is None:
                    refused = ("tpm", scope, answer.reset_s)
        bill.headers = rate_limit_headers(requests[0] if len(requests) == 1 else tightest(requests),
                                          token_windows[0] if len(token_windows) == 1 else tightest(token_windows))
        if refused is not None:
            self._refuse(bill, *refused)

    def _budgets_in_line(self, ctx: RequestContext, bill: _Bill, scopes: list[Scope]) -> None:
        """`_budget_ops` and `_budgets` in one pass over the scopes."""
        store = self._in_line
        assert store is not None
        rate_in, rate_out = self.rates.get(ctx.alias_label, _NO_RATES)  # `_reservation`, in line
        cost = bill.cost_reserved = (bill.prompt_estimate * rate_in + bill.completion_cap * rate_out) / 1_000_000
        now = time.time()
        hard: Scope | None = None
        for scope in scopes:
            budget, keys = scope.budget, scope.budget_keys
            assert budget is not None and keys is not None
            key, ttl = keys.at(now)
            if not self._budget_answer(bill, scope, key, cost, ttl, store.reserve_now(key, cost, budget.usd, ttl)):
                hard = hard or scope
        if hard is not None or bill.downgrade is not None:
            self._budgets_done(ctx, bill, hard)

    def _size(self, ctx: RequestContext, bill: _Bill) -> None:
        route = ctx.route
        bill.prompt_estimate = self.prompts.estimate_body(ctx.body, route.upstream_model if route is not None else None)
        bill.completion_cap, bill.explicit_cap = completion_cap(ctx.endpoint.streams, ctx.body, self.default_cap)

    def _unavailable(self, bill: _Bill, budgeted: list[Scope]) -> None:
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
                bill.unreserved.append((key, ttl, scope))

    def _limit_ops(self, ctx: RequestContext, bill: _Bill, scopes: list[Scope]) -> list[_Op]:
        ops: list[_Op] = []
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

    def _limits(self, bill: _Bill, ops: list[_Op], results: list[Any]) -> None:
        refused: tuple[str, Scope, float] | None = None
        requests: list[WindowReservation] = []
        token_windows: list[WindowReservation] = []
        failure: BaseException | None = None
        for index, (kind, scope, args) in enumerate(ops):  # results[index] answers ops[index]
            result = results[index]
            if isinstance(result, BaseException):
                failure = failure or result
                continue
            key = args[0]
            if kind == "concurrent":
                taken, _held = result
                if taken:
                    bill.slots.append((key, args[1]))
                elif refused is None:
                    refused = (kind, scope, 1.0)
                continue
            answer: WindowReservation = result
            (requests if kind == "rpm" else token_windows).append(answer)
            if answer.ok:
                if kind == "tpm":
                    bill.tokens.append(_Held(key, float(args[1]), WINDOW_S, scope))
                else:
                    bill.requests.append(key)
            elif refused is None:
                refused = (kind, scope, answer.reset_s)
        if failure is not None:
            raise failure
        # One window of a kind (the usual case) is its own tightest: no call to find it.
        bill.headers = rate_limit_headers(requests[0] if len(requests) == 1 else tightest(requests),
                                          token_windows[0] if len(token_windows) == 1 else tightest(token_windows))
        if refused is not None:
            self._refuse(bill, *refused)

    def _refuse(self, bill: _Bill, kind: str, scope: Scope, reset: float) -> None:
        """A limit refused: undo what the request took, answer 429 with `Retry-After`."""
        self.metrics.limit_rejections.labels(kind, scope.kind).inc()
        self._spawn(self._release(bill))
        what = {"rpm": "requests per minute", "tpm": "tokens per minute", "concurrent": "concurrent requests"}
        headers = {n.decode(): v.decode() for n, v in bill.headers}
        headers["Retry-After"] = str(max(1, math.ceil(reset)))
        raise RateLimited(f"rate limit reached: {what[kind]} of this {scope.kind}; retry after "
                          f"{duration(reset)}", headers=headers)

    def _reservation(self, ctx: RequestContext, bill: _Bill) -> float:
        """The request's largest possible cost, at the dearest rates of the alias's targets."""
        rate_in, rate_out = self.rates.get(ctx.alias_label, _NO_RATES)
        return (bill.prompt_estimate * rate_in + bill.completion_cap * rate_out) / 1_000_000

    def _budget_ops(self, ctx: RequestContext, bill: _Bill, scopes: list[Scope]) -> list[_Op]:
        cost = bill.cost_reserved = self._reservation(ctx, bill)
        now = time.time()
        ops: list[_Op] = []
        for scope in scopes:
            budget, keys = scope.budget, scope.budget_keys
            assert budget is not None and keys is not None
            key, ttl = keys.at(now)
            ops.append(("budget", scope, (key, cost, budget.usd, ttl)))
        return ops

    def _budgets(self, ctx: RequestContext, bill: _Bill, ops: list[_Op], results: list[Any]) -> None:
        failure: BaseException | None = None
        hard: Scope | None = None
        for index, (_, scope, (key, cost, _, ttl)) in enumerate(ops):  # results[index] answers ops[index]
            result = results[index]
            if isinstance(result, BaseException):
                failure = failure or result
            elif not self._budget_answer(bill, scope, key, cost, ttl, result):
                hard = hard or scope
        if failure is not None:
            raise failure
        self._budgets_done(ctx, bill, hard)

    def _budget_answer(self, bill: _Bill, scope: Scope, key: str, cost: float, ttl: float, answer: Reservation) -> bool:
        """One budget's answer, taken into the bill; False when a hard budget refused."""
        budget = scope.budget
        assert budget is not None
        left = answer.limit - answer.total  # `answer.remaining`, without a property call
        left = left if left > 0.0 else 0.0
        (scope.budget_left or self._budget_left(scope)).show(left, left / budget.usd)
        if answer.ok:
            bill.budgets.append(_Held(key, cost, ttl, scope, budget))
            spent = answer.total / budget.usd
        elif budget.mode == "soft":
            bill.unreserved.append((key, ttl, scope))
            self.metrics.budget_soft_exceeded.labels(scope.kind).inc()
            bill.headers.append((b"x-gateway-budget-exceeded", scope.kind.encode()))
            spent = 1.0
        else:
            return False
        if budget.downgrade is not None and spent >= budget.downgrade.at and bill.downgrade is None:
            bill.downgrade = budget.downgrade.alias
        return True

    def _budgets_done(self, ctx: RequestContext, bill: _Bill, hard: Scope | None) -> None:
        """After every budget answered: refuse (a hard one had no room), or downgrade (one is past its mark)."""
        if hard is not None:
            self.metrics.limit_rejections.labels("budget", hard.kind).inc()
            self._spawn(self._release(bill))
            raise BudgetExceeded(f"the {hard.kind}'s budget for this period is spent",
                                 headers={n.decode(): v.decode() for n, v in bill.headers})
        downgrade = bill.downgrade
        if downgrade is not None and downgrade != ctx.alias_label:
            route = ctx.runtime.policy.models.get(downgrade)
            if route is not None:
                ctx.route = route
                bill.headers.append((b"x-gateway-budget-downgrade", downgrade.encode()))

    def _budget_left(self, scope: Scope) -> BudgetLeft:
        """A scope's budget-left gauges. One per label pair (scopes past the label cap share `other`'s, so that
        it shows the last one written), found per scope in one look-up; both maps bounded like the labels."""
        left = self._gauges.get((scope.kind, scope.name))
        if left is None:
            label = (scope.kind, self.labels.name(scope))
            left = self._gauges_by_label.get(label)
            if left is None:
                left = self._gauges_by_label[label] = BudgetLeft(self.metrics.budget_remaining.labels(*label),
                                                                 self.metrics.budget_remaining_ratio.labels(*label))
            if len(self._gauges) < 10_000:
                self._gauges[(scope.kind, scope.name)] = left
        scope.budget_left = left  # the scope's own, from now on (scopes live as long as this stage)
        return left

    async def _release(self, bill: _Bill) -> None:
        """Undo what a refused request reserved (so it does not count against the others)."""
        for key in bill.requests:
            await self._quietly(self.store.settle(key, 1, 0, WINDOW_S))
        for held in [*bill.tokens, *bill.budgets]:
            await self._quietly(self.store.settle(held.key, held.reserved, 0, held.ttl_s))
        for key, holder in bill.slots:
            await self._quietly(self.store.release_slot(key, holder))
        bill.requests.clear()
        bill.tokens.clear()
        bill.budgets.clear()
        bill.slots.clear()
        bill.settled = True

    # -- after the call --------------------------------------------------------------------------------

    def _price(self, ctx: RequestContext) -> float:
        """The answer's cost, set on the context (telemetry counts it, logs it and sends the header)."""
        cost = ctx.cost_usd  # asked twice per request: the second time it is known
        if cost is None:
            cost = request_cost(ctx)
        return 0.0 if cost is None else cost

    async def _settle(self, ctx: RequestContext, bill: _Bill) -> None:
        if bill.settled:
            return
        bill.settled = True
        cost = self._price(ctx)
        remote = self._remote
        for kind, args in self._settle_ops(ctx, bill, cost):
            try:
                await remote[kind](*args)
            except StoreUnavailable:
                self._unsettled(kind, args)
        self._settled(ctx, bill, cost)

    def _settle_in_line(self, ctx: RequestContext, bill: _Bill, cost: float) -> None:
        """`_settle` on the in-process store (`cost`: the answer's, from `_price`): the same operations as
        `_settle_ops`, answered in line."""
        if bill.settled:
            return
        bill.settled = True
        store = self._in_line
        assert store is not None
        for held in bill.budgets:
            try:
                store.settle_now(held.key, held.reserved, cost, held.ttl_s)
            except StoreUnavailable:
                self._unsettled("spend", (held.key, held.reserved, cost, held.ttl_s))
        for key, ttl, _ in bill.unreserved:
            try:
                store.settle_now(key, 0.0, cost, ttl)
            except StoreUnavailable:
                self._unsettled("spend", (key, 0.0, cost, ttl))
        if bill.tokens:
            usage = ctx.usage
            actual = float(usage.prompt_tokens + usage.completion_tokens if usage is not None else 0)
            for held in bill.tokens:
                try:
                    store.settle_now(held.key, held.reserved, actual, WINDOW_S)
                except StoreUnavailable:
                    self._unsettled("settle", ())
        for key, holder in bill.slots:
            store.release_slot_now(key, holder)
        self._settled(ctx, bill, cost)

    def _settle_ops(self, ctx: RequestContext, bill: _Bill, cost: float) -> list[tuple[str, tuple[Any, ...]]]:
        """What settling asks of the store, in order: every budget to the actual cost (`spend`), every token
        window to the actual tokens, every slot given back."""
        ops: list[tuple[str, tuple[Any, ...]]] = []
        for held in bill.budgets:
            ops.append(("spend", (held.key, held.reserved, cost, held.ttl_s)))
        for key, ttl, _ in bill.unreserved:
            ops.append(("spend", (key, 0.0, cost, ttl)))
        if bill.tokens:
            usage = ctx.usage
            actual = float(usage.prompt_tokens + usage.completion_tokens if usage is not None else 0)
            for held in bill.tokens:
                ops.append(("settle", (held.key, held.reserved, actual, WINDOW_S)))
        for slot in bill.slots:
            ops.append(("release", slot))
        return ops

    def _unsettled(self, kind: str, args: tuple[Any, ...]) -> None:
        """A settle the store did not take: a budget's is owed by the ledger; the others are only counted."""
        if kind == "spend":
            key, reserved, actual, ttl_s = args
            self.ledger.owe(key, to_units(actual) - to_units(reserved), ttl_s)
        else:
            self.metrics.accounting_store_errors.labels("unsettled").inc()

    def _settled(self, ctx: RequestContext, bill: _Bill, cost: float) -> None:
        usage = ctx.usage
        reserved = bill.cost_reserved > 0 and ctx.upstream_started
        estimated = usage is not None and not ctx.usage_estimated and bill.prompt_estimate and usage.prompt_tokens
        if reserved or estimated:
            alias = ctx.alias_label
            reservation, tokens = self._drifts.get(alias) or self._drift(alias)
            if reserved:
                reservation.observe(cost / bill.cost_reserved)
            if estimated:
                assert usage is not None
                tokens.observe(bill.prompt_estimate / usage.prompt_tokens)
        self._record(ctx, cost)

    def _drift(self, alias: str) -> tuple[Any, Any]:
        """The alias's reservation and token estimate drift children, looked up together (one dict look-up)."""
        found = self._drifts.get(alias)
        if found is None:
            found = self._drifts[alias] = (self._reservation_drift(alias), self._token_drift(alias))
        return found

    def _record(self, ctx: RequestContext, cost: float) -> None:
        usage = ctx.usage
        key = ctx.key
        named = [("model", ctx.alias_label)]
        if key is not None:
            named += [("key", key.name), ("tenant", key.tenant)]
        delta = UsageDelta(to_units(cost), usage.prompt_tokens if usage else 0, usage.cached_tokens if usage else 0,
                           usage.completion_tokens if usage else 0, usage.reasoning_tokens if usage else 0)
        self.ledger.record(named, day_id(time.time()), delta)

    async def _quietly(self, op: Awaitable[Any]) -> None:
        try:
            await op
        except StoreUnavailable:
            self.metrics.accounting_store_errors.labels("unsettled").inc()

    async def _all(self, ops: list[Awaitable[Any]]) -> list[Any]:
        """Every result (or its `StoreUnavailable`), in order: one after the other on an in-process store
        (nothing to overlap), at once on a remote one (one round trip's wait for all)."""
        if len(ops) == 1 or self.store.in_process:
            results: list[Any] = []
            try:
                for op in ops:
                    try:
                        results.append(await op)
                    except StoreUnavailable as exc:
                        results.append(exc)
            finally:
                for op in ops[len(results) + 1:]:  # a bug raised: the rest were never started
                    if asyncio.iscoroutine(op):
                        op.close()
            return results
        return list(await asyncio.gather(*ops, return_exceptions=True))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def extend(self, ctx: RequestContext, bill: _Bill) -> bool:
        """A stream past its reservation: reserve one more step on every budget; False if a hard one refuses."""
        _, rate_out = self.rates.get(ctx.alias_label, (0.0, 0.0))
        step = self.default_cap * rate_out / 1_000_000
        if step <= 0:
            return True
        for held in bill.budgets:
            assert held.budget is not None
            try:
                answer = await self.store.reserve(held.key, step, held.budget.usd, held.ttl_s)
            except StoreUnavailable:
                if not self.fail_open:
                    return False
                continue
            if answer.ok:
                held.reserved += step
            elif held.budget.mode == "hard":
                return False
        bill.cost_reserved += step
        bill.completion_cap += self.default_cap
        return True


class _UsageOnly:
    """A stream no limit or budget applies to: its usage is counted at its end (after telemetry's estimate)."""

    __slots__ = ("_stage",)
    reads_events = False

    def __init__(self, stage: Accounting) -> None:
        self._stage = stage

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        stage = self._stage
        if ctx.usage is None and ctx.upstream_started:
            ctx.usage = await estimate_usage(stage.counter, ctx, ctx.chunks)
        stage._record(ctx, stage._price(ctx))


class _StreamBill:
    """Per stream: follows the answer's length (for the cut-off) and settles the bill once at its end.

    The length is the number of content chunks (about one token each from OpenAI-compatible servers), so
    that following it costs no decoding; the exact figure comes with the upstream's usage at the end."""

    __slots__ = ("_bill", "_stage", "reads_events")

    def __init__(self, stage: Accounting, bill: _Bill) -> None:
        self._stage = stage
        self._bill = bill
        # Events are read only when a stream can outgrow its reservation (a budget, no max_tokens).
        self.reads_events = bool(bill.budgets) and not bill.explicit_cap

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        bill = self._bill
        if ctx.chunks + len(events) <= bill.completion_cap:
            return events
        for index, event in enumerate(events):
            if type(event) is Chunk and ctx.chunks + index + 1 > bill.completion_cap:
                if not await self._stage.extend(ctx, bill):
                    return [*events[: index + 1], _final(ctx, event),
                            StreamError(BudgetExceeded("the budget for this period ran out during the answer; "
                                                       "it was cut off"))]
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        stage = self._stage
        if ctx.usage is None and ctx.upstream_started:
            ctx.usage = await estimate_usage(stage.counter, ctx, ctx.chunks)
        cost = stage._price(ctx)
        if stage._in_line is not None:
            stage._settle_in_line(ctx, self._bill, cost)
        else:
            await stage._settle(ctx, self._bill)


def _final(ctx: RequestContext, last: Chunk) -> Chunk:
    """The chunk that ends a cut stream: `finish_reason: "length"`, in the shape of the stream's chunks."""
    data = last.data()
    meta: dict[str, Any] = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if ctx.endpoint.label == "chat":
        choice["delta"] = {}
    else:
        choice["text"] = ""
    return Chunk.of({**meta, "choices": [choice]})
