"""What a policy decides for one request, as typed data: one struct per kind of decision.

`gateway explain` prints it, `gateway test` compares it with a case's expectations, and the
shadow policy compares the live policy's with a candidate's. Each kind is a struct of its own
with a fixed place on `Decisions`, in pipeline order; a kind that did not run (the request was
refused earlier, or the policy has no such feature) is None.

A new kind of decision is
  1. a struct here and a field on `Decisions`;
  2. one function in `dryrun.decide`, called at its place in `Decider.decide`;
  3. its kind in `KINDS` (the shadow metric's label set, bounded), a line in `dryrun.render`, and the
     fields a case may expect in `dryrun.cases`.
"""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

__all__ = [
    "KINDS",
    "AppliedBudget",
    "AppliedLimit",
    "AuthDecision",
    "CacheDecision",
    "Decisions",
    "GuardVerdict",
    "GuardsDecision",
    "Kind",
    "LimitsDecision",
    "RouteDecision",
    "Scope",
    "TargetsDecision",
    "Verdict",
    "disagreements",
]

Kind = Literal["outcome", "auth", "limits", "guards", "cache", "route", "targets"]
KINDS: tuple[Kind, ...] = ("outcome", "auth", "limits", "guards", "cache", "route", "targets")
Verdict = Literal["allow", "record", "redact", "block"]
Scope = Literal["key", "tenant", "alias"]


class _Decision(Struct, frozen=True, kw_only=True):
    pass


class AuthDecision(_Decision, frozen=True, kw_only=True):
    """Who the caller is, and whether it may use the alias it asked for."""

    caller: Literal["anonymous", "key", "refused"]
    tenant: str | None = None
    key: str | None = None  # the key's name, never its hash
    allowed: bool = False  # may use the alias (an unknown alias is not allowed either: the same 404)


class AppliedLimit(_Decision, frozen=True, kw_only=True):
    """One scope's rate limits that apply to the request (from the policy, not live counters)."""

    scope: Scope
    name: str  # the key's name, the tenant or the alias
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    # The rule that sends the request to this alias, which it did not name: its limits count the request too (a
    # hop: `accounting.hops`). None: the caller's, or the alias asked for.
    by_rule: str | None = None


class AppliedBudget(_Decision, frozen=True, kw_only=True):
    scope: Scope
    name: str
    usd: float
    period: str
    mode: str
    downgrade_at: float | None = None
    downgrade_alias: str | None = None


class LimitsDecision(_Decision, frozen=True, kw_only=True):
    """Every limit and budget that applies to this caller and alias, and the limits of the alias a rule sends the
    request to (`AppliedLimit.by_rule`); none applying is an empty decision.

    Live counters are not read, so a budget's downgrade or a full window cannot be known: `tokens` and
    `max_usd` are what the request would reserve (its prompt estimate plus its completion cap, at the
    alias's dearest target), and `refused` names the limit that no counter could let it through (one
    that `tokens` or `max_usd` exceeds on its own: `tpm` or `budget`, and its scope)."""

    limits: tuple[AppliedLimit, ...] = ()
    budgets: tuple[AppliedBudget, ...] = ()
    tokens: int = 0  # reserved on each tokens-per-minute window (0: no tpm limit or budget applies)
    max_usd: float = 0.0  # reserved on each budget
    refused: str | None = None  # e.g. `tpm of alias gpt-4o`, `budget of tenant search`


class GuardVerdict(_Decision, frozen=True, kw_only=True):
    """One guard's verdict on the request's text (entity types only, never the text)."""

    guard: str
    mode: str  # enforce or shadow
    verdict: Verdict
    types: tuple[str, ...] = ()


class GuardsDecision(_Decision, frozen=True, kw_only=True):
    verdict: Verdict  # what the enforced guards do to the request
    guards: tuple[GuardVerdict, ...] = ()


class CacheDecision(_Decision, frozen=True, kw_only=True):
    """Whether the alias's cache would look the request up and store its answer (`cache.control.plan`).

    What the store holds is not read: a lookup may hit or miss, and a stored answer must still be whole."""

    lookup: bool = False
    store: bool = False
    semantic: bool = False  # a lookup also tries prompts that mean the same (not only the exact request)
    reason: str = ""


class RouteDecision(_Decision, frozen=True, kw_only=True):
    """The rule that matched (first match wins) and where it sends the request."""

    rule: str | None = None
    route: str = ""  # an alias, or `rule:<name>` for a rule's own targets
    strategy: str = ""
    denied: str | None = None  # the rule's `deny` message


class TargetsDecision(_Decision, frozen=True, kw_only=True):
    """The candidate targets in the order the fallback would try them."""

    order: tuple[str, ...] = ()
    # False when the order depends on chance or live traffic (weighted without a sticky value,
    # latency, least_busy): then only the set of candidates is comparable.
    deterministic: bool = True


class Decisions(_Decision, frozen=True, kw_only=True):
    """Every decision for one request, in pipeline order."""

    policy_version: str
    endpoint: str
    alias: str | None = None
    stream: bool = False
    blocked: bool = False
    status: int = 200  # what the gateway would answer before any upstream (200: it would be sent)
    blocked_by: Kind | Literal["request"] | None = None
    error: str | None = None
    auth: AuthDecision | None = None
    limits: LimitsDecision | None = None
    guards: GuardsDecision | None = None
    cache: CacheDecision | None = None
    route: RouteDecision | None = None
    targets: TargetsDecision | None = None


def disagreements(live: Decisions, candidate: Decisions) -> list[Kind]:
    """The kinds on which two policies decided differently (`outcome`: blocked or status)."""
    kinds: list[Kind] = []
    if (live.blocked, live.status) != (candidate.blocked, candidate.status):
        kinds.append("outcome")
    for kind in KINDS[1:]:
        a, b = getattr(live, kind), getattr(candidate, kind)
        if kind == "targets" and a is not None and b is not None and not (a.deterministic and b.deterministic):
            if sorted(a.order) != sorted(b.order):
                kinds.append(kind)
        elif a != b:
            kinds.append(kind)
    return kinds
