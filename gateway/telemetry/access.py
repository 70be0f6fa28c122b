"""The access line: one per request, as a typed struct that msgspec encodes in one call, and a head.

Built on every request when the access log is on, so it is cheap to make: positional
fields in the line's order (no dict to build and copy), milliseconds rounded with
arithmetic (`round(x, n)` formats through a decimal string, several times slower), and
what the request's names fix (endpoint, alias, tenant, key, provider, target, status,
error code, policy version: the `AccessHead`) encoded once per combination, as is the
usual one-attempt list per target and outcome (`AccessLines`).
Never prompt or answer text: tenants, keys, aliases and targets are the policy's names.
"""

from __future__ import annotations

from math import floor
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext

__all__ = ["AccessHead", "AccessLine", "AccessLines", "Head", "Names"]

# A finished request's names, as the telemetry stage reads them once for the metrics and the access line:
# endpoint label, alias label, status, provider (None: no upstream called), target, tenant, key, and the
# error code of an error answer (status >= 400).
Names = tuple[str, str, int, str | None, str | None, str, str | None, str | None]

GUARDS_HEADER = b"x-gateway-guards"  # set by the guard stage (not imported: it would load the guards)
CLIENT_CLOSED = 499


class AccessHead(msgspec.Struct, frozen=True, gc=False):
    """What a request's names fix (`Names`, and the policy's version): encoded once per combination
    (`AccessLines`), and written after each of its lines' own fields."""

    endpoint: str
    model: str
    tenant: str
    key: str | None
    provider: str | None
    target: str | None
    status: int
    error: str | None
    policy_version: str


class AccessLine(msgspec.Struct, gc=False):
    """Who asked, what, where it went, how long each part took, what it cost: the fields of one request, and
    its `AccessHead` (not encoded with it: `tail` is the head's JSON, made once)."""

    request_id: str
    rule: str | None
    attempts: list[dict[str, Any]] | msgspec.Raw  # Raw: the one-attempt list, encoded already
    fallback_reason: str | None
    stream: bool
    total_ms: float
    upstream_ms: float
    overhead_ms: float
    first_chunk_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    tokens_estimated: bool
    cost_usd: float | None
    cache: str | None
    guards: str | None
    trace: str | None

    def fields(self, head: AccessHead) -> dict[str, Any]:
        """The line as a dict, its head's fields included (for a log record when the line goes through
        `logging`)."""
        fields = msgspec.structs.asdict(head)
        fields.update(msgspec.structs.asdict(self))
        if isinstance(self.attempts, msgspec.Raw):
            fields["attempts"] = msgspec.json.decode(self.attempts)
        return fields


# A line's head and its JSON as written after the line's own fields: `"endpoint":...}` and a newline.
Head = tuple[AccessHead, bytes]


class AccessLines:
    """Makes the access lines of one runtime. The heads and the one-attempt lists it encodes are kept by the
    request's names and by target and outcome (the policy's bounded sets; past `limit`, encoded each time),
    for the policy of `_version`."""

    __slots__ = ("_heads", "_limit", "_one_attempt", "_version")

    def __init__(self, limit: int = 4_096) -> None:
        self._one_attempt: dict[tuple[str, str], msgspec.Raw] = {}
        self._heads: dict[Names, Head] = {}
        self._version = ""
        self._limit = limit

    def line(self, ctx: RequestContext, total: float, names: Names) -> tuple[AccessLine, Head]:
        usage = ctx.usage
        prompt: int | None
        completion: int | None
        cached: int | None
        reasoning: int | None
        if usage is not None:
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            details = usage.prompt_tokens_details  # `Usage.cached_tokens` and `.reasoning_tokens`, in line
            cached = (details.cached_tokens or 0) if details is not None else 0
            reasoning_details = usage.completion_tokens_details
            reasoning = (reasoning_details.reasoning_tokens or 0) if reasoning_details is not None else 0
        else:
            prompt = completion = cached = reasoning = None
        head = self._heads.get(names)
        version = ctx.runtime.policy.version
        if head is None or version != self._version:
            head = self._head(names, version)
        upstream = ctx.upstream_seconds if names[3] is not None else 0.0  # an upstream was called (provider)
        first = ctx.first_chunk_seconds
        cost = ctx.cost_usd
        overhead = total - upstream if total > upstream else 0.0
        attempts: list[dict[str, Any]] | msgspec.Raw | None = None
        target, status = names[4], names[2]
        if ctx.attempts is None and target is not None:  # the usual one attempt: `_attempts`, in line
            attempts = self._one_attempt.get((target, "ok" if status < 400 or status == CLIENT_CLOSED else "error"))
        # Rounded with `floor`, not `int`: the same values (every one is >= 0), without a call to the int type.
        return AccessLine(
            ctx.request_id, ctx.rule, attempts if attempts is not None else self._attempts(ctx, status),
            ctx.fallback_reason, ctx.stream,
            floor(total * 100_000.0 + 0.5) / 100, floor(upstream * 100_000.0 + 0.5) / 100,
            floor(overhead * 1_000_000.0 + 0.5) / 1000,
            floor(first * 100_000.0 + 0.5) / 100 if first is not None else None,
            prompt, completion, cached, reasoning, ctx.usage_estimated,
            floor(cost * 1e9 + 0.5) / 1e9 if cost is not None else None,
            ctx.cache_result, _guard_actions(ctx) if ctx.headers else None,
            ctx.traceparent.decode() if ctx.traceparent is not None else None,
        ), head

    def _head(self, names: Names, version: str) -> Head:
        """The head of a request with these names under the policy of `version`, encoded, and kept."""
        if version != self._version:  # another policy: its heads name its version
            self._heads.clear()
            self._version = version
        endpoint, model, status, provider, target, tenant, key, error = names
        head = AccessHead(endpoint, model, tenant, key, provider, target, status, error, version)
        found = (head, msgspec.json.encode(head)[1:] + b"\n")
        if len(self._heads) < self._limit:
            self._heads[names] = found
        return found

    def _attempts(self, ctx: RequestContext, status: int) -> list[dict[str, Any]] | msgspec.Raw:
        """Every attempt, in order: target, outcome and milliseconds (one line when the first answered)."""
        if ctx.attempts is not None:
            return [{"target": target, "outcome": outcome, "ms": ms} for target, outcome, ms in ctx.attempts]
        if ctx.target is None:
            return []
        outcome = "ok" if status < 400 or status == CLIENT_CLOSED else "error"
        named = (ctx.target.name, outcome)
        found = self._one_attempt.get(named)
        if found is None:
            found = msgspec.Raw(msgspec.json.encode([{"target": named[0], "outcome": outcome}]))
            if len(self._one_attempt) < self._limit:
                self._one_attempt[named] = found
        return found


def _guard_actions(ctx: RequestContext) -> str | None:
    """What the guards did, as the `x-gateway-guards` header tells the client (guard names and actions)."""
    for name, value in ctx.headers or ():
        if name == GUARDS_HEADER:
            return value.decode("latin-1")
    return None
