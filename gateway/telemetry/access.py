"""The access line: one per request, as a typed struct that msgspec encodes, whole, in one call.

Built on every request when the access log is on, so it is cheap to make. A `PackedLine` is the
line `JsonFormatter` would make of an access record, byte for byte, from fewer fields: msgspec
spends about 10 ns on a field whatever its value (a struct of 27 nulls took 320 ns), so what repeats
is spliced in as raw JSON that spans several fields. The head (timestamp, level, logger, message) is
made once per millisecond; what a request's names fix (endpoint to target, the usual one-attempt
list, the policy's version: `AccessPart`) once per names and policy. Fields are positional, in the
line's order (no dict to build and copy); milliseconds are rounded with arithmetic (`round(x, n)`
formats through a decimal string, several times slower).
Never prompt or answer text: tenants, keys, aliases and targets are the policy's names.
"""

from __future__ import annotations

import time
from math import floor
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from ..policy import Policy

__all__ = ["AccessLines", "AccessPart", "Names", "PackedLine", "access_part"]

# A finished request's names, as the telemetry stage reads them once for the metrics and the access line:
# endpoint label, alias label, status, provider (None: no upstream called), target, tenant, key, and the
# error code of an error answer (status >= 400).
Names = tuple[str, str, int, str | None, str | None, str, str | None, str | None]

# What a request's names (and its policy) fix, as JSON: the endpoint's value to the target's
# (`"chat","model":"m","tenant":"t","key":"k","provider":"p","target":"t"`), the attempts when there was at most
# one (`ctx.attempts` None: the target that answered, if any), and the policy's version.
AccessPart = tuple[msgspec.Raw, msgspec.Raw, msgspec.Raw]

CLIENT_CLOSED = 499
_UPSTREAM_FAILED = frozenset({502, 504})  # how an upstream's stream failing after it answered ends a request
_OVERLOADED = "upstream_overloaded"  # and a 503 that is the upstream's (Anthropic's `overloaded_error` mid-stream)
_encode = msgspec.json.encode
_HEAD_FIELDS = ("ts", "level", "logger", "msg")  # what `PackedLine.ts` spans
_Raw = msgspec.Raw
# A head after its second (`2026-12-02T09:31:40`): `.123Z"` and the record's fixed fields, for each millisecond.
_AFTER_SECOND = tuple(f'.{millisecond:03d}Z","level":"info","logger":"gateway.access","msg":"request"'.encode()
                      for millisecond in range(1000))


class PackedLine(msgspec.Struct, gc=False):
    """An access line as it is written, `{"ts":...,"msg":"request",` and the request's fields: `ts` holds
    the JSON of the head's values (`"2026-12-02T09:31:40.123Z","level":"info",...,"msg":"request"`), `endpoint`
    from the endpoint's value to the target's, `policy_version` the version's (`AccessPart`)."""

    ts: msgspec.Raw
    request_id: str
    endpoint: msgspec.Raw
    rule: str | None
    attempts: list[dict[str, Any]] | msgspec.Raw
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
    policy_version: msgspec.Raw

    def fields(self) -> dict[str, Any]:
        """The line's fields as a dict (for a log record when the line goes through `logging`): its JSON, read
        back, less the head's four (which the record's formatter writes itself)."""
        fields: dict[str, Any] = msgspec.json.decode(_encode(self))
        for head in _HEAD_FIELDS:
            del fields[head]
        return fields


class _NamedFields(msgspec.Struct, gc=False):
    """The fields a request's names fix, in the line's order (encoded once, for `AccessPart`)."""

    endpoint: str
    model: str
    tenant: str
    key: str | None
    provider: str | None
    target: str | None


def access_part(names: Names, policy: Policy) -> AccessPart:
    """What every line of a request with these names under `policy` says alike, as JSON."""
    endpoint, model, status, provider, target, tenant, key, _ = names
    named = _encode(_NamedFields(endpoint, model, tenant, key, provider, target))[len(b'{"endpoint":'):-1]
    # One attempt that did not fail (else the router lists it: `ctx.attempts`): the upstream answered, and only
    # a failure of its stream afterwards (502, 504, or its own overload: 503 `upstream_overloaded`) is the
    # attempt's; a guard, a budget, the client or a shutdown (503 `shutting_down`) ending the request later is not.
    outcome = "error" if status in _UPSTREAM_FAILED or names[7] == _OVERLOADED else "ok"
    attempts = _encode([{"target": target, "outcome": outcome}] if target is not None else [])
    return msgspec.Raw(named), msgspec.Raw(attempts), msgspec.Raw(_encode(policy.version))


class AccessLines:
    """Makes the access lines of one runtime. A request's `AccessPart` is its caller's when that keeps one by
    names (as the telemetry stage can, with the names' series), else is kept here by names, for one policy at
    a time (the policy's bounded label sets; past `limit`, made each time). The heads of the current second
    are kept by millisecond."""

    __slots__ = ("_heads", "_limit", "_parts", "_policy", "_second", "_second_text")

    def __init__(self, limit: int = 4_096) -> None:
        self._parts: dict[Names, AccessPart] = {}
        self._policy: Policy | None = None
        self._limit = limit
        self._second = -1
        self._second_text = b""
        self._heads: list[msgspec.Raw | None] = []

    def line(self, ctx: RequestContext, total: float, names: Names, part: AccessPart | None = None,
             now: float | None = None) -> PackedLine:
        """The line of a finished request, `total` seconds after it came; `part`: its names' (else found here);
        `now`: when it finished (`time.time()`; else now)."""
        if part is None:
            part = self._parts.get(names)
            if part is None or ctx.runtime.policy is not self._policy:
                part = self._part(names, ctx.runtime.policy)
        named, one_attempt, version = part
        if now is None:
            now = time.time()
        whole = floor(now)  # `int(now)` for a time after 1970, without a call to the int type
        if whole != self._second:
            self._new_second(whole)
        millisecond = floor((now - whole) * 1000)
        head = self._heads[millisecond]
        if head is None:
            head = self._heads[millisecond] = _Raw(self._second_text + _AFTER_SECOND[millisecond])
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
        upstream = ctx.upstream_seconds if names[3] is not None else 0.0  # an upstream was called (provider)
        first = ctx.first_chunk_seconds
        cost = ctx.cost_usd
        attempts = ctx.attempts
        overhead = total - upstream if total > upstream else 0.0
        # Rounded with `floor`, not `int`: the same values (every one is >= 0), without a call to the int type.
        return PackedLine(
            head, ctx.request_id, named, ctx.rule, one_attempt if attempts is None else _attempts(attempts),
            ctx.fallback_reason, ctx.stream, names[2], ctx.error_code,
            floor(total * 100_000.0 + 0.5) / 100, floor(upstream * 100_000.0 + 0.5) / 100,
            floor(overhead * 1_000_000.0 + 0.5) / 1000,
            floor(first * 100_000.0 + 0.5) / 100 if first is not None else None,
            prompt, completion, cached, reasoning, ctx.usage_estimated,
            floor(cost * 1e9 + 0.5) / 1e9 if cost is not None else None,
            ctx.cache_result, _guard_actions(ctx) if ctx.guard_session is not None else None,
            ctx.traceparent.decode() if ctx.traceparent is not None else None,
            version,
        )

    def _new_second(self, whole: int) -> None:
        """Heads are made anew for another second (UTC, as `JsonFormatter` writes a record's time)."""
        self._second = whole
        self._second_text = b'"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode()
        self._heads = [None] * 1000

    def _part(self, names: Names, policy: Policy) -> AccessPart:
        """`access_part`, kept by names for `policy` (another policy's parts are dropped: they name its version)."""
        if policy is not self._policy:
            self._parts.clear()
            self._policy = policy
        part = self._parts.get(names)
        if part is None:
            part = access_part(names, policy)
            if len(self._parts) < self._limit:
                self._parts[names] = part
        return part


def _attempts(attempts: list[tuple[str, str, float]]) -> list[dict[str, Any]]:
    """Every attempt, in order: target, outcome and milliseconds (when more than one ran, or one failed)."""
    return [{"target": target, "outcome": outcome, "ms": ms} for target, outcome, ms in attempts]


def _guard_actions(ctx: RequestContext) -> str | None:
    """What the guards did (guard names and actions, as the `x-gateway-guards` header tells a complete answer's
    client), from the request's guard session when the line is made: a stream's header leaves before its output is
    read, and the line copied it, so that a streamed answer an output guard blocked or redacted was logged as
    `words.block=0`, or with no guards at all."""
    header = ctx.guard_session.header()  # type: ignore[union-attr]  # (called only with a session)
    return header.decode("latin-1") if header else None
