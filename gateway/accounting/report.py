"""Usage and spend per key, tenant and alias, per UTC day or month, read back from the store.

What the ledger added (`ledger.py`): per (scope, name, day) counters of cost, requests and tokens. A month
is the sum of its days. Names are the policy's (its aliases, tenants and named keys) unless one is asked
for: a key created at run time is reported when named.

Read few at a time: a row's counters (a month: 31 days of six) in one `get_many` (an MGET), then a GET for each
counter a day with usage left unwritten (below: usually its cached and reasoning tokens, two a day, one after the
other), at most `_ROWS_AT_ONCE` rows at once, and the first failure cancels the rest. A GET per counter, all at
once, put thousands of operations in the store's pool for a month of a few dozen aliases: they waited past
`op_timeout_s`, the report answered 503, and the store was marked down for every request of the process.

A counter that holds something other than a count (another program's hash, or a string that is not a number)
makes the report unavailable (`UnreadableCounter`: the route's 503, which says so), named in the log, rather
than left out: figures read to bill by must not silently miss a part, and the one to repair is in the log. An
MGET reads a hash as absent, so the counters absent on a day that has any other are read again one by one (a
day's six are written together: those absent beside a present one are the few that stayed zero, or such a hash).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from ..policy.compiled import Policy
from ..store._common import AMOUNT_SCALE
from ..store.base import Store, StoreRefused, StoreUnavailable
from .ledger import FIELDS, usage_key

__all__ = ["ReportPeriod", "ScopeKind", "UnreadableCounter", "days_of", "names_of", "read_usage"]

ScopeKind = Literal["key", "tenant", "model"]
ReportPeriod = Literal["day", "month"]

log = logging.getLogger("gateway.accounting")
_ROWS_AT_ONCE = 4  # rows read at once: the store's connections serve the requests meanwhile
_KEYS_PER_READ = 512  # counters per `get_many` (a month's row is 186: one read)


class UnreadableCounter(StoreUnavailable):
    """A usage counter the store holds, or refuses to read, that is not a count: repairing it, not retrying,
    is what helps (the store answers). Its name is logged where this is raised."""

    def __init__(self, key: str) -> None:
        super().__init__(f"usage counter {key} does not hold a count", maybe_applied=False)
        self.key = key


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
    """One row per name: cost in USD and the counts, summed over `days`.

    `UnreadableCounter` for a counter that is not a count; any other `StoreUnavailable`: the store did not answer."""
    gate = asyncio.Semaphore(_ROWS_AT_ONCE)

    async def bounded(name: str) -> dict[str, object]:
        async with gate:
            return await _row(store, scope, name, days)

    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the rows still to read
            tasks = [group.create_task(bounded(name)) for name in names]
    except ExceptionGroup as failed:
        error = _first_failure(failed)
        raise error from error.__cause__
    return [task.result() for task in tasks]


def _first_failure(failed: ExceptionGroup) -> BaseException:
    """What a report that failed answers: a bad counter before an outage (others met meanwhile were cancelled)."""
    for kind in (UnreadableCounter, StoreUnavailable):
        found = failed.subgroup(kind)
        if found is not None:
            return found.exceptions[0]
    return failed


async def _row(store: Store, scope: ScopeKind, name: str, days: list[str]) -> dict[str, object]:
    keys = [usage_key(scope, name, day, field) for day in days for field in FIELDS]
    values = await _read(store, keys)
    await _read_again_absent(store, keys, values)
    sums = dict.fromkeys(FIELDS, 0)
    for key_index, raw in enumerate(values):
        if raw is not None:
            sums[FIELDS[key_index % len(FIELDS)]] += _count(keys[key_index], raw)
    row: dict[str, object] = {"name": name, "cost_usd": round(sums["cost_usd"] / AMOUNT_SCALE, 6)}
    row.update({field: sums[field] // AMOUNT_SCALE for field in FIELDS if field != "cost_usd"})
    return row


async def _read(store: Store, keys: Sequence[str]) -> list[bytes | None]:
    values: list[bytes | None] = []
    for start in range(0, len(keys), _KEYS_PER_READ):
        values += await store.get_many(keys[start:start + _KEYS_PER_READ])
    return values


async def _read_again_absent(store: Store, keys: Sequence[str], values: list[bytes | None]) -> None:
    """Tell absent from not a string (which `get_many` reads as absent) on the days that have some counter."""
    width = len(FIELDS)
    for start in range(0, len(keys), width):
        day = values[start:start + width]
        if all(raw is None for raw in day):
            continue  # no usage that day (or none of its counters readable: nothing to tell them from)
        for index in range(start, start + width):
            if values[index] is None:
                values[index] = await _get(store, keys[index])


async def _get(store: Store, key: str) -> bytes | None:
    try:
        return await store.get(key)
    except StoreRefused as exc:  # an error reply from a store that answers: this key's value (not a busy pool)
        _log_unreadable(key)
        raise UnreadableCounter(key) from exc


def _count(key: str, raw: bytes) -> int:
    try:
        return int(raw)
    except ValueError:
        _log_unreadable(key)
        raise UnreadableCounter(key) from None


def _log_unreadable(key: str) -> None:
    log.error("usage report: counter %s holds something other than a count; the report is unavailable until it "
              "is deleted or repaired", key)
