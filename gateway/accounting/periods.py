"""Budget periods: which period an instant falls in (its store key) and how long that period has left.

Calendar periods are UTC: a day from midnight, an ISO week from Monday, a month from its first day. A
`rolling` budget counts over windows of `window_s` seconds aligned to the Unix epoch (so every replica
agrees on the window without talking), which is a fixed window, not a sliding log: spend at the end of one
window and the start of the next can together reach twice the amount over `window_s`.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta

from ..policy.accounting_schema import BudgetSpec

__all__ = ["USAGE_DAYS_KEPT", "current_period", "day_id"]

USAGE_DAYS_KEPT = 400  # usage counters per day live this long (a month's and a year's report stay readable)
_MARGIN_S = 3_600.0  # a period's counter outlives its end a little: settling a late stream still finds it


def current_period(budget: BudgetSpec, now: float) -> tuple[str, float]:
    """(the period's id, seconds its counter should live) for unix time `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    if budget.period == "rolling":
        window = budget.window_s or 86_400.0
        index = int(now // window)
        return f"r{int(window)}-{index}", (index + 1) * window - now + _MARGIN_S
    if budget.period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=1)
        ident = start.strftime("d%Y%m%d")
    elif budget.period == "week":
        start = (moment - timedelta(days=moment.weekday())).replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=7)
        year, week, _ = start.isocalendar()
        ident = f"w{year}{week:02d}"
    else:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start + timedelta(days=calendar.monthrange(start.year, start.month)[1])
        ident = start.strftime("m%Y%m")
    return ident, (end - moment).total_seconds() + _MARGIN_S


def day_id(now: float) -> str:
    """The UTC day of `now`, as usage counters are keyed (YYYYMMDD)."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")
