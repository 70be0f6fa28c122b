"""What one limited request holds between the two halves of the accounting stage, and what both halves share.

`Admission` (admission.py) checks limits and reserves budgets before the call, `Settling` (settling.py) settles
after it; `Accounting` (stage.py) is both. `StageState` declares the attributes `Accounting.__init__` sets, and
the few helpers both halves use.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

from ..pipeline.context import RequestContext
from ..policy.accounting_schema import BudgetSpec
from ..policy.compiled import Policy
from ..store._common import to_units
from ..store.base import Store, StoreUnavailable
from ..store.memory import MemoryStore
from ..telemetry.metrics import Metrics
from ..telemetry.series import Children, drop_child
from ..telemetry.usage import OFF_LOOP_CHARS, CountTokens
from .gauges import BudgetLeft
from .ledger import Ledger
from .prompt import PromptEstimator, estimate_prompt
from .scopes import OTHER, BoundedLabels, Scope, ScopeIndex

__all__ = ["NO_RATES", "WINDOW_S", "Bill", "Held", "Op", "StageState"]

WINDOW_S = 60.0  # requests and tokens per minute
NO_RATES = (0.0, 0.0)  # an alias without prices
Op = tuple[str, Scope, tuple[Any, ...]]  # (what: a key of `StageState._remote`, for whom, its arguments)


class Held(NamedTuple):
    """One reservation to settle: a budget counter, or a token window. (A named tuple: made on every budgeted
    request, where `tuple.__new__` costs a fraction of a dataclass's `__init__`; a stream that reserves
    another step replaces it.)"""

    key: str
    reserved: float
    ttl_s: float
    scope: Scope
    budget: BudgetSpec | None = None  # None: a token window
    units: int = 0  # `reserved` in the store's millionths, when the in-process store holds it (settled in them)
    # A token window's end (`time.monotonic()`): settled after it, the reservation would be taken off the next window,
    # which never held it (the window's key is the same), and that window would admit as much more.
    until: float = math.inf
    op: str = ""  # a budget's reservation id on a remote store (`Store.reserve`): its steps and settle go under it


class Bill:
    """Per request: what was reserved, and what the answer must settle."""

    __slots__ = ("budgets", "completion_cap", "cost_reserved", "downgrade", "explicit_cap", "headers", "op",
                 "prompt_estimate", "requests", "settled", "slots", "tokens", "unreserved")

    def __init__(self) -> None:  # made on every limited request: no dataclass factories
        self.prompt_estimate = 0
        self.completion_cap = 0
        self.explicit_cap = False
        self.cost_reserved = 0.0
        self.budgets: list[Held] = []
        # The rarer holdings are tuples, replaced as they grow: most requests hold none, and an empty tuple
        # is shared where an empty list is made per request.
        self.tokens: tuple[Held, ...] = ()
        self.slots: tuple[tuple[str, str], ...] = ()  # (key, holder)
        self.requests: list[str] = []  # request windows counted (undone if refused)
        self.unreserved: tuple[tuple[str, float, Scope], ...] = ()  # budgets to add the actual to
        self.headers: list[tuple[bytes, bytes]] = []
        self.downgrade: str | None = None  # the cheaper alias a budget past its `downgrade.at` sends it to
        self.settled = False
        self.op = ""  # the id its budget reservations go under on a remote store (`ledger.new_op`), once made


class StageState:
    """The accounting stage's state (set by `Accounting.__init__`) and the helpers both halves use."""

    policy: Policy
    store: Store
    ledger: Ledger
    metrics: Metrics
    counter: CountTokens
    prompts: PromptEstimator
    fail_open: bool
    default_cap: int
    record_all: bool
    lease_s: float
    labels: BoundedLabels
    rates: dict[str, tuple[float, float]]
    scopes: ScopeIndex
    hop_scopes: dict[str, Scope]  # by alias: the limits a request reaching it by a hop takes (`hops`)
    _tasks: set[asyncio.Task[Any]]
    _remote: dict[str, Callable[..., Awaitable[Any]]]  # the store's counter operations by what they do
    _in_line: MemoryStore | None  # the in-process store, answered in line (None: a remote one)
    _gauges: dict[tuple[str, str], BudgetLeft]
    _gauges_by_label: dict[tuple[str, str], BudgetLeft]
    _reservation_drift: Children
    _token_drift: Children
    _drifts: dict[str, tuple[Any, Any]]
    _today: tuple[float, float, str]  # (start, end, id) of the UTC day usage was last recorded on
    _warned_usage: set[str]  # targets whose invalid usage was logged as a warning (`Settling._drop_unusable`)

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

    def forget_key(self, key_id: str) -> None:
        """A key made at run time was revoked or rotated (`DynamicKeys.on_forget`): its budget's gauges dropped, and
        what this stage kept of them. They kept the key's last figure for the life of the process, so that an alert
        on a nearly spent budget fired for good for a key that was gone, and a new key of its name (whose counters
        are its own id's) showed the old one's figure. A rotated key's come back with its next request. In
        multiprocess mode a series cannot be removed: it reads as all left (ratio 1, USD +Inf), as a reload's
        dropped budgets do (`runtime_handover.drop_series`)."""
        counted = f"acct:conc:key:{key_id}"  # (a run-time key's scope counts under its id: `Scope`)
        for scope in self.scopes.budgeted():
            if scope.slot_key != counted:
                continue
            scope.budget_left = None
            label = ("key", self.labels.name(scope))
            dropped = self._gauges.pop(("key", scope.name), None)
            if dropped is None or label[1] == OTHER:  # (`other` is every capped name's)
                continue
            self._gauges_by_label.pop(label, None)
            drop_child(self.metrics.budget_remaining, label, math.inf, self.metrics.multiprocess)
            drop_child(self.metrics.budget_remaining_ratio, label, 1.0, self.metrics.multiprocess)

    def _show_total(self, scope: Scope, key: str, total: float) -> None:
        """A budget's gauges from its counter's `total` (USD) as the store answered a settle or a give-back: what
        is spent and what open reservations (others') hold. Shown at the reservation alone, they kept counting
        the request's whole reservation (its cap at the dearest target) after it settled for far less, and an idle
        key's gauge read nearly spent for good (`GatewayBudgetNearlySpent`). Not when `key`, the counter that
        answered, is a period's before the current one (a request reserved before its budget's period ended,
        settled after): its total would stand for the new period's."""
        budget, keys = scope.budget, scope.budget_keys
        if budget is None or keys is None or keys.at(time.time())[0] != key:
            return
        left = budget.usd - total
        left = left if left > 0.0 else 0.0
        (scope.budget_left or self._budget_left(scope)).show(left, left / budget.usd)

    async def presize(self, ctx: RequestContext, bill: Bill, model: str | None) -> None:
        """A body past `OFF_LOOP_CHARS`: its prompt estimate counted in a thread, which the sizing then keeps
        (`Admission._size`): on the loop, tiktoken takes seconds over a few MB, every other request waiting."""
        if len(ctx.raw_body) > OFF_LOOP_CHARS:
            bill.prompt_estimate = await asyncio.to_thread(estimate_prompt, self.counter.tokens, ctx.body, model,
                                                           ctx.endpoint)

    def _owe_spend(self, key: str, reserved: float, actual: float, ttl_s: float, op: str = "",
                   exc: StoreUnavailable | None = None, leased: bool = False) -> None:
        """A budget settle (`Store.settle`'s arguments) the store did not take, owed by the ledger: under its `op`
        (sent again as it is: applied once) when it may have been applied, or when it replaces a reservation (whose
        record may hold steps whose answers were lost; these are as many as the requests in flight when the store
        went away); else (surely not applied, nothing reserved: spend served while the store was away, however
        much of it) added to the counter's other owed spend. `leased`: `Store.settle`'s (a budget's reservation)."""
        sent = exc is None or exc.maybe_applied
        if op and (sent or reserved > 0.0):
            self.ledger.owe_op(key, op, reserved, actual, ttl_s, sent, leased)
        else:
            self.ledger.owe(key, to_units(actual) - to_units(reserved), ttl_s)

    def _owe_release(self, key: str, holder: str) -> None:
        """A slot the store may still hold for `holder` (its release failed, or its take timed out and may have been
        applied): given back by the ledger's next flushes, so that it does not hold the key's limit for its lease."""
        self.ledger.owe_release(key, holder, self.lease_s)
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
