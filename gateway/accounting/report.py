"""Usage and spend per key, tenant and alias, per UTC day or month, read back from the store.

What the ledger added (`ledger.py`): per (scope, name, day) counters of cost, requests and tokens. A month
is the sum of its days. Names are the policy's (its aliases, tenants and named keys) unless one is asked
for: a key created at run time is reported when named.

A counter that holds something other than a count (another program's hash, or a string that is not a number)
makes the report unavailable (`StoreUnavailable`: the route's 503), named in the log, rather than left out:
figures read to bill by must not silently miss a part, and the one to repair is in the log.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
from datetime import UTC, datetime
from typing import Literal

from ..policy.compiled import Policy
from ..store._common import AMOUNT_SCALE
from ..store.base import Store, StoreUnavailable
from .ledger import FIELDS, usage_key

__all__ = ["ReportPeriod", "ScopeKind", "days_of", "names_of", "read_usage"]

ScopeKind = Literal["key", "tenant", "model"]
ReportPeriod = Literal["day", "month"]

log = logging.getLogger("gateway.accounting")


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
    values = await asyncio.gather(*(_read(store, key) for key in keys))
    sums = dict.fromkeys(FIELDS, 0)
    for key_index, raw in enumerate(values):
        if raw is not None:
            sums[FIELDS[key_index % len(FIELDS)]] += _count(keys[key_index], raw)
    row: dict[str, object] = {"name": name, "cost_usd": round(sums["cost_usd"] / AMOUNT_SCALE, 6)}
    row.update({field: sums[field] // AMOUNT_SCALE for field in FIELDS if field != "cost_usd"})
    return row


async def _read(store: Store, key: str) -> bytes | None:
    try:
        return await store.get(key)
    except StoreUnavailable:
        if store.healthy:  # it answered, and refused to read this one (not a string: another program's value)
            _log_unreadable(key)
        raise


def _count(key: str, raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        _log_unreadable(key)
        raise StoreUnavailable("a usage counter does not hold a count", maybe_applied=False) from None


def _log_unreadable(key: str) -> None:
    log.error("usage report: counter %s holds something other than a count; the report is unavailable until it "
              "is deleted or repaired", key)
