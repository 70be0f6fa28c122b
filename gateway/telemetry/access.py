"""The access line: one per request, as a typed struct that msgspec encodes in one call.

Built on every request when the access log is on, so it is cheap to make: positional
fields in the line's order (no dict to build and copy), milliseconds rounded with
arithmetic (`round(x, n)` formats through a decimal string, several times slower), and
the usual one-attempt list encoded once per target and outcome (`AccessLines`).
Never prompt or answer text: tenants, keys, aliases and targets are the policy's names.
"""

from __future__ import annotations

from math import floor
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext

__all__ = ["AccessLine", "AccessLines", "Names"]

# A finished request's names, as the telemetry stage reads them once for the metrics and the access line:
# endpoint label, alias label, status, provider (None: no upstream called), target, tenant, key, and the
# error code of an error answer (status >= 400).
Names = tuple[str, str, int, str | None, str | None, str, str | None, str | None]

GUARDS_HEADER = b"x-gateway-guards"  # set by the guard stage (not imported: it would load the guards)
CLIENT_CLOSED = 499


class AccessLine(msgspec.Struct, gc=False):
    """Who asked, what, where it went, how long each part took, what it cost."""

    request_id: str
    endpoint: str
    model: str
    tenant: str
    key: str | None
    provider: str | None
    target: str | None
    rule: str | None
    attempts: list[dict[str, Any]] | msgspec.Raw  # Raw: the one-attempt list, encoded already
    fallback_reason: str | None
    stream: bool
    status: int
    error: str | None
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
    policy_version: str

    def fields(self) -> dict[str, Any]:
        """The line as a dict (for a log record when the line goes through `logging`)."""
        fields = msgspec.structs.asdict(self)
        if isinstance(self.attempts, msgspec.Raw):
            fields["attempts"] = msgspec.json.decode(self.attempts)
        return fields


class AccessLines:
    """Makes the access lines of one runtime: the one-attempt lists it encodes are kept by target and outcome
    (the policy's targets: a bounded set; past `limit`, encoded each time)."""

    __slots__ = ("_limit", "_one_attempt")

    def __init__(self, limit: int = 4_096) -> None:
        self._one_attempt: dict[tuple[str, str], msgspec.Raw] = {}
        self._limit = limit

    def line(self, ctx: RequestContext, total: float, names: Names) -> AccessLine:
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
        endpoint, model, status, provider, target, tenant, key, _ = names
        upstream = ctx.upstream_seconds if provider is not None else 0.0
        first = ctx.first_chunk_seconds
        cost = ctx.cost_usd
        overhead = total - upstream if total > upstream else 0.0
        attempts: list[dict[str, Any]] | msgspec.Raw | None = None
        if ctx.attempts is None and target is not None:  # the usual one attempt: `_attempts`, in line
            attempts = self._one_attempt.get((target, "ok" if status < 400 or status == CLIENT_CLOSED else "error"))
        # Rounded with `floor`, not `int`: the same values (every one is >= 0), without a call to the int type.
        return AccessLine(
            ctx.request_id, endpoint, model, tenant, key, provider, target,
            ctx.rule, attempts if attempts is not None else self._attempts(ctx, status), ctx.fallback_reason,
            ctx.stream, status,
            ctx.error_code,
            floor(total * 100_000.0 + 0.5) / 100, floor(upstream * 100_000.0 + 0.5) / 100,
            floor(overhead * 1_000_000.0 + 0.5) / 1000,
            floor(first * 100_000.0 + 0.5) / 100 if first is not None else None,
            prompt, completion, cached, reasoning, ctx.usage_estimated,
            floor(cost * 1e9 + 0.5) / 1e9 if cost is not None else None,
            ctx.cache_result, _guard_actions(ctx) if ctx.headers else None,
            ctx.traceparent.decode() if ctx.traceparent is not None else None,
            ctx.runtime.policy.version,
        )

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
