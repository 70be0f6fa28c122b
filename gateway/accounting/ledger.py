"""What was spent, on its way to the store: usage counters per day, and spend the store missed.

Two jobs, one background flush (a runtime `Service`):

* usage: every finished request adds its cost, tokens and one request to per-(alias, key, tenant, UTC day)
  counters here, which the flush adds to each scope's (scope, name, day) counters and those to the store,
  once a second, so a request pays no extra round trip for `GET /admin/usage` (which is therefore up to a
  second behind) and one counter look-up instead of one per scope;
* reconciliation: a settle that the store could not take (Redis down, `on_unavailable: open`) is kept
  here as a delta per budget counter and added when the store answers again, so spend while Redis was away
  is not lost. The first flush after recovery brings every budget up to date, and its accounting stage's budget
  gauges with it (`on_budget_writes`).
* counters the store refuses while it answers (another program's value where a counter lives: a hash, a
  string that is not a number): a usage counter's addition is dropped, a budget counter's delta is sent again
  for at most `OP_RETRY_S`, then dropped; each logged once per counter, and the other counters written
  meanwhile. Only a store that is away stops a flush (everything then waits for the next one).
* operations in doubt: a settle whose answer was lost (a timeout: it may have been applied all the same), a
  reservation whose answer was lost (settled to nothing: given back if it was applied, stopped if it arrives
  later), and a settle that replaces what its reservation's record holds are kept one by one with their
  operation id and sent again under it (`Store.settle` with `op`: applied once however often it is sent), at
  each flush until the store answers, for at most `OP_RETRY_S`. Every usage or reconciliation write goes under
  an id of its own too, so that one whose answer was lost is sent again under it rather than added twice.
* releases: a concurrency slot the store could not give back is given back at a later flush (`owed_slots`).
* reloads: a retired runtime's ledger, once its last flush is done, passes what is left to the new runtime's
  ledger when both write the same data (`bequeath`); with no such heir (another store, a shutdown) what is left
  is dropped and counted (`_drop_unsent`).

The maps are bounded by the policy's finite scopes (the per-request one: by the key and alias pairs seen in a
second) times the days and periods they span; the number of pending budget entries is exported as
`gateway_accounting_pending_counters`, and every write given up as `gateway_accounting_dropped_total` by kind
(`usage`, `budget`, `operation`): a count an operator can alert on, since each is spend or usage not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable

from prometheus_client import Counter, Gauge

from ..store._common import AMOUNT_SCALE
from ..store.base import OP_TTL_S, Store, StoreRefused, StoreUnavailable
from .owed_slots import OwedSlots
from .periods import USAGE_DAYS_KEPT

__all__ = ["DROPPED_KINDS", "FIELDS", "OP_RETRY_S", "Ledger", "new_op", "usage_key"]

log = logging.getLogger("gateway.accounting")
FLUSH_INTERVAL_S = 1.0
FIELDS = ("cost_usd", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
_USAGE_TTL_S = USAGE_DAYS_KEPT * 86_400.0
_MAX_OPS = 100_000  # operations in doubt at once: those in flight when the store stalled (each a few hundred bytes)
DROPPED_KINDS = ("usage", "budget", "operation")  # what a write given up was (the dropped counter's label)
_MAX_REFUSED = 10_000  # refused counters remembered, to log each once (names hold their day: the set turns over)
OP_RETRY_S = OP_TTL_S - 60.0
"""How long an operation in doubt is sent again: within its record's life (`OP_TTL_S`), with a minute to spare
for the last attempt to be applied late in its turn. Past it, it is dropped (logged): the store did not answer
for that long, and a repeat could no longer be told from the first."""


BUDGET_COUNTERS = "acct:budget:"  # what a budget counter's key starts with (`Scope.budget_keys`)


def new_op() -> str:
    """A new operation id (64 random bits: unique among a counter's operations within `OP_TTL_S`)."""
    return os.urandom(8).hex()


def usage_key(scope: str, name: str, day: str, field: str) -> str:
    return f"acct:usage:{scope}:{name}:{day}:{field}"


class Ledger:
    """Per-runtime buffer between requests and the store; `flush()` runs every second while started."""

    def __init__(self, store: Store, metrics_pending: Gauge | None = None,
                 metrics_dropped: Counter | None = None) -> None:
        self.store = store
        self._usage: dict[tuple[str, str, str], list[int]] = {}  # (scope, name, day) -> counters (`FIELDS`)
        # (alias, key, tenant, day) -> counters: requests as they finish, added to each of their scopes' counters
        # at the flush (one look-up per request instead of one per scope)
        self._requests: dict[tuple[str, str | None, str | None, str], list[int]] = {}
        # budget counter -> (delta in micro-units, ttl, until when it is sent again (monotonic): `math.inf`
        # unless the store refused it while answering, `_keep_refused`)
        self._pending: dict[str, tuple[int, float, float]] = {}
        self._releases = OwedSlots()
        # (counter, op) -> (reserved, actual, ttl, until when it is sent again (monotonic), leased): `owe_op`
        self._ops: dict[tuple[str, str], tuple[float, float, float, float, bool]] = {}
        self._refused: set[str] = set()  # counters whose refusal was logged (`_first_refusal`)
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._heir: Ledger | None = None  # who takes what is left at the close (`bequeath`)
        # Asked after a flush that wrote owed spend to a budget counter (its accounting stage's gauges read the
        # store again, `Admission.refresh_budgets`): no settle's answer shows that spend.
        self.on_budget_writes: Callable[[], Awaitable[None]] | None = None
        self._closed = False
        self._gauge = metrics_pending
        # Each kind's child made now: its series shows 0 before any drop (an alert's expression has data).
        self._dropped = {kind: metrics_dropped.labels(kind) for kind in DROPPED_KINDS} if metrics_dropped else {}

    def record(self, alias: str, key: str | None, tenant: str | None, day: str, cost_micro: int, prompt: int,
               cached: int, completion: int, reasoning: int) -> None:
        """One finished request's usage (cost in micro-USD): counted for its alias, and for its key and the
        key's tenant when it has one (`key` None: no key, and `tenant` is not read)."""
        counters = self._requests.get((alias, key, tenant, day))
        if counters is None:
            self._requests[(alias, key, tenant, day)] = [cost_micro, 1, prompt, cached, completion, reasoning]
        else:  # in the order of `FIELDS`
            counters[0] += cost_micro
            counters[1] += 1
            counters[2] += prompt
            counters[3] += cached
            counters[4] += completion
            counters[5] += reasoning

    def _fold(self) -> None:
        """The requests recorded since the last flush, added to their scopes' counters."""
        requests, self._requests = self._requests, {}
        for (alias, key, tenant, day), values in requests.items():
            self._add(("model", alias, day), values)
            if key is not None:
                assert tenant is not None
                self._add(("key", key, day), values)
                self._add(("tenant", tenant, day), values)

    def _add(self, scope: tuple[str, str, str], values: list[int]) -> None:
        counters = self._usage.get(scope)
        if counters is None:
            self._usage[scope] = list(values)
        else:
            for index, value in enumerate(values):
                counters[index] += value

    def owe(self, key: str, delta_units: int, ttl_s: float) -> None:
        """A settle the store did not take: add `delta_units` (may be negative) to `key` later."""
        if delta_units == 0:
            return
        self._keep(key, delta_units, ttl_s, math.inf)
        self._show()

    def _keep(self, key: str, delta_units: int, ttl_s: float, until: float) -> None:
        earlier, _, earlier_until = self._pending.get(key, (0, ttl_s, math.inf))
        self._pending[key] = (earlier + delta_units, ttl_s, min(until, earlier_until))

    def owe_release(self, key: str, holder: str, lease_s: float) -> None:
        """A slot the store may still hold for `holder`: given back at the next flushes (`OwedSlots.owe`)."""
        self._releases.owe(key, holder, lease_s)

    def owe_op(self, key: str, op: str, reserved: float, actual: float, ttl_s: float, sent: bool = True,
               leased: bool = False) -> None:
        """A settle of `key` under `op` (`Store.settle`'s arguments) the store has not taken: sent again, under the
        same `op`, at the next flushes until the store answers (applied once, whether or not an earlier attempt
        was). `sent`: whether an attempt may have been applied (its answer was lost); from then on it is sent for
        at most `OP_RETRY_S`, the time a repeat is recognised in. A reservation whose answer was lost is owed as
        `reserved=actual=0`: given back if it was applied, and not applied if it arrives later. `leased`:
        `Store.settle`'s (the settle of a budget's reservation). Bounded: past
        `_MAX_OPS`, the oldest are dropped (logged)."""
        ops = self._ops
        found = ops.get((key, op))
        until = time.monotonic() + OP_RETRY_S if sent else math.inf
        if found is None:
            ops[(key, op)] = (reserved, actual, ttl_s, until, leased)
            self._trim_ops()
            self._show()
        elif until < found[3]:
            ops[(key, op)] = (*found[:3], until, found[4])

    def _trim_ops(self) -> None:
        ops = self._ops
        while len(ops) > _MAX_OPS:
            dropped = next(iter(ops))
            del ops[dropped]
            log.error("accounting: dropped an operation in doubt on %s (too many waiting): the counter may be "
                      "off by it", dropped[0])
            self._count_dropped("operation")

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._ops)

    def pending_usd(self) -> float:
        """What the store has not been told yet about spend on budget counters (positive deltas)."""
        return sum(units for units, _, _ in self._pending.values() if units > 0) / AMOUNT_SCALE

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="accounting-ledger")

    def bequeath(self, heir: Ledger) -> None:
        """What this ledger still holds when it closes passes to `heir`: the ledger of the runtime that replaced
        this one on the same store (the same Redis data), which sends it once the store answers. Without an heir
        (shutdown, or a reload onto another store) it is dropped at the close, and counted (`_drop_unsent`)."""
        self._heir = heir

    async def aclose(self) -> None:
        self.on_budget_writes = None  # (its stage is closing: the gauges are the next one's)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()  # the last second's usage (bounded: every store call has its timeout)
        self._closed = True
        heir = self._heir
        while heir is not None and heir._closed:  # closed meanwhile (reloads in quick succession): its own heir
            heir = heir._heir
        if heir is not None:
            heir._inherit(self)
        else:
            self._drop_unsent()

    def _inherit(self, old: Ledger) -> None:
        """Take on what `old` (a retired runtime's ledger, closed) holds for the store: usage, budget deltas, operations
        in doubt (under their ids and their deadlines) and slots owed, within this ledger's bounds."""
        old._fold()
        for scope, values in old._usage.items():
            self._add(scope, values)
        for key, (units, ttl, until) in old._pending.items():
            self._keep(key, units, ttl, until)
        self._ops.update(old._ops)
        self._trim_ops()
        self._releases.take(old._releases)
        if old._pending or old._ops:
            log.info("accounting: %d budget counter(s) and %d operation(s) the store has not taken passed to the "
                     "new policy's ledger", len(old._pending), len(old._ops))
        old._usage, old._pending, old._ops = {}, {}, {}
        self._show()

    def _drop_unsent(self) -> None:
        """At a close with no heir, what the last flush left (the store away) is lost: each counter and operation
        counted in `gateway_accounting_dropped_total`, and one line logged. Slots owed are left to their leases."""
        self._fold()
        usage = sum(1 for values in self._usage.values() for value in values if value)
        budget = [units for units, _, _ in self._pending.values() if units]
        operations = len(self._ops)
        if usage or budget or operations:
            log.error("accounting: closed with %d budget counter(s) (%+.6f USD), %d operation(s) in doubt and %d "
                      "usage counter(s) the store did not take: dropped, not counted", len(budget),
                      sum(budget) / AMOUNT_SCALE, operations, usage)
            self._count_dropped("budget", len(budget))
            self._count_dropped("operation", operations)
            self._count_dropped("usage", usage)
        self._usage, self._pending, self._ops = {}, {}, {}
        self._releases.clear()
        self._show()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception:  # a bug here must not stop later flushes
                log.exception("accounting flush failed")

    async def flush(self) -> None:
        """Add what is buffered to the store; what it does not take stays for the next flush. Then, if a budget
        counter took spend owed to it, `on_budget_writes`."""
        wrote = False
        async with self._flushing:
            if self._releases:
                await self._releases.give_back(self.store)
            if self._ops:
                wrote = await self._flush_ops()
            if self._pending:
                wrote = await self._flush_pending() or wrote
            if self._requests:
                self._fold()
            if self._usage:
                await self._flush_usage()
        if wrote and self.on_budget_writes is not None:
            await self.on_budget_writes()

    async def _flush_ops(self) -> bool:
        """Every operation in doubt sent again; whether a budget counter took one."""
        now = time.monotonic()
        ops = self._ops
        wrote = False
        for (key, op), (reserved, actual, ttl, until, leased) in list(ops.items()):
            if until <= now:
                del ops[(key, op)]
                log.error("accounting: gave up an operation on %s that the store did not take for %.0f s: the "
                          "counter may be off by it", key, OP_RETRY_S)
                self._count_dropped("operation")
                continue
            try:
                await self.store.settle(key, reserved, actual, ttl, op, leased)
            except StoreUnavailable as exc:
                # its time to be sent again runs from now if it was not running: sent, or refused by a store
                # that answers (the counter is not one), which would refuse it at every flush for good
                if exc.maybe_applied or isinstance(exc, StoreRefused):
                    self.owe_op(key, op, reserved, actual, ttl, leased=leased)
                if not isinstance(exc, StoreRefused):
                    break  # the store is away (or its pool is busy: nothing sent): the rest at the next flush
                continue  # this one refused: kept, and the others sent meanwhile
            except ValueError:
                log.error("accounting: dropped an unreconcilable amount on %s", key)
                self._count_dropped("operation")
            else:
                wrote = wrote or key.startswith(BUDGET_COUNTERS)
            ops.pop((key, op), None)
        self._show()
        return wrote

    async def _flush_pending(self) -> bool:
        """Every budget counter's owed spend sent; whether one took it."""
        pending, self._pending = self._pending, {}
        items = list(pending.items())
        taken = 0
        for index, (key, (units, ttl, until)) in enumerate(items):
            op = new_op()
            reserved, actual = (0.0, units / AMOUNT_SCALE) if units > 0 else (-units / AMOUNT_SCALE, 0.0)
            try:
                await self.store.settle(key, reserved, actual, ttl, op)
            except StoreUnavailable as exc:
                if exc.maybe_applied:  # sent: from now on under its id
                    self.owe_op(key, op, reserved, actual, ttl)
                elif isinstance(exc, StoreRefused):  # the store answers, and refused this counter alone
                    self._keep_refused(key, units, ttl, until)
                else:
                    self._keep(key, units, ttl, until)
                if not isinstance(exc, StoreRefused):  # the store is away (or its pool busy): the rest next flush
                    for later_key, (later_units, later_ttl, later_until) in items[index + 1:]:
                        self._keep(later_key, later_units, later_ttl, later_until)
                    break
                continue
            except ValueError:
                log.error("accounting: dropped an unreconcilable amount on %s", key)
                self._count_dropped("budget")
                continue
            taken += 1
        if taken:
            log.info("accounting: reconciled %d budget counter(s) with the store", taken)
        self._show()
        return taken > 0

    def _keep_refused(self, key: str, units: int, ttl: float, until: float) -> None:
        """A budget delta the store refused while it answered (the counter holds another program's value): sent
        again at each flush for at most `OP_RETRY_S` from its first refusal, as an operation in doubt is, then
        dropped (logged with its amount): kept for good, it would be sent every second for good. Spend owed
        to the counter meanwhile joins it, and is dropped with it."""
        now = time.monotonic()
        if until == math.inf:
            until = now + OP_RETRY_S
            if self._first_refusal(key):
                log.error("accounting: the store refused budget counter %s (not a counter: another program's "
                          "value there?); its spend is sent again for %.0f s, then dropped", key, OP_RETRY_S)
        if until > now:
            self._keep(key, units, ttl, until)
        else:
            log.error("accounting: dropped %+.6f USD owed to budget counter %s, which the store refused for "
                      "%.0f s: the budget does not count it", units / AMOUNT_SCALE, key, OP_RETRY_S)
            self._count_dropped("budget")

    def _first_refusal(self, counter: str) -> bool:
        """Whether `counter` is refused for the first time here (to log it once, not at every flush)."""
        refused = self._refused
        if counter in refused:
            return False
        if len(refused) >= _MAX_REFUSED:
            refused.clear()  # (bounded: a name may then be logged again)
        refused.add(counter)
        return True

    async def _flush_usage(self) -> None:
        usage, self._usage = self._usage, {}
        items = list(usage.items())
        for index, (scope, values) in enumerate(items):
            if not await self._write_usage(scope, values):  # the store is away: the rest at the next flush
                for (later, rest) in items[index:]:
                    self._add(later, rest)
                return

    async def _write_usage(self, scope: tuple[str, str, str], values: list[int]) -> bool:
        """Add one scope's counters to the store, each zeroed in `values` once it is off this replica's
        hands. False: the store is away, and what it did not take is left in `values`."""
        for position, field in enumerate(FIELDS):
            value = values[position]
            if not value:
                continue
            amount = value / AMOUNT_SCALE if field == "cost_usd" else float(value)
            counter, op = usage_key(*scope, field), new_op()
            try:
                await self.store.settle(counter, 0.0, amount, _USAGE_TTL_S, op)
            except StoreUnavailable as exc:
                if exc.maybe_applied:  # sent: from now on under its id (the next one fails fast if it is away)
                    self.owe_op(counter, op, 0.0, amount, _USAGE_TTL_S)
                elif not isinstance(exc, StoreRefused):  # away, or its pool busy (nothing sent): the next flush
                    return False
                # else it answers, and refused this counter alone: dropped. Kept, it would be refused at every
                # flush and lead every flush's queue (a request's alias is folded first), holding back the rest.
                else:
                    self._count_dropped("usage")
                    if self._first_refusal(counter):
                        log.error("accounting: the store refused usage counter %s (not a counter: another program's "
                                  "value there?); what this replica adds to it is dropped", counter)
            values[position] = 0  # taken, owed under its id, or dropped: a retry must not add it twice
        return True

    def _count_dropped(self, kind: str, count: int = 1) -> None:
        child = self._dropped.get(kind)
        if child is not None and count:
            child.inc(count)

    def _show(self) -> None:
        gauge = self._gauge
        if gauge is not None:
            gauge.set(len(self._pending) + len(self._ops))
