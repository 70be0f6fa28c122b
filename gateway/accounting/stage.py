"""The accounting stage: rate limits and budgets before the call, the bill after it.

Between `Authorize` and the guards, only in a policy that sets a limit or a budget somewhere. Per request:

1. limits (requests and tokens per minute, requests in flight) of the caller's key, its tenant and the alias,
   all asked of the `Store` at once; one that refuses undoes the others and answers 429 with `Retry-After`;
2. budgets: the request's expected largest cost (its prompt estimate plus its completion cap, or
   `accounting.default_max_tokens`, at the dearest of the alias's targets) is reserved atomically on every
   budget that applies, so concurrent requests on any number of replicas pass a budget only by what those
   in flight together spend past their own reservations (docs/accounting.md says when that happens); a
   hard budget without room answers 429 `budget_exceeded`, a soft one lets the request through with a
   header and a metric; past a budget's `downgrade.at`, the request goes to the cheaper alias;
3. the answer: each reservation is settled to the actual cost (tokens from the upstream, or counted when it
   reports none or counts out of range: settling.py `usable`): for a complete answer in line on the
   in-process store and in a task beside the reply on Redis (the client does not wait for the round trip),
   and at the end of a stream (`StreamBill`, settling.py), however it ends;
   a stream that outgrows its reservation reserves another step, and is cut off (`finish_reason: "length"`
   and an error event) when a hard budget refuses it; a request that ends without an answer while an upstream
   had it (the client gone, the request cancelled or the alias's deadline passed after it went out; or an attempt
   timed out waiting, or had its answer cut or too large: `ctx.upstream_sent`, as the router judged them), is
   billed its prompt estimate (`_left_usage`), as a stream left early is.

The caller's limits and budget are read from its `VirtualKey` only, so keys from the policy file and keys
created at run time go through this one path. When the store fails, `on_unavailable` decides: `closed`
answers 503; `open` serves, and the ledger adds the spend to the store once it answers again.
"""

from __future__ import annotations

import asyncio

from ..errors import GatewayError
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..policy.compiled import Policy
from ..store.base import Store
from ..store.memory import MemoryStore
from ..telemetry.metrics import Metrics
from ..telemetry.series import Children
from ..telemetry.usage import OFF_LOOP_CHARS, CountTokens, answer_text, count_text, estimate_usage, stream_text
from ..upstream.request import SENDING
from .admission import Admission
from .bill import Bill
from .hops import HOP, AliasHop
from .ledger import Ledger
from .prompt import PromptEstimator
from .scopes import BoundedLabels, ScopeIndex, hop_scopes
from .settling import Settling, StreamBill, UsageOnly, usable

__all__ = ["Accounting"]


class Accounting(Admission, Settling):
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
        self.scopes = ScopeIndex(policy)
        self.hop_scopes = hop_scopes(policy)  # the limits of an alias a request reaches by a hop (`hops`)
        self.rates = self.scopes.rates  # by alias: the dearest a request for it may reach (`reach_rates`)
        self._tasks = set()
        # The store's counter operations by what they do, awaited on a remote store.
        self._remote = {
            "concurrent": store.acquire_slot, "rpm": store.reserve_window, "tpm": store.reserve_window,
            "budget": store.reserve, "spend": store.settle, "settle": store.settle, "release": store.release_slot,
        }
        # The in-process store: its operations answered in line (`_admit_in_line`, `_settle_in_line`), so that
        # a request's accounting adds no coroutine per operation.
        self._in_line = store if isinstance(store, MemoryStore) else None
        self._gauges = {}  # by scope
        self._gauges_by_label = {}
        # By alias; written only on the event loop's thread (settling), so without the per-value lock when the
        # registry is single-process (`telemetry.series.loop_child`).
        self._reservation_drift = Children(metrics.reservation_drift, loop_only=True)
        self._token_drift = Children(metrics.token_estimate_drift, loop_only=True)
        self._drifts = {}  # alias -> both drift children (aliases: the policy's)
        self._today = (0.0, 0.0, "")  # no day yet: the first usage recorded looks it up
        self._warned_usage = set()  # targets whose invalid usage was logged as a warning (bounded)
        ledger.on_budget_writes = self.refresh_budgets  # spend the store had missed, written: the gauges read again

    async def start(self) -> None:
        await self.ledger.start()

    async def aclose(self) -> None:
        """After the runtime's last request: let pending settles finish (each op is bounded), then flush."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.ledger.aclose()

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        scopes = self.scopes.of(ctx)
        if not scopes.all and not scopes.hops:  # nothing to enforce: only count the usage, no task, no store call
            if not self.record_all:  # built only for keys made at run time: the others pass untouched
                return await call_next(ctx)
            reply = await call_next(ctx)
            if reply.stream is not None:
                reply.stream.add(UsageOnly(self))
                _text_without_usage(ctx, reply)
            else:
                usage = ctx.usage
                if usage is None or not usable(usage):
                    await self._answer_usage(ctx, reply)
                self._record(ctx, self._price(ctx))
            return reply
        bill = Bill()
        asked = ctx.route  # (a downgrade changes the route: the alias it sends to is a hop)
        if scopes.needs_tokens and len(ctx.raw_body) > OFF_LOOP_CHARS:
            await self.presize(ctx, bill, scopes.model)
        if self._in_line is not None:
            self._admit_in_line(ctx, bill, scopes)
        else:
            await self._admit(ctx, bill, scopes)
        if bill.headers:
            ctx.headers = [*(ctx.headers or ()), *bill.headers]
        sending = SENDING.set(ctx)  # (`ctx.upstream_sent`: whether a request left leaves an upstream at work)
        # A rule or a context fallback may take it to an alias with limits, or a budget downgraded it: the router
        # asks for that alias's limits (`hops`). Else nothing to set.
        hop = HOP.set(AliasHop(self, bill, asked.alias if asked is not None else "unknown")) \
            if scopes.hops or bill.downgrade is not None else None
        try:
            reply = await call_next(ctx)
        except GatewayError as exc:
            for name, value in bill.headers:
                exc.headers.setdefault(name.decode(), value.decode())
            self._drop_unusable(ctx)
            try:
                # An upstream at work on it (`ctx.upstream_sent`), as the router judged its attempts, however many
                # and whatever the error it answers with says: an attempt sent and cut by the alias's deadline, or one
                # that failed with its upstream at work (`upstream.client.at_work`: the gateway's own timeout waiting
                # for the answer to a request it sent, an answer cut after its head by a stall or a reset alike, or
                # too large to read: generated, so billed). Not a connect timeout (nothing sent), nor an upstream's
                # error status (its 408 or 504 too, as a 4xx), nor the deadline cutting a connect or passing after
                # such failures: nothing at work.
                if ctx.upstream_sent:
                    await self._left_usage(ctx)
            finally:
                self._spawn(self._settle(ctx, bill))
            raise
        except BaseException:  # the client gone, the request cancelled (shutdown), a bug
            self._drop_unusable(ctx)
            try:
                if ctx.upstream_sent:  # (sent, and not failed since, or failed at work: an upstream at work)
                    await self._left_usage(ctx)
            finally:
                self._spawn(self._settle(ctx, bill))
            raise
        finally:
            SENDING.reset(sending)
            if hop is not None:
                HOP.reset(hop)
        if reply.stream is not None:
            reply.stream.add_at_source(StreamBill(self, bill))  # (before an output guard: `StreamBill`)
            _text_without_usage(ctx, reply)  # after the bill, which may cut: the text the client got
            return reply
        usage = ctx.usage
        if usage is None or not usable(usage):  # (the usual answer brings its usage: no coroutine to ask for it)
            await self._answer_usage(ctx, reply)
        cost = self._price(ctx)  # the header and the access log (telemetry) read it from the context
        if self._in_line is not None:  # settling in memory never waits: no task needed beside the reply
            self._settle_in_line(ctx, bill, cost)
        elif self.store.in_process:
            await self._settle(ctx, bill)
        else:
            self._spawn(self._settle(ctx, bill))
        return reply

    async def _left_usage(self, ctx: RequestContext) -> None:
        """A request that ended without an answer while an upstream had it (the client gone, the request cancelled or
        the alias's deadline passed, after its request went out; or an attempt timed out waiting for the answer, or
        had it cut or too large: `ctx.upstream_sent`): billed its prompt estimate, once, marked, as a stream left early
        is (`StreamBill.on_end`); nothing of the answer it never got. Set before the error goes on, so that the access
        log and the metrics read the figure the bill does."""
        if ctx.usage is None and ctx.upstream_started:
            ctx.usage = await estimate_usage(self.counter, ctx, 0)

    async def _answer_usage(self, ctx: RequestContext, reply: Reply) -> None:
        """A complete answer without usage, or with usage the upstream got wrong (`usable`): counted now (the
        bill cannot wait for telemetry's count)."""
        self._drop_unusable(ctx)
        if ctx.usage is None and reply.body is not None and ctx.upstream_started:
            completion = await count_text(self.counter, answer_text(reply.body))
            ctx.usage = await estimate_usage(self.counter, ctx, completion)


def _text_without_usage(ctx: RequestContext, reply: Reply) -> None:
    """A stream whose provider reports no usage has its text collected (`stream_text`): its bill is settled at its
    end, before `CountTokens` would count that text, and a chunk count would bill it far too low."""
    provider = ctx.provider
    if provider is not None and not getattr(provider, "stream_usage_expected", True):
        stream_text(ctx, reply.stream)
