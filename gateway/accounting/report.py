"""Usage and spend per key, tenant and alias, per UTC day or month, read back from the store.

What the ledger added (`ledger.py`): per (scope, name, day) counters of cost, requests and tokens. A month
is the sum of its days. Names are the policy's (its aliases, tenants and named keys) unless one is asked
for: a key created at run time is reported when named.
"""

from __future__ import annotations

import asyncio
import calendar
from datetime import UTC, datetime
from typing import Literal

from ..policy.compiled import Policy
from ..store._common import AMOUNT_SCALE
from ..store.base import Store
from .ledger import FIELDS, usage_key

__all__ = ["ReportPeriod", "ScopeKind", "days_of", "names_of", "read_usage"]

ScopeKind = Literal["key", "tenant", "model"]
ReportPeriod = Literal["day", "month"]


def days_of(period: ReportPeriod, date: str | None, now: float) -> tuple[str, list[str]]:
    """(the period's label, its days as YYYYMMDD) for `date` (YYYY-MM-DD or YYYY-MM; default: now, UTC).

    Raises ValueError for a malformed date."""
    if period == "day":
        day = datetime.strptime(date, "%Y-%m-%d") if date else datetime.fromtimestamp(now, UTC)
        return day.strftime("%Y-%m-%d"), [day.strftime("%Y%m%d")]
    month = datetime.strptime(date, "%Y-%m") if date else datetime.fromtimestamp(now, UTC)
    count = calendar.monthrange(month.year, month.month)[1]
    return month.strftime("%Y-%m"), [f"{month.year:04d}{month.month:02d}{d:02d}" for d in range(1, count + 1)]


def names_of(policy: Policy, scope: ScopeKind) -> list[str]:
    if scope == "model":
        return sorted(policy.models)
    if scope == "tenant":
        return sorted(policy.tenant_names)
    return sorted(policy.key_names)


async def read_usage(store: Store, scope: ScopeKind, names: list[str], days: list[str]) -> list[dict[str, object]]:
    """One row per name: cost in USD and the counts, summed over `days`."""
    return list(await asyncio.gather(*(_row(store, scope, name, days) for name in names)))


async def _row(store: Store, scope: ScopeKind, name: str, days: list[str]) -> dict[str, object]:
    keys = [usage_key(scope, name, day, field) for day in days for field in FIELDS]
    values = await asyncio.gather(*(store.get(key) for key in keys))
    sums = dict.fromkeys(FIELDS, 0)
    for key_index, raw in enumerate(values):
        if raw is not None:
            sums[FIELDS[key_index % len(FIELDS)]] += int(raw)
    row: dict[str, object] = {"name": name, "cost_usd": round(sums["cost_usd"] / AMOUNT_SCALE, 6)}
    row.update({field: sums[field] // AMOUNT_SCALE for field in FIELDS if field != "cost_usd"})
    return row
