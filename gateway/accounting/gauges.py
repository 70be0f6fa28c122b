"""A budget's two gauges (USD left, share left), written on every budgeted request.

The gauges show the remaining amount as the last reservation in this process saw it. In one process they
read it when scraped (`set_function`), so that a request stores two floats instead of taking two gauge
locks; with several worker processes (prometheus_client's multiprocess mode, where a gauge's value lives
in a file that a function cannot feed) each value is written to its gauge, as before.
"""

from __future__ import annotations

from typing import Any

from ..telemetry.series import fast_child

__all__ = ["BudgetLeft"]


class BudgetLeft:
    __slots__ = ("_written", "share", "usd")

    def __init__(self, usd_gauge: Any, share_gauge: Any) -> None:
        """`usd_gauge` and `share_gauge`: the budget's labelled gauge children."""
        self.usd = 0.0
        self.share = 0.0
        self._written: tuple[Any, Any] | None = None
        if _reads_on_scrape(usd_gauge) and _reads_on_scrape(share_gauge):
            usd_gauge.set_function(lambda: self.usd)
            share_gauge.set_function(lambda: self.share)
        else:
            self._written = (fast_child(usd_gauge), fast_child(share_gauge))

    def show(self, usd: float, share: float) -> None:
        self.usd = usd
        self.share = share
        written = self._written
        if written is not None:
            written[0].set(usd)
            written[1].set(share)


def _reads_on_scrape(child: Any) -> bool:
    """Whether a gauge child can take its value from a function: an in-process value, not a multiprocess file."""
    value = getattr(child, "_value", None)
    return hasattr(child, "set_function") and value is not None and getattr(value, "_multiprocess", True) is False
