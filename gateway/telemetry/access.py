"""The access line: one per request, as a typed struct that msgspec encodes in one call.

Built on every request when the access log is on, so it is cheap to make: positional
fields in the line's order (no dict to build and copy) and milliseconds rounded with
arithmetic (`round(x, n)` formats through a decimal string, several times slower).
Never prompt or answer text: tenants, keys, aliases and targets are the policy's names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext

__all__ = ["AccessLine", "access_line"]

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
    attempts: list[dict[str, Any]]
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
        return msgspec.structs.asdict(self)


def access_line(
    ctx: RequestContext, total: float, provider: str | None, target: str | None, key: str | None,
) -> AccessLine:
    usage = ctx.usage
    upstream = ctx.upstream_seconds if provider is not None else 0.0
    first = ctx.first_chunk_seconds
    cost = ctx.cost_usd
    overhead = total - upstream if total > upstream else 0.0
    return AccessLine(
        ctx.request_id, ctx.endpoint_label, ctx.alias_label, ctx.tenant, key, provider, target,
        ctx.rule, _attempts(ctx), ctx.fallback_reason, ctx.stream, ctx.status,
        ctx.error_code,
        int(total * 100_000.0 + 0.5) / 100, int(upstream * 100_000.0 + 0.5) / 100,
        int(overhead * 1_000_000.0 + 0.5) / 1000,
        int(first * 100_000.0 + 0.5) / 100 if first is not None else None,
        usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None,
        usage.cached_tokens if usage else None, usage.reasoning_tokens if usage else None,
        ctx.usage_estimated,
        int(cost * 1e9 + 0.5) / 1e9 if cost is not None else None,
        ctx.cache_result, _guard_actions(ctx),
        ctx.traceparent.decode() if ctx.traceparent is not None else None,
        ctx.runtime.policy.version,
    )


def _guard_actions(ctx: RequestContext) -> str | None:
    """What the guards did, as the `x-gateway-guards` header tells the client (guard names and actions)."""
    for name, value in ctx.headers or ():
        if name == GUARDS_HEADER:
            return value.decode("latin-1")
    return None


def _attempts(ctx: RequestContext) -> list[dict[str, Any]]:
    """Every attempt, in order: target, outcome and milliseconds (one line when the first answered)."""
    if ctx.attempts is not None:
        return [{"target": target, "outcome": outcome, "ms": ms} for target, outcome, ms in ctx.attempts]
    if ctx.target is None:
        return []
    outcome = "ok" if ctx.status < 400 or ctx.status == CLIENT_CLOSED else "error"
    return [{"target": ctx.target.name, "outcome": outcome}]
