"""A budget's two gauges (USD left, share left), written on every budgeted request.

The gauges show the remaining amount as the store answered the last reservation, settle or give-back in this
process (`StageState._show_total`: the budget less what was spent and what requests in flight hold), or as the
store counted it when a policy was swapped in (`Admission.show_budgets`) or once the ledger wrote spend the store
had missed (`Admission.refresh_budgets`). A settle of a period that has ended is not shown. In one process they
read it when scraped (`set_function`), so that a request stores two floats instead of taking two gauge locks; with
several worker processes (prometheus_client's multiprocess mode, where a gauge's value lives in a file that a
function cannot feed) each value is written to its gauge, as before, with the time it was written
(`livemostrecent`: the library's own `set`, about 2 us more than a `livemin` gauge's `fast_child` write per pair,
13 us in all): the scrape shows the live workers' latest. The store's total is the same whichever worker asks;
the lowest (`livemin`) kept the figure of a worker that last settled while another's request was in flight, its
reservation counted, for good.
"""

from __future__ import annotations

from typing import Any

from ..policy.accounting_schema import BudgetSpec
from ..policy.compile import key_record
from ..policy.compiled import Policy
from ..telemetry.series import fast_child

__all__ = ["BudgetLeft", "policy_budgets"]


class BudgetLeft:
    __slots__ = ("_read", "_written", "share", "usd")

    def __init__(self, usd_gauge: Any, share_gauge: Any) -> None:
        """`usd_gauge` and `share_gauge`: the budget's labelled gauge children."""
        self.usd = 0.0
        self.share = 0.0
        self._read: tuple[Any, Any] | None = None
        self._written: tuple[Any, Any] | None = None
        if _reads_on_scrape(usd_gauge) and _reads_on_scrape(share_gauge):
            self._read = (usd_gauge, share_gauge)
            self.claim()
        else:
            self._written = (fast_child(usd_gauge), fast_child(share_gauge))

    def claim(self) -> None:
        """Have the gauges read on scrape read this object's figures. A labelled child outlives the accounting
        stage that made it: after a reload the new stage's takes it over, and the last to claim it is read
        (a retiring stage that claimed it after the new one would be read for good otherwise)."""
        read = self._read
        if read is not None:
            read[0].set_function(lambda: self.usd)
            read[1].set_function(lambda: self.share)

    def show(self, usd: float, share: float) -> None:
        self.usd = usd
        self.share = share
        written = self._written
        if written is not None:
            written[0].set(usd)
            written[1].set(share)


def policy_budgets(policy: Policy) -> dict[tuple[str, str], BudgetSpec]:
    """Every budget the policy itself sets, by its gauges' labels (scope, name): its aliases', its tenants' and its
    own keys' (a key made at run time carries its budget in its record, not in the policy)."""
    budgets: dict[tuple[str, str], BudgetSpec] = {("model", alias): budget
                                                   for alias, budget in policy.alias_budgets.items()}
    budgets.update({("tenant", name): tenant.budget for name, tenant in policy.tenants.items()
                    if tenant.budget is not None})
    if policy.spec is not None:
        for index, key in enumerate(policy.spec.keys):
            if key.budget is not None:
                budgets[("key", key_record(index, key).name)] = key.budget
    return budgets


def _reads_on_scrape(child: Any) -> bool:
    """Whether a gauge child can take its value from a function: an in-process value, not a multiprocess file."""
    value = getattr(child, "_value", None)
    return hasattr(child, "set_function") and value is not None and getattr(value, "_multiprocess", True) is False
