"""`gateway test`: policy tests written in YAML, checked against what the policy decides.

A case file holds `cases:`, each a request, a caller and the decisions expected of the
policy. Only what a case names is checked, so a case says exactly what it is about. A case
file is validated like a policy file: an unknown field, a wrong type, each reported with its
file, line and field path, all at once.

    cases:
      - name: the search team's gpt-4o-mini goes to the canary
        caller: {key_name: search-team}        # or {tenant: search}, {key: gw-...}; none: no key
        request: {model: gpt-4o-mini, messages: [{role: user, content: hi}]}
        expect:
          rule: search-team-canary
          targets: [openai/gpt-4o-mini, azure/gpt-4o-mini]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from ..auth.keys import VirtualKey
from ..policy.accounting_schema import BudgetSpec, LimitSpec
from ..policy.compile import key_record
from ..policy.compiled import Policy
from ..policy.loader import PolicyError, PolicyIssue, _check, parse_file
from ..policy.schema import HeaderName
from ..routing.explain import wire_headers
from ..schemas.endpoints import Endpoint
from .decide import Decider, DecisionRequest, endpoint_of
from .decisions import Decisions

__all__ = [
    "CallerSpec", "CaseFile", "CaseResult", "RunTimeKeySpec", "caller_of", "compare", "load_cases", "report",
    "run_case",
]

Verdict = Literal["allow", "record", "redact", "block"]
Scope = Literal["key", "tenant", "alias"]
_ENDPOINTS = {"chat": Endpoint.CHAT, "completions": Endpoint.COMPLETIONS, "embeddings": Endpoint.EMBEDDINGS}


class _Spec(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class CallerSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Who sends the request: at most one of these; none given: no key (`auth: none` or a 401)."""

    key: str | None = None  # a key as a client presents it
    key_name: str | None = None  # a key of the policy, by its `name`
    tenant: str | None = None  # the policy's first key of this tenant
    run_time_key: RunTimeKeySpec | None = None  # a key created through the admin API (`dynamic_keys`)


class RunTimeKeySpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A key as the admin API would have created it: in the store, so no policy lists it."""

    name: Annotated[str, Meta(min_length=1, max_length=128)]
    tenant: Annotated[str, Meta(min_length=1, max_length=128)]
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    limits: LimitSpec | None = None
    budget: BudgetSpec | None = None


class LimitExpect(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None


class BudgetExpect(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    usd: float
    period: str = "month"
    mode: str = "hard"


class CacheExpect(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The cache decision; only what is given is checked."""

    lookup: bool | UnsetType = UNSET  # the alias's cache would be read
    store: bool | UnsetType = UNSET  # the answer would be stored (if whole)
    semantic: bool | UnsetType = UNSET  # the lookup also tries prompts that mean the same


class ExpectSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """The decisions expected; only those given are checked (`null` for `rule`: no rule matches)."""

    blocked: bool | UnsetType = UNSET
    status: int | UnsetType = UNSET  # 200 when the request would be sent on
    blocked_by: Literal["request", "auth", "limits", "guards", "cache", "route"] | UnsetType = UNSET
    tenant: str | UnsetType = UNSET
    key: str | UnsetType = UNSET  # the key's name
    rule: str | UnsetType | None = UNSET
    route: str | UnsetType = UNSET  # the alias (or `rule:<name>`) the request is sent to
    targets: list[str] | UnsetType = UNSET  # in the order they would be tried
    guards: Verdict | UnsetType = UNSET  # the enforced verdict on the request
    guard_verdicts: dict[str, Verdict] | UnsetType = UNSET  # by guard name
    # Exactly the rate limits that apply, by scope: the caller's and the alias asked for's (not a rule's alias's).
    limits: dict[Scope, LimitExpect] | UnsetType = UNSET
    budgets: dict[Scope, BudgetExpect] | UnsetType = UNSET  # exactly the budgets that apply, by scope
    # The limit no counter could let the request through (`tpm of key ci-bot`, `budget of alias gpt-4o`); null: none.
    limits_refused: str | UnsetType | None = UNSET
    cache: CacheExpect | UnsetType | None = UNSET  # null: the alias has no cache (or the request never got there)


class CaseSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    request: dict[str, Any]  # the request body, as JSON would carry it
    endpoint: Literal["chat", "completions", "embeddings"] | None = None  # default: guessed from the body
    caller: CallerSpec = CallerSpec()
    headers: dict[HeaderName, str] = {}  # values as a client sends them (UTF-8); a name no server takes is refused
    expect: ExpectSpec


class CaseFileSpec(_Spec, forbid_unknown_fields=True, frozen=True, kw_only=True):
    cases: list[CaseSpec]


class CaseFile(Struct, frozen=True):
    file: str
    cases: list[tuple[int, CaseSpec]]  # (line, case)


class CaseResult(Struct, frozen=True):
    file: str
    line: int
    name: str
    mismatches: list[str]
    decisions: Decisions | None = None


def load_cases(path: str | Path) -> CaseFile:
    """A case file, checked; raises `PolicyError` with every issue (file, line, field)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyIssue(file, 1, "", f"cannot read the case file: {exc}")]) from exc
    doc = parse_file(text, file)
    _check(doc, doc.data, CaseFileSpec, ())
    if not doc.issues and not doc.data["cases"]:
        doc.issue(("cases",), "a case file needs at least one case")
    if doc.issues:
        raise PolicyError(doc.issues)
    spec = msgspec.convert(doc.data, CaseFileSpec)
    return CaseFile(file, [(doc.line_of(("cases", i)), case) for i, case in enumerate(spec.cases)])


def caller_of(policy: Policy, caller: CallerSpec) -> tuple[VirtualKey | None, str | None, str | None]:
    """(key record, presented credential, error)."""
    given = [v for v in (caller.key, caller.key_name, caller.tenant, caller.run_time_key) if v is not None]
    if len(given) > 1:
        return None, None, "caller: give one of key, key_name, tenant, run_time_key"
    if caller.run_time_key is not None:
        if not policy.dynamic_keys.enabled:
            return None, None, "caller: this policy takes no keys created at run time (`dynamic_keys`)"
        spec = caller.run_time_key
        aliases = None if "*" in spec.models else frozenset(spec.models)
        record = VirtualKey(spec.name, spec.tenant, b"", aliases, limits=spec.limits, budget=spec.budget)
        return record, None, None
    if caller.key is not None:
        return None, caller.key, None
    keys = policy.spec.keys if policy.spec is not None else []
    for index, key in enumerate(keys):
        record = key_record(index, key)
        if (caller.key_name is not None and record.name == caller.key_name) or (
                caller.tenant is not None and record.tenant == caller.tenant):
            return record, None, None
    if caller.key_name is not None:
        return None, None, f"caller: the policy has no key named `{caller.key_name}`"
    if caller.tenant is not None:
        return None, None, f"caller: the policy has no key of tenant `{caller.tenant}`"
    return None, None, None


async def run_case(decider: Decider, file: str, line: int, case: CaseSpec) -> CaseResult:
    key, credential, error = caller_of(decider.policy, case.caller)
    if error is not None:
        return CaseResult(file, line, case.name, [error])
    endpoint = _ENDPOINTS[case.endpoint] if case.endpoint else endpoint_of(case.request)
    headers = wire_headers(list(case.headers.items()))
    decided = await decider.decide(DecisionRequest(msgspec.json.encode(case.request), endpoint, credential, key,
                                                   headers))
    return CaseResult(file, line, case.name, compare(case.expect, decided), decided)


def compare(expect: ExpectSpec, d: Decisions) -> list[str]:
    """`field: expected X, got Y` for every expectation the decisions do not meet."""
    got: dict[str, Any] = {
        "blocked": d.blocked, "status": d.status, "blocked_by": d.blocked_by,
        "tenant": d.auth.tenant if d.auth else None, "key": d.auth.key if d.auth else None,
        "rule": d.route.rule if d.route else None, "route": d.route.route if d.route else None,
        "targets": list(d.targets.order) if d.targets else [],
        "guards": d.guards.verdict if d.guards else "allow",
        "guard_verdicts": {g.guard: g.verdict for g in d.guards.guards} if d.guards else {},
        "limits": {limit.scope: LimitExpect(rpm=limit.rpm, tpm=limit.tpm, concurrent=limit.concurrent)
                   for limit in d.limits.limits if limit.by_rule is None} if d.limits else {},
        "budgets": {b.scope: BudgetExpect(usd=b.usd, period=b.period, mode=b.mode)
                    for b in d.limits.budgets} if d.limits else {},
        "limits_refused": d.limits.refused if d.limits else None,
        "cache": d.cache,
    }
    mismatches = []
    for field in msgspec.structs.fields(ExpectSpec):
        wanted = getattr(expect, field.name)
        if wanted is UNSET:
            continue
        actual = got[field.name]
        if field.name == "guard_verdicts":  # only the guards named
            actual = {name: actual.get(name, "not run") for name in wanted}
        elif field.name == "cache" and wanted is not None:  # only the parts named
            actual = _named(wanted, actual)
            wanted = _named(wanted)
        if wanted != actual:
            mismatches.append(f"{field.name}: expected {_show(wanted)}, got {_show(actual)}")
    return mismatches


def _named(wanted: CacheExpect, actual: Any = UNSET) -> dict[str, Any] | None:
    """The parts of a cache decision a case names: its own values, or (given `actual`) the decision's."""
    if actual is None:
        return None
    names = [f.name for f in msgspec.structs.fields(CacheExpect) if getattr(wanted, f.name) is not UNSET]
    source = wanted if actual is UNSET else actual
    return {name: getattr(source, name) for name in names}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return msgspec.json.encode(msgspec.to_builtins(value)).decode()


def report(results: Sequence[CaseResult]) -> list[str]:
    lines = []
    for result in results:
        if result.mismatches:
            lines.append(f"FAIL {result.file}:{result.line}: {result.name}")
            lines.extend(f"     {m}" for m in result.mismatches)
        else:
            lines.append(f"ok   {result.file}:{result.line}: {result.name}")
    failed = sum(1 for r in results if r.mismatches)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return lines
