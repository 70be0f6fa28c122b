"""The accounting stage after the call: the bill settled to the actual cost (see stage.py for the whole).

A complete answer is settled when the stage returns it (in line on the in-process store); a stream at its end
(`StreamBill`), however it ends, after following its length so that a hard budget can cut it off.

An upstream's usage is billed only when every count in it is in [0, `MAX_TOKENS`]: other figures (a negative
count, an absurd one) are an upstream's error, billed as if it had reported no usage (the gateway's own count,
marked `usage_estimated`) and logged without any text of the request. Settling never raises on a figure: the
cost is kept in [0, `_FAST_AMOUNT`), and whatever fails, every slot is given back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from math import floor
from random import random
from typing import Any

from ..errors import BudgetExceeded, GatewayError, LimitsUnavailable
from ..pipeline.context import RequestContext
from ..pipeline.streams import StreamEnd
from ..schemas.endpoints import Endpoint
from ..schemas.events import Chunk, StreamDone, StreamError, StreamEvent
from ..schemas.openai import Usage, listed_prompts
from ..store._common import AMOUNT_SCALE, to_units
from ..store.base import StoreUnavailable
from ..telemetry.usage import estimate_stream_usage
from .bill import WINDOW_S, Bill, StageState
from .cost import rejected_tokens, request_cost
from .ledger import new_op
from .outright import MAX_TOKENS
from .periods import day_span
from .scopes import Scope

__all__ = ["MAX_TOKENS", "Settling", "StreamBill", "UsageOnly", "micro", "usable"]

log = logging.getLogger("gateway.accounting")
_FAST_AMOUNT = 9e9  # costs in [0, this) become micro-USD in line (`_price` keeps every cost in it)
_MAX_COST = 1e9  # what an absurd cost is billed as (`usable` usage costs at most $2e8: 2 x MAX_TOKENS at the
# schema's top price, $1 a token)
_WARNED_TARGETS = 256  # targets whose invalid usage was logged as a warning (later ones: at debug level)
_SettleOp = tuple[str, tuple[Any, ...], Scope | None]  # what, its arguments, whose budget gauges it sets


def micro(cost: float) -> int:
    """`cost` in the store's millionths of a dollar: rounded down or up, up with the probability of the fraction
    it drops, so that what many requests add up to is right on average. Rounded to the nearest, a request under
    half a millionth (an embedding of a few dozen tokens) added nothing, however many there were."""
    amount = cost * AMOUNT_SCALE
    whole = floor(amount)
    return whole + (random() < amount - whole)


def usable(usage: Usage) -> bool:
    """Whether an upstream's usage can be billed (`Usage.usable`: every count in [0, `MAX_TOKENS`])."""
    return usage.usable()


class Settling(StageState):
    """The bill after the call: every reservation settled to the actual, drifts observed, usage recorded."""

    def _price(self, ctx: RequestContext) -> float:
        """The answer's cost, set on the context (telemetry counts it, logs it and sends the header)."""
        cost = ctx.cost_usd  # asked twice per request: the second time it is known
        if cost is None:
            cost = request_cost(ctx)
            if cost is None:
                return 0.0
        if not 0.0 <= cost < _FAST_AMOUNT:  # NaN or negative: 0; absurd: `_MAX_COST` (`usable` usage never is)
            cost = ctx.cost_usd = 0.0 if not cost > 0.0 else _MAX_COST
        return cost

    def _drop_unusable(self, ctx: RequestContext) -> None:
        """Usage the upstream got wrong (not `usable`): logged (the target and the figures, no text) and dropped,
        so that the caller bills the gateway's own count, as for an upstream that reports none."""
        usage = ctx.usage
        if usage is None or usable(usage):
            return
        target = ctx.target
        name = target.name if target is not None else "unknown"
        warned = self._warned_usage
        level = logging.DEBUG
        if name not in warned and len(warned) < _WARNED_TARGETS:
            warned.add(name)
            level = logging.WARNING
        log.log(level, "accounting: %s reported invalid usage (prompt %d, completion %d, cached %s, cache write %s, "
                "reasoning %s tokens): billed the gateway's own count instead (from now on logged at debug level "
                "for this target)", name, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
                usage.cache_write_tokens, usage.reasoning_tokens)
        ctx.usage = None
        ctx.cost_usd = None

    async def _settle(self, ctx: RequestContext, bill: Bill) -> None:
        if bill.settled:
            return
        bill.settled = True
        units = micro(self._price(ctx))
        cost = units / AMOUNT_SCALE  # (what the store makes of it again is `units`: every budget and the ledger agree)
        remote = self._remote
        for kind, args, budget in self._settle_ops(ctx, bill, cost):
            try:
                answer = await remote[kind](*args)
            except StoreUnavailable as exc:
                self._unsettled(kind, args, exc)
            except Exception:  # a bug: logged, and the later operations (the slots given back) still run
                log.exception("accounting: a settle operation failed (%s)", kind)
            else:
                if budget is not None:  # a budget's new total: its gauges show what is left now
                    self._show_total(budget, args[0], answer)
        self._settled(ctx, bill, cost, units)

    def _settle_in_line(self, ctx: RequestContext, bill: Bill, cost: float) -> None:
        """`_settle` on the in-process store (`cost`: the answer's, from `_price`): the same operations as
        `_settle_ops`, answered in line, in the store's millionths (the cost converted once for every budget
        and the ledger), then `_settled`'s steps."""
        if bill.settled:
            return
        bill.settled = True
        store = self._in_line
        assert store is not None
        units = micro(cost)  # (`_price` keeps `cost` in its fast range)
        try:
            now = time.time() if bill.budgets else 0.0  # (the period each budget's gauges show: `_show_total`)
            for held in bill.budgets:
                try:
                    total = store.settle_units_now(held.key, units - held.units, held.ttl_s)
                except StoreUnavailable:  # owed: the rounded figure, as the ledger records it
                    self._unsettled("spend", (held.key, held.reserved, units / AMOUNT_SCALE, held.ttl_s))
                    continue
                budget, scope = held.budget, held.scope  # `_show_total`, in line: what is left after the settle
                assert budget is not None and scope.budget_keys is not None
                if scope.budget_keys.at(now)[0] != held.key:  # reserved in a period that has ended since
                    continue
                left = budget.usd - total / AMOUNT_SCALE
                left = left if left > 0.0 else 0.0
                (scope.budget_left or self._budget_left(scope)).show(left, left / budget.usd)
            for key, ttl, scope in bill.unreserved:
                try:
                    total = store.settle_units_now(key, units, ttl)
                except StoreUnavailable:
                    self._unsettled("spend", (key, 0.0, units / AMOUNT_SCALE, ttl))
                    continue
                self._show_total(scope, key, total / AMOUNT_SCALE)
            if bill.tokens:
                tokens = _request_tokens(ctx)
                actual = (tokens if 0 <= tokens <= 2 * MAX_TOKENS else _tokens(tokens)) * AMOUNT_SCALE
                now = time.monotonic()
                for held in bill.tokens:
                    if held.until <= now:  # its window ended, and its reservation with it
                        continue
                    try:
                        store.settle_units_now(held.key, actual - held.units, WINDOW_S)
                    except StoreUnavailable:
                        self._unsettled("settle", ())
        finally:  # whatever failed above, the slots are given back (no 429 until their lease ends)
            for key, holder in bill.slots:
                store.release_slot_now(key, holder)
        self._settled(ctx, bill, cost, units)

    def _settle_ops(self, ctx: RequestContext, bill: Bill, cost: float) -> list[_SettleOp]:
        """What settling asks of the store, in order: every budget to the actual cost (`spend`: a reservation under
        its id, leased: `Store.settle`'s `leased`; a budget not reserved under an id of its own, apart from a
        reservation of it whose answer was lost and which the ledger settles to nothing), every token window to the
        actual tokens, every slot given back.
        Each with the scope whose budget gauges its answer (the counter's new total) sets, if any."""
        ops: list[_SettleOp] = []
        for held in bill.budgets:
            ops.append(("spend", (held.key, held.reserved, cost, held.ttl_s, held.op, True), held.scope))
        if bill.unreserved:
            spend = (bill.op or new_op()) + ".s"
            for key, ttl, scope in bill.unreserved:
                ops.append(("spend", (key, 0.0, cost, ttl, spend), scope))
        if bill.tokens:
            actual = float(_tokens(_request_tokens(ctx)))
            now = time.monotonic()
            for held in bill.tokens:
                if held.until > now:  # (else its window ended, and its reservation with it)
                    ops.append(("settle", (held.key, held.reserved, actual, WINDOW_S), None))
        for slot in bill.slots:
            ops.append(("release", slot, None))
        return ops

    def _unsettled(self, kind: str, args: tuple[Any, ...], exc: StoreUnavailable | None = None) -> None:
        """A settle the store did not take: a budget's is owed by the ledger (`_owe_spend`), and so is a slot's
        release (retried until taken or its lease ends); a token window's is only counted."""
        if kind == "spend":
            key, reserved, actual, ttl_s, *rest = args  # (the in-line store's have no id: never in doubt)
            self._owe_spend(key, reserved, actual, ttl_s, rest[0] if rest else "", exc, len(rest) > 1 and rest[1])
        elif kind == "release":
            self._owe_release(*args)
        else:
            self.metrics.accounting_store_errors.labels("unsettled").inc()

    def _settled(self, ctx: RequestContext, bill: Bill, cost: float, cost_micro: int = -1) -> None:
        """The drifts observed and the usage recorded (`cost_micro`: the cost in millionths, when known)."""
        usage = ctx.usage
        reserved = bill.cost_reserved > 0 and ctx.upstream_started
        estimated = usage is not None and not ctx.usage_estimated and bill.prompt_estimate and usage.prompt_tokens
        if reserved or estimated:
            route = ctx.route
            alias = route.alias if route is not None else "unknown"  # `ctx.alias_label`, in line
            reservation, tokens = self._drifts.get(alias) or self._drift(alias)
            if reserved:
                reservation.observe(cost / bill.cost_reserved)
            if estimated:
                assert usage is not None
                tokens.observe(bill.prompt_estimate / usage.prompt_tokens)
        self._record(ctx, cost, cost_micro)

    def _drift(self, alias: str) -> tuple[Any, Any]:
        """The alias's reservation and token estimate drift children, looked up together (one dict look-up)."""
        found = self._drifts.get(alias)
        if found is None:
            found = self._drifts[alias] = (self._reservation_drift(alias), self._token_drift(alias))
        return found

    def _record(self, ctx: RequestContext, cost: float, cost_micro: int = -1) -> None:
        """The request's usage, to the ledger (`cost_micro`: `cost` in millionths, when the caller has it)."""
        usage = ctx.usage
        key = ctx.key
        route = ctx.route
        alias = route.alias if route is not None else "unknown"  # `ctx.alias_label`, in line
        if cost_micro < 0:
            cost_micro = micro(cost)  # (`_price` keeps `cost` in its fast range)
        name, tenant = (key.name, key.tenant) if key is not None else (None, None)
        now = time.time()
        today = self._today  # `day_id(now)`, asked once a day
        if not today[0] <= now < today[1]:
            today = self._today = day_span(now)
        day = today[2]
        if ctx.rejected is not None:  # answers refused on the way: their tokens counted with the answer's
            self._record_rejected(ctx, alias, name, tenant, day, cost_micro)
            return
        if usage is None:
            self.ledger.record(alias, name, tenant, day, cost_micro, 0, 0, 0, 0)
            return
        given, made = usage.prompt_tokens_details, usage.completion_tokens_details
        self.ledger.record(alias, name, tenant, day, cost_micro, usage.prompt_tokens,
                           (given.cached_tokens or 0) if given is not None else 0, usage.completion_tokens,
                           (made.reasoning_tokens or 0) if made is not None else 0)  # `usage.cached_tokens`, ...

    def _record_rejected(self, ctx: RequestContext, alias: str, name: str | None, tenant: str | None, day: str,
                         cost_micro: int) -> None:
        """`_record` for a request that had answers refused (`RequestContext.rejected`): their tokens beside the
        answer's, as its cost counts them (`cost.request_cost`)."""
        prompt, cached, completion, reasoning = rejected_tokens(ctx)
        usage = ctx.usage
        if usage is not None:
            prompt += usage.prompt_tokens
            cached += usage.cached_tokens
            completion += usage.completion_tokens
            reasoning += usage.reasoning_tokens
        self.ledger.record(alias, name, tenant, day, cost_micro, prompt, cached, completion, reasoning)

    async def extend(self, ctx: RequestContext, bill: Bill) -> GatewayError | None:
        """A stream past its reservation: reserve one more step on every budget; the error to cut it with if a hard
        one refuses (`BudgetExceeded`), or cannot be asked and limits fail closed (`LimitsUnavailable`: the store's
        outage, not a spent budget; a soft budget, which never refuses, is not asked again then), else None. A
        stream no upstream generates (a cache hit's replay: `upstream_started` never set) spends nothing: no step
        to reserve, nothing to refuse, so it is never cut (asked only past the cap: a miss pays nothing for it)."""
        if not ctx.upstream_started:
            return None
        _, rate_out = self.rates.get(ctx.alias_label, (0.0, 0.0))
        step = self.default_cap * rate_out / 1_000_000
        if step <= 0:
            return None
        for index, held in enumerate(bill.budgets):
            assert held.budget is not None
            try:
                # under the reservation's id: a step whose answer is lost is still replaced by the settle; its lease
                # renewed (a stream that steps at least once per `lease_s` is never swept)
                answer = await self.store.reserve(held.key, step, held.budget.usd, held.ttl_s, held.op, held.reserved,
                                                  self.lease_s)
            except StoreUnavailable:
                if not self.fail_open and held.budget.mode == "hard":
                    self.metrics.accounting_store_errors.labels("refused").inc()
                    return LimitsUnavailable("limits and budgets could not be checked as the answer went on; it was "
                                             "cut off (retry shortly)")
                continue
            if answer.ok:  # (`units`, as the store counted it)
                bill.budgets[index] = held._replace(reserved=held.reserved + step, units=held.units + to_units(step))
            elif held.budget.mode == "hard":
                return BudgetExceeded("the budget for this period ran out during the answer; it was cut off")
        bill.cost_reserved += step
        bill.completion_cap += self.default_cap
        return None


class UsageOnly:
    """A stream no limit or budget applies to: its usage is counted at its end (after telemetry's estimate)."""

    __slots__ = ("_stage",)
    reads_events = False

    def __init__(self, stage: Settling) -> None:
        self._stage = stage

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        stage = self._stage
        usage = ctx.usage
        if usage is not None and not usable(usage):  # an upstream's error: counted as when it reports none
            stage._drop_unusable(ctx)
        if ctx.usage is None and ctx.upstream_started:
            ctx.usage = await estimate_stream_usage(stage.counter, ctx, end.usage_so_far)
        stage._record(ctx, stage._price(ctx))


class StreamBill:
    """Per stream: follows the answer's length (for the cut-off) and settles the bill once at its end.

    The length is the number of content chunks (about one token each from OpenAI-compatible servers; of a
    Responses stream, its `*.delta` events only: `Chunk.content`, `pipeline.streams`), so that following it costs
    no decoding; the exact figure comes with the upstream's usage at the end. Below
    the reserved length it does nothing (`passes_up_to`), so the edge keeps polling the provider's stream.

    It reads the upstream's own events: `ReplyStream.add_at_source` puts it before an output guard, which
    holds text back and releases it merged. Behind the guard, a cut could fall only where the guard released text,
    past the chunk that crossed the budget, and what the guard still held was dropped though billed; before it, the
    cut falls on the upstream's chunk that crossed, and the guard checks and releases what it held up to there."""

    __slots__ = ("_bill", "_finished", "_stage", "reads_events")
    looks_only = False  # (it may cut: `passes_up_to` says when; found here, `ReplyStream.add` asks no further)

    def __init__(self, stage: Settling, bill: Bill) -> None:
        self._stage = stage
        self._bill = bill
        # Events are read only when a stream can outgrow its reservation (a budget, no max_tokens).
        self.reads_events = bool(bill.budgets) and not bill.explicit_cap
        # Of a stream of several choices (`n`, or a completion's prompts): the choices finished so far, read from
        # every batch, so that a cut finishes only the others (`_final`); None until known (one choice: stays ())
        self._finished: set[int] | tuple[()] | None = None

    def passes_up_to(self, ctx: RequestContext) -> int:
        """The length up to which `on_events` passes batches untouched: a polled stream stays polled, and runs
        `on_events` only on a batch that may cross it (`pipeline.streams`); of several choices, none (each batch is
        read for the choices it finishes)."""
        finished = self._finished
        if finished is None:
            finished = self._finished = set() if _choice_count(ctx) > 1 else ()
        return self._bill.completion_cap if finished == () else -1

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        """`ctx.chunks` is the upstream's content chunks so far, this batch's included (counted before any stage
        read it): past the cap, each content chunk of the batch that crosses it asks for one more step (a Responses
        stream's lifecycle events, `Chunk.content` False, take none, and the cut never falls on one). An output
        guard comes after this stage (`ReplyStream.add_at_source`); should a stage before it hold or merge chunks, the
        batch holds fewer than the upstream sent, the first of them crosses the cap, and a batch with none still asks
        for the steps the upstream's chunks took: the bill follows what the upstream generated. A cut stream is billed
        for what it sent (`docs/accounting.md`): the content chunks up to the one that crossed (`_billed_at_cut`)."""
        bill = self._bill
        if ctx.chunks <= bill.completion_cap:
            if type(self._finished) is set:  # several choices: each batch is read for those it finishes
                _note_finished(self._finished, events)
            return events
        positions = [index for index, event in enumerate(events) if type(event) is Chunk and event.content]
        seen = ctx.chunks - len(positions) if len(positions) < ctx.chunks else 0
        for index in positions or (None,):
            seen = seen + 1 if index is not None else ctx.chunks
            while seen > bill.completion_cap:
                cap = bill.completion_cap
                refused = await self._stage.extend(ctx, bill)
                if refused is not None:
                    ctx.chunks = _billed_at_cut(seen, cap, index)  # the chunks after the cut are not billed
                    return self._cut(ctx, events, index, refused)
                if bill.completion_cap == cap:  # no price (or no upstream) to reserve for: nothing to refuse either
                    break
        if type(self._finished) is set:
            _note_finished(self._finished, events)
        return events

    def _cut(self, ctx: RequestContext, events: list[StreamEvent], index: int | None,
             error: GatewayError) -> list[StreamEvent]:
        """The batch up to the chunk at `index` (None: all of it), then the end of a cut stream (with `error`)."""
        cut = StreamError(error)
        if index is None:  # no chunk in the batch (held by a stage): the end of an answer already sent is kept
            return events if any(type(event) is StreamDone for event in events) else [*events, cut]
        if ctx.endpoint is Endpoint.RESPONSES:  # its events have no chunk shape: the error event ends it
            return [*events[: index + 1], cut]
        return [*events[: index + 1], *_final(ctx, events[: index + 1], self._finished or ()), cut]

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        stage = self._stage
        usage = ctx.usage
        if usage is not None and not usable(usage):  # an upstream's error: counted as when it reports none
            stage._drop_unusable(ctx)
        if ctx.usage is None and ctx.upstream_started:
            ctx.usage = await estimate_stream_usage(stage.counter, ctx, end.usage_so_far)
        cost = stage._price(ctx)
        if stage._in_line is not None:
            stage._settle_in_line(ctx, self._bill, cost)
        else:
            await stage._settle(ctx, self._bill)


def _billed_at_cut(seen: int, cap: int, index: int | None) -> int:
    """The chunks a cut stream is billed for: those up to the one that crossed its last step (`seen`, the count at
    the chunk the cut falls on). With no chunk in the batch to cut at (`index` None: a stage before the bill holds
    them), `seen` is every chunk the upstream sent so far, held ones too, which the cut drops unsent: the bill stops
    at the chunk that crossed (`cap` + 1), as the upstream's own chunks would have cut it, never past the budget."""
    return seen if index is not None or seen <= cap else cap + 1


def _request_tokens(ctx: RequestContext) -> int:
    """The request's tokens for its token windows: the answer's, and those of any answer refused on the way."""
    usage = ctx.usage
    tokens = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
    if ctx.rejected is not None:
        prompt, _, completion, _ = rejected_tokens(ctx)
        tokens += prompt + completion
    return tokens


def _tokens(tokens: int) -> int:
    """A token count for a token window, kept in [0, 2 x `MAX_TOKENS`] (what any `usable` usage adds up to)."""
    return 0 if tokens < 0 else min(tokens, 2 * MAX_TOKENS)


def _note_finished(finished: set[int], events: list[StreamEvent]) -> None:
    """The choices `events` finish, added to `finished` (`StreamBill._finished`)."""
    finished.update(choice.get("index") for event in events if type(event) is Chunk
                    for choice in _choices(event) if choice.get("finish_reason") is not None)


def _choice_count(ctx: RequestContext) -> int:
    """The choices a stream's request asked for: `n` of them; of a completion, `n` for each prompt listed."""
    body = ctx.body
    n = body.get("n")
    return (n if type(n) is int and n > 1 else 1) * (
        1 if ctx.endpoint is Endpoint.CHAT else len(listed_prompts(body.get("prompt"))))


def _final(ctx: RequestContext, batch: list[StreamEvent], finished: Iterable[Any]) -> list[StreamEvent]:
    """The chunk that ends a cut stream (none when no choice is open): `finish_reason: "length"` for each choice
    the request asked for (`_choice_count`) that neither `batch`, the events up to the cut, nor an earlier batch
    (`finished`: read by `StreamBill.on_events`) finished, in the shape of the stream's chunks."""
    last = batch[-1]  # (the content chunk that crossed the reservation)
    data = last.data() if type(last) is Chunk else {}
    meta: dict[str, Any] = {k: data[k] for k in ("id", "object", "created", "model") if k in data}
    chat = ctx.endpoint is Endpoint.CHAT
    count = _choice_count(ctx)
    done = {choice.get("index") for event in batch if type(event) is Chunk
            for choice in _choices(event) if choice.get("finish_reason") is not None}
    done.update(finished)
    part: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    choices = [{"index": i, **part, "finish_reason": "length", "logprobs": None} for i in range(count) if i not in done]
    return [Chunk.of({**meta, "choices": choices})] if choices else []


def _choices(chunk: Chunk) -> list[Any]:
    choices = chunk.data().get("choices")
    return [choice for choice in choices if isinstance(choice, dict)] if isinstance(choices, list) else []
