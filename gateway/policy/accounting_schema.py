"""The policy's accounting shapes: rate limits and budgets, per key, tenant and alias.

Kept apart from `schema.py` (like the guards') because two parts of the gateway read them: the accounting stage
that enforces them, and the admin API that attaches them to keys created at run time. Both use these same
immutable structs, so a key from the policy file and a key from the admin API are limited by one code path.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

__all__ = [
    "AccountingSpec", "BudgetMode", "BudgetPeriod", "BudgetSpec", "DowngradeSpec", "LimitSpec", "TenantSpec",
]

BudgetPeriod = Literal["day", "week", "month", "rolling"]
BudgetMode = Literal["hard", "soft"]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}(?!\n)$")]


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Common options: reject unknown fields, immutable."""


class LimitSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Rate limits; each unset one does not apply. Shared by every replica when the state is in Redis."""

    rpm: Annotated[int, Meta(ge=1, le=100_000_000, description="requests per minute")] | None = None
    tpm: Annotated[int, Meta(ge=1, le=5_000_000_000, description="tokens per minute, in and out")] | None = None
    concurrent: Annotated[int, Meta(ge=1, le=1_000_000, description="requests in flight at once")] | None = None


class DowngradeSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Past `at` (a share of the budget spent), requests go to the cheaper `alias` instead."""

    at: Annotated[float, Meta(gt=0, lt=1, description="share of the budget, e.g. 0.8")]
    alias: Name


class BudgetSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Spend allowed per period. Calendar periods are UTC; `rolling` windows are `window_s` long,
    fixed and aligned to the Unix epoch (not a sliding window)."""

    usd: Annotated[float, Meta(gt=0, le=1_000_000_000, description="USD per period")]
    period: BudgetPeriod = "month"
    window_s: Annotated[float, Meta(ge=60, le=366 * 86_400)] | None = None  # rolling only
    mode: BudgetMode = "hard"  # hard: 429 budget_exceeded; soft: allow, alert through metrics and a header
    downgrade: DowngradeSpec | None = None


class TenantSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What applies to every key of one tenant together."""

    limits: LimitSpec | None = None
    budget: BudgetSpec | None = None


class AccountingSpec(_Spec, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """How limits and budgets are enforced (they themselves sit on keys, tenants and aliases)."""

    # What a Store failure means for limits and budgets; default: `state.on_unavailable`. open: serve, keep
    # the spend here and add it to the store when it answers again; closed: refuse with 503.
    on_unavailable: Literal["open", "closed"] | None = None
    # A request without `max_tokens` reserves this many completion tokens (budgets, tpm); a stream that
    # goes past it reserves another step, and is cut off when a hard budget refuses the step.
    default_max_tokens: Annotated[int, Meta(ge=1, le=10_000_000)] = 4_096
    # A concurrency slot is a lease: one held by a replica that died frees itself after this long. So is a budget
    # reservation on Redis (renewed by each step of a stream): one whose replica died is given back by the next
    # reservation on its budget after this long; a request still running then counts its actual cost when it ends.
    lease_s: Annotated[float, Meta(ge=1, le=86_400)] = 900.0
    # Tenant and key names the policy does not list (run-time keys) that become labels of the budget
    # metrics; past this many, `other`. The policy's own names are always labels.
    label_cap: Annotated[int, Meta(ge=1, le=10_000)] = 100
    # Build the stage, and count every answered request for `GET /admin/usage`, even when the policy itself sets
    # no limit or budget (with `dynamic_keys` the stage is built anyway, for those keys' own limits).
    always: bool = False
