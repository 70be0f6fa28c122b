"""How a request's limits and budgets are taken together, and what a refused request took given back.

A request reserves on several scopes at once (its key's window and its tenant's, its key's budget and its
tenant's...). Taken one by one, a request one scope refuses held the others until it gave them back, one round
trip later: meanwhile every other request counted it, and a tenant within its limit refused its other keys (a
burst from a key over its own `rpm: 3` left its tenant of `rpm: 15` serving 12 to 14). So a remote store takes a
group's reservations in one atomic step (`Store.reserve_together`: a refused request holds nothing, ever), and
the in-process store gives back in line, before any other request is admitted. What is left to give back then
(a request whose limits were taken and whose budget refused it; a Redis Cluster, where each is taken alone) is
given back before the refusal is answered, all at once: one round trip during which others still count it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from ..store._common import AMOUNT_SCALE
from ..store.base import StoreUnavailable, Take
from .bill import WINDOW_S, Bill, Op, StageState

__all__ = ["Taking"]

_WHAT: dict[str, Any] = {"concurrent": "acquire_slot", "rpm": "reserve_window", "tpm": "reserve_window",
                         "budget": "reserve"}  # by `Op` kind: the store operation that takes it alone


class Taking(StageState):
    """Reservations taken together, and given back before a refusal is answered."""

    async def _taken(self, ops: list[Op]) -> tuple[list[Any], bool]:
        """Each op's answer (or the `StoreUnavailable` it met), and whether the ones that fit are held: in one
        store step (`Store.reserve_together`), else each alone, at once (one round trip's wait for all)."""
        try:
            if len(ops) > 1:
                try:
                    together = await self.store.reserve_together([
                        Take(_WHAT[kind], args, kind != "budget" or scope.budget is None or scope.budget.mode == "hard")
                        for kind, scope, args in ops])
                except StoreUnavailable as exc:  # every op met it (each one's caller owes what may be applied)
                    return [exc] * len(ops), True
                if together is not None:
                    return together[1], together[0]
            return await self._all([self._remote[kind](*args) for kind, _, args in ops]), True
        except asyncio.CancelledError:  # the client left (or a shutdown) while the store had them
            self._owe_taken(ops)
            raise

    def _owe_taken(self, ops: list[Op]) -> None:
        """Operations the store may have applied after their request was cancelled waiting for the answer: owed to
        the ledger as a timed-out take's are, a slot given back and a budget's reservation settled to nothing under
        its id (given back if it was applied, stopped if it arrives later). A slot held for the rest of its lease
        (`accounting.lease_s`) would refuse the key's next requests meanwhile, a budget's reservation would count
        as spend for the rest of its period. A window's request or tokens are not given back (no id tells whether
        that was applied): they count until the window ends, a minute at most."""
        for kind, _, args in ops:
            if kind == "concurrent":
                self._owe_release(args[0], args[1])
            elif kind == "budget" and args[4]:
                self.ledger.owe_op(args[0], args[4], 0.0, 0.0, args[3])

    def _give_back(self, bill: Bill) -> None:
        """A refusal's first step: on the in-process store, what the request took given back in line (no other
        request admitted in between); a remote store's caller awaits `_given_back` instead (`_admit`, hops)."""
        if self._in_line is not None:
            self._release_in_line(bill)

    async def _given_back(self, bill: Bill) -> None:
        """`_release` before a refusal is answered, in a task of its own: finished even when the client leaves
        meanwhile (what it holds would otherwise count against others for a window, a budget for its period)."""
        if bill.settled or not (bill.requests or bill.tokens or bill.budgets or bill.slots):
            return
        task = asyncio.ensure_future(self._release(bill))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    def _release_in_line(self, bill: Bill) -> None:
        """`_release` on the in-process store, in its millionths (every `Held` there carries its `units`)."""
        store = self._in_line
        assert store is not None
        for key in bill.requests:
            store.settle_units_now(key, -AMOUNT_SCALE, WINDOW_S)
        for held in bill.tokens:
            store.settle_units_now(held.key, -held.units, held.ttl_s)
        for held in bill.budgets:  # the gauges then show what is left without it (`_show_total`)
            total = store.settle_units_now(held.key, -held.units, held.ttl_s)
            self._show_total(held.scope, held.key, total / AMOUNT_SCALE)
        for key, holder in bill.slots:
            store.release_slot_now(key, holder)
        _cleared(bill)

    async def _release(self, bill: Bill) -> None:
        """Undo what a refused request reserved (so it does not count against the others), all at once."""
        store = self.store
        budgets, slots = bill.budgets, bill.slots
        ops: list[Awaitable[Any]] = [*(store.settle(key, 1, 0, WINDOW_S) for key in bill.requests),
               *(store.settle(held.key, held.reserved, 0, held.ttl_s) for held in bill.tokens),
               # settled to nothing, under the reservation's id: the ledger owes it if need be
               *(store.settle(held.key, held.reserved, 0.0, held.ttl_s, held.op, True) for held in budgets),
               *(store.release_slot(key, holder) for key, holder in slots)]
        windows = len(bill.requests) + len(bill.tokens)
        _cleared(bill)
        results = await self._all(ops)
        failure: BaseException | None = None
        for index, result in enumerate(results):
            if not isinstance(result, BaseException):
                if windows <= index < windows + len(budgets):  # a budget's new total: shown without it
                    held = budgets[index - windows]
                    self._show_total(held.scope, held.key, result)
                continue
            if not isinstance(result, StoreUnavailable):  # a bug: raised once the rest are owed
                failure = failure or result
            elif index < windows:
                self.metrics.accounting_store_errors.labels("unsettled").inc()
            elif index < windows + len(budgets):
                held = budgets[index - windows]
                self._owe_spend(held.key, held.reserved, 0.0, held.ttl_s, held.op, result, True)
            else:
                self._owe_release(*slots[index - windows - len(budgets)])
        if failure is not None:
            raise failure


def _cleared(bill: Bill) -> None:
    bill.requests = []
    bill.tokens = ()
    bill.budgets = []
    bill.slots = ()
    bill.settled = True
