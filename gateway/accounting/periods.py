"""Budget periods: which period an instant falls in (its store key) and how long that period has left.

Calendar periods are UTC: a day from midnight, an ISO week from Monday, a month from its first day. A
`rolling` budget counts over windows of `window_s` seconds aligned to the Unix epoch (so every replica
agrees on the window without talking), which is a fixed window, not a sliding log: spend at the end of one
window and the start of the next can together reach twice the amount over `window_s`.
"""

from __future__ import annotations

import calendar
import functools
from datetime import UTC, datetime, timedelta

from ..policy.accounting_schema import BudgetSpec

__all__ = ["USAGE_DAYS_KEPT", "PeriodKeys", "current_period", "day_id", "day_span"]

USAGE_DAYS_KEPT = 400  # usage counters per day live this long (a month's and a year's report stay readable)
_MARGIN_S = 3_600.0  # a period's counter outlives its end a little: settling a late stream still finds it


def current_period(budget: BudgetSpec, now: float) -> tuple[str, float]:
    """(the period's id, seconds its counter should live) for unix time `now`."""
    ident, end = _period(budget, _slice(budget, now))
    return ident, end - now + _MARGIN_S


def _slice(budget: BudgetSpec, now: float) -> int:
    """Which rolling window (or, for calendar periods, which UTC day) `now` falls in: it decides the period."""
    return int(now // (budget.window_s or 86_400.0)) if budget.period == "rolling" else int(now // 86_400)


def _period(budget: BudgetSpec, index: int) -> tuple[str, float]:
    """(id, end as unix time) of the period holding slice `index` (see `_slice`)."""
    if budget.period == "rolling":
        window = budget.window_s or 86_400.0
        return f"r{int(window)}-{index}", (index + 1) * window
    return _calendar_period(budget.period, index)


class PeriodKeys:
    """One budget's store key for the period in force, and its counter's TTL: the key is made once per
    period (rolling window or UTC day), not per request, and agrees with `current_period` exactly."""

    __slots__ = ("_budget", "_end", "_index", "_key", "_prefix", "_span")

    def __init__(self, prefix: str, budget: BudgetSpec) -> None:
        self._prefix = prefix
        self._budget = budget
        self._span = (budget.window_s or 86_400.0) if budget.period == "rolling" else 86_400.0
        self._index = -1
        self._key = ""
        self._end = 0.0

    def at(self, now: float) -> tuple[str, float]:
        """(the store key, seconds its counter should live) for unix time `now`."""
        index = int(now // self._span)
        if index != self._index:
            ident, self._end = _period(self._budget, index)
            self._key = self._prefix + ident
            self._index = index
        return self._key, self._end - now + _MARGIN_S


@functools.lru_cache(maxsize=64)
def _calendar_period(period: str, day: int) -> tuple[str, float]:
    """(id, end as unix time) of the calendar period holding UTC day number `day` (cached: one per day)."""
    start = datetime.fromtimestamp(day * 86_400, UTC)
    if period == "day":
        return start.strftime("d%Y%m%d"), (day + 1) * 86_400.0
    if period == "week":
        monday = start - timedelta(days=start.weekday())
        year, week, _ = monday.isocalendar()
        return f"w{year}{week:02d}", (monday + timedelta(days=7)).timestamp()
    first = start.replace(day=1)
    end = first + timedelta(days=calendar.monthrange(first.year, first.month)[1])
    return first.strftime("m%Y%m"), end.timestamp()


def day_id(now: float) -> str:
    """The UTC day of `now`, as usage counters are keyed (YYYYMMDD). Every request asks: formatted once a day."""
    return _day_name(int(now // 86_400))


def day_span(now: float) -> tuple[float, float, str]:
    """(start, end, `day_id`) of the UTC day holding `now`: a caller keeps it and asks again only past its end."""
    day = int(now // 86_400)
    return day * 86_400.0, (day + 1) * 86_400.0, _day_name(day)


@functools.lru_cache(maxsize=4)
def _day_name(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y%m%d")
