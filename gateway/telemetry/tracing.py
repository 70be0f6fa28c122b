"""W3C trace context and, optionally, span export over OTLP/HTTP (JSON encoding).

Built only when `telemetry.tracing.enabled`: without it no stage reads
`traceparent`, nothing is forwarded, nothing is exported. When on, the gateway
is one span per request: it takes the client's `traceparent` as its parent (or
starts a trace), forwards its own span as the parent to the upstream, with the
client's `tracestate` when the trace goes on (W3C: a vendor receiving one MUST
send it on), and echoes its own `traceparent` in the answer, so a client can find
the gateway's span. A span is exported only when sampled, as OpenTelemetry's default sampler (ParentBased, AlwaysOn
at the root) decides: not when the client's valid `traceparent` says not sampled (flag 00; that flag still goes
upstream and back), always otherwise.

Export needs no OpenTelemetry SDK: a span is a small dict in the OTLP JSON shape
(GenAI attributes: `gen_ai.operation.name`, `gen_ai.request.model`,
`gen_ai.usage.input_tokens`...), queued (bounded; beyond it dropped and
counted) and posted in batches by one background task. At close, what is still
queued is posted within `FINAL_DRAIN_S` in all; the rest is dropped and counted,
so a collector that stalls never holds a shutdown or a reload. A redirect is not followed (it would carry the
spans and the `otlp_headers_env` credentials to another host): a 3xx is a failed export.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import aiohttp
import msgspec

from ..errors import GatewayError
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamEnd
from ..policy.telemetry_schema import TracingSpec
from ..policy.token_file import header_credential
from ..schemas.events import StreamEvent
from .final_drain import finish_within
from .metrics import Metrics
from .stage import raised_ending, stream_ending

__all__ = ["SpanExporter", "Tracing", "parse_traceparent", "parse_tracestate"]

log = logging.getLogger("gateway.tracing")
# version-trace id-parent id-flags, then (only in a version above 00) `-` and whatever that version adds
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE, _ZERO_SPAN = b"0" * 32, b"0" * 16
# W3C tracestate list members: a simple key or a multi-tenant `tenant@system` one, and a value of printable ASCII
# but `,` and `=` that does not end in a space.
_TRACESTATE_KEY = re.compile(rb"[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}")
_TRACESTATE_VALUE = re.compile(rb"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
TRACESTATE_MEMBERS = 32
"""W3C: a tracestate list has at most 32 members; one with more is invalid, and dropped whole."""
TRACESTATE_CHARS = 512
"""What the gateway forwards of a tracestate at most (W3C: vendors SHOULD propagate at least 512 characters)."""
_TRACESTATE_READ = TRACESTATE_MEMBERS * 520
"""`tracestate` headers longer than this together are dropped unread: 32 members of at most 513 characters, their
commas and a little whitespace fit in it."""
_TRACESTATE_LONG_MEMBER = 128
_encode = msgspec.json.Encoder().encode
# The conventions' values: the Responses API is a chat operation (they tell it apart with OpenAI's own
# `openai.api.type`; the span's `gateway.endpoint` does here).
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat"}
# `gen_ai.provider.name` by the provider's kind; the built-in demo model is none of the conventions' providers.
_PROVIDER_NAMES = {"openai": "openai", "azure": "azure.ai.openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
                   "demo": "gateway.demo"}
FINAL_DRAIN_S = 2.0
"""At close, the spans still queued get this long in all to be posted; the rest are dropped."""


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(trace id, parent span id, flags) of a valid header, else None (then a new trace starts). W3C's ids are
    lower-case hex: an upper-case one is invalid, not to be read as the same trace. Version 00 is exactly its 55
    characters; a higher version is read by version 00's rules, what follows its flags ignored, so a newer client's
    trace goes on; only version ff is invalid. The gateway speaks version 00: what it forwards and echoes is the
    version-00 form of the trace, keeping only the flag version 00 defines (sampled), whatever version came in: W3C
    reserves the other bits, and vendors MUST set them to zero."""
    match = _TRACEPARENT.fullmatch(value.strip(b" \t"))
    if match is None or match.group(2) == _ZERO_TRACE or match.group(3) == _ZERO_SPAN:
        return None
    version = match.group(1)
    if version == b"ff" or (version == b"00" and match.group(5) is not None):
        return None
    return match.group(2), match.group(3), b"01" if int(match.group(4), 16) & 1 else b"00"


def parse_tracestate(values: list[bytes]) -> bytes | None:
    """What the gateway forwards of the `tracestate` headers received (joined with commas, as HTTP combines
    repeated fields): their list members, without the optional whitespace, or None. A list W3C calls invalid (a
    member that is not `key=value` by its grammar, a key twice, more than 32 members) is dropped whole, as the W3C
    test suite expects. One over `TRACESTATE_CHARS` loses whole members, as W3C prescribes: first those over 128
    characters, then from the end (the right, the oldest)."""
    joined = b",".join(values)
    if len(joined) > _TRACESTATE_READ:
        return None
    members: list[bytes] = []
    keys: set[bytes] = set()
    for member in joined.split(b","):
        member = member.strip(b" \t")
        if not member:  # empty members are allowed (a repeated header may add one)
            continue
        key, equals, value = member.partition(b"=")
        if (not equals or key in keys or _TRACESTATE_KEY.fullmatch(key) is None
                or _TRACESTATE_VALUE.fullmatch(value) is None or len(members) == TRACESTATE_MEMBERS):
            return None
        keys.add(key)
        members.append(member)
    if sum(map(len, members)) + len(members) - 1 > TRACESTATE_CHARS:
        members = _truncated(members)
    return b",".join(members) or None


def _truncated(members: list[bytes]) -> list[bytes]:
    kept = [member for member in members if len(member) <= _TRACESTATE_LONG_MEMBER]
    while kept and sum(map(len, kept)) + len(kept) - 1 > TRACESTATE_CHARS:
        kept.pop()
    return kept


def _incoming(raw: Any) -> tuple[tuple[bytes, bytes, bytes] | None, bytes | None]:
    """The client's trace (its `traceparent` parsed) and its `tracestate`, read only for a valid `traceparent`
    (W3C: a vendor that failed to parse `traceparent` MUST NOT parse `tracestate`). Two `traceparent` headers are
    an invalid one: which of them would be the parent is unknowable, so a new trace starts (the W3C test suite's
    `test_traceparent_duplicated`)."""
    parent: bytes | None = None
    states: list[bytes] = []
    for key, value in raw:
        if key == b"traceparent":
            if parent is not None:
                return None, None
            parent = bytes(value)
        elif key == b"tracestate":
            states.append(bytes(value))
    found = parse_traceparent(parent) if parent is not None else None
    return found, parse_tracestate(states) if found is not None and states else None


class _Span:
    __slots__ = ("flags", "parent", "span_id", "start_ns", "trace_id", "tracestate")

    def __init__(self, ctx: RequestContext) -> None:
        found, self.tracestate = _incoming(ctx.head.raw_headers)
        if found is None:
            self.trace_id, self.parent, self.flags = os.urandom(16).hex().encode(), None, b"01"
        else:
            self.trace_id, self.parent, self.flags = found[0], found[1], found[2]
        self.span_id = os.urandom(8).hex().encode()
        self.start_ns = time.time_ns() - int((time.perf_counter() - ctx.started) * 1e9)

    @property
    def header(self) -> bytes:  # version 00 whatever version came in: the one the gateway speaks
        return b"00-" + self.trace_id + b"-" + self.span_id + b"-" + self.flags


class Tracing:
    """The span of one request: parent from `traceparent`, forwarded upstream, echoed, exported at the end (when
    sampled)."""

    name = "tracing"
    reads_events = False

    def __init__(self, exporter: SpanExporter | None) -> None:
        self.exporter = exporter

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        span = _Span(ctx)
        header = span.header
        ctx.traceparent = header
        ctx.tracestate = span.tracestate
        # Exported only when sampled: OpenTelemetry's default sampler, ParentBased(AlwaysOn), records no span whose
        # remote parent says not sampled (flag 00); one with no parent (or an invalid one) starts a sampled trace.
        exporter = self.exporter if span.flags == b"01" else None
        try:
            reply = await call_next(ctx)
        except BaseException as exc:
            if isinstance(exc, GatewayError):
                exc.headers = {**exc.headers, "traceparent": header.decode()}
            if exporter is not None:
                exporter.add(_otlp_span(ctx, span, *raised_ending(ctx, exc)))
            raise
        ctx.headers = [*(ctx.headers or ()), (b"traceparent", header)]
        if exporter is None:
            return reply
        if reply.stream is None:
            exporter.add(_otlp_span(ctx, span, reply.status, ctx.error_code))
        else:
            reply.stream.add(_StreamSpan(exporter, span))
        return reply


class _StreamSpan:
    __slots__ = ("exporter", "span")
    reads_events = False

    def __init__(self, exporter: SpanExporter, span: _Span) -> None:
        self.exporter = exporter
        self.span = span

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        self.exporter.add(_otlp_span(ctx, self.span, *stream_ending(ctx, end)))


def _otlp_span(ctx: RequestContext, span: _Span, status: int, error: str | None) -> dict[str, Any]:
    """One span in the OTLP JSON shape, with the GenAI attributes the conventions define. Its status follows the
    HTTP server span conventions: a 5xx is an error (the gateway's or its upstream's), a 4xx (the client's request,
    499 a client that left) leaves it unset, as does a success (`error.type` still says what a 4xx was)."""
    alias = ctx.alias_label
    operation = _OPERATIONS.get(ctx.endpoint.label, ctx.endpoint.label)
    attributes: list[dict[str, Any]] = [
        _attr("gen_ai.operation.name", operation),
        _attr("gen_ai.request.model", alias),
        _attr("http.response.status_code", status),
        _attr("gateway.endpoint", ctx.endpoint_label),
        _attr("gateway.request_id", ctx.request_id),
        _attr("gateway.tenant", ctx.runtime.policy.labels.tenant(ctx.tenant)),
    ]
    if ctx.target is not None:
        attributes.append(_attr("gen_ai.response.model", ctx.target.upstream_model))
        if ctx.provider is not None:
            kind = ctx.provider.config.kind
            attributes.append(_attr("gen_ai.provider.name", _PROVIDER_NAMES.get(kind, kind)))
        attributes.append(_attr("gateway.provider", ctx.target.provider))
        attributes.append(_attr("gateway.target", ctx.target.name))
    if ctx.usage is not None:
        attributes.append(_attr("gen_ai.usage.input_tokens", ctx.usage.prompt_tokens))
        attributes.append(_attr("gen_ai.usage.output_tokens", ctx.usage.completion_tokens))
    if error is not None or status >= 400:  # the error's code, as the access log names it (`error`)
        attributes.append(_attr("error.type", error or str(status)))
    body: dict[str, Any] = {
        "traceId": span.trace_id.decode(), "spanId": span.span_id.decode(),
        "name": f"{operation} {alias}",
        "kind": 2,  # SPAN_KIND_SERVER
        "startTimeUnixNano": str(span.start_ns), "endTimeUnixNano": str(time.time_ns()),
        "attributes": attributes,
        "status": {"code": 2} if status >= 500 else {},  # STATUS_CODE_ERROR, or unset
    }
    if span.parent is not None:
        body["parentSpanId"] = span.parent.decode()
    return body


def _attr(key: str, value: str | int) -> dict[str, Any]:
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    return {"key": key, "value": {"stringValue": value}}


def _collector_headers(spec: TracingSpec, env: Mapping[str, str]) -> dict[str, str]:
    """The headers of every post: `otlp_headers_env`'s values, cleaned as a provider's credentials are (a secret
    mounted from a file ends in a newline). One unset or unusable is left out, with a warning, never sent empty or
    broken (the policy check already refused it, or warned, naming it)."""
    headers = {"Content-Type": "application/json"}
    for name, var in spec.otlp_headers_env.items():
        given = env.get(var)
        value, problem = header_credential(given or "")
        if problem is None and value:
            headers[name] = value
        else:
            log.warning("OTLP export: header %s is not sent: environment variable `%s` %s", name, var,
                        problem or ("is not set" if given is None else "is empty"))
    return headers


class SpanExporter:
    """A bounded queue of finished spans, posted to the OTLP endpoint in batches by one task (a `Service`)."""

    def __init__(self, spec: TracingSpec, metrics: Metrics, env: Mapping[str, str] | None = None) -> None:
        assert spec.otlp_endpoint is not None
        self.spec = spec
        self.metrics = metrics
        env = os.environ if env is None else env
        self.headers = _collector_headers(spec, env)
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._session: aiohttp.ClientSession | None = None

    def add(self, span: dict[str, Any]) -> None:
        if self._closed:  # a request that ended after the close: nothing will post its span
            self.metrics.telemetry_dropped.labels("otlp", "close_timeout").inc()
            return
        if len(self._queue) >= self.spec.queue:
            self.metrics.telemetry_dropped.labels("otlp", "queue_full").inc()
            return
        self._queue.append(span)
        if len(self._queue) >= self.spec.batch_size:
            self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        await self._final_drain()
        if self._session is not None:
            await self._session.close()

    async def _final_drain(self) -> None:
        """The task posts what is still queued, then ends, within `FINAL_DRAIN_S`: a collector that accepts and
        never answers must not hold the close (each post may wait the session's 10 s). It is cut only then, and a
        batch leaves the queue only once counted, so a batch cut mid-post is counted with the rest, once."""
        if self._task is not None:
            self._closing = True
            await finish_within(self._task, self._wake, FINAL_DRAIN_S, log, "the OTLP exporter")
        self._closed = True
        if left := len(self._queue):
            self._queue.clear()
            self.metrics.telemetry_dropped.labels("otlp", "close_timeout").inc(left)
            log.warning("OTLP export: %d spans dropped at close: not posted within %.0f s", left, FINAL_DRAIN_S)

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.spec.flush_interval_s)
            self._wake.clear()
            await self._flush()
        await self._flush()  # at close: what was queued since (or before the task first ran)

    async def _flush(self) -> None:
        while self._queue and self._session is not None:
            batch = list(itertools.islice(self._queue, self.spec.batch_size))  # taken off once counted
            payload = {"resourceSpans": [{
                "resource": {"attributes": [_attr("service.name", self.spec.service_name)]},
                "scopeSpans": [{"scope": {"name": "llm-gateway"}, "spans": batch}],
            }]}
            assert self.spec.otlp_endpoint is not None
            status: int | None = None
            try:
                async with self._session.post(self.spec.otlp_endpoint, data=_encode(payload), headers=self.headers,
                                              allow_redirects=False) as response:
                    status = response.status
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError):  # (ValueError: a header aiohttp refuses)
                pass  # a failed export, counted below: the task never ends on one
            ok = status is not None and status < 300  # a 3xx too is a failure: the redirect is not followed
            self.metrics.spans_exported.labels("ok" if ok else "failed").inc(len(batch))
            for _ in batch:
                self._queue.popleft()
            if not ok:
                why = "no answer" if status is None else f"HTTP {status}" + (", a redirect" if status < 400 else "")
                log.warning("OTLP export failed (%s); %d spans dropped", why, len(batch))
                if not self._closing:  # the next try waits for the next interval; at close, the rest are tried now
                    return
