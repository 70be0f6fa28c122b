"""The outermost pipeline stage: in-flight count, metrics, and the access log, for every request, and the
quality signals when a policy turns them on (read in this stage's frame); and the optional telemetry stages
(tracing, feedback records) a policy turns on.
With `server.metrics: false` the per-request metrics are not recorded at all (nor quality signals:
they are metrics), so that a feature that is off costs nothing.

Every answer passes here, errors included (431, 405, 413 and the rest are raised
by stages inside it), and so does every ending: a stream is recorded when it ends
(finished, failed, left by the client, or cut on shutdown), a request whose
client left before the answer as 499, a cut as 503, a bug as 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from math import floor
from typing import Any

from ..accounting.cost import request_cost
from ..errors import GatewayError
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next, Stage
from ..pipeline.stages import ClientGone
from ..pipeline.streams import StreamEnd
from ..policy import Policy
from ..runtime import Service
from ..schemas.events import StreamEvent
from .access import CLIENT_CLOSED, AccessLines, AccessPart, Names, access_part
from .feedback import FeedbackRecorder
from .logs import log_access_of
from .metrics import Metrics
from .quality import QualitySignals
from .series import Children, RequestSeries, loop_child, loop_value

__all__ = ["Telemetry", "TelemetryStages"]

log = logging.getLogger("gateway.telemetry")
_MAX_NAMED = 10_000  # label name combinations whose series are kept by their names; past this, looked up each time
_MAX_QUALITY_FAILURES = 100  # kinds of quality reading failure remembered (logged once each); past this, none logged
# What a finished request's names map to: its series, its model label, its cost counter (`loop_value`), and what
# its access lines say alike (`AccessPart`).
_Named = tuple[RequestSeries, str, Any, AccessPart]


class Telemetry:
    name = "telemetry"
    reads_events = False

    def __init__(self, metrics: Metrics, quality: QualitySignals | None = None) -> None:
        self.metrics = metrics
        # The quality signals (on: `TelemetryStages.quality`), read in this stage's frame rather than as a stage
        # of their own: a request's task then resumes through one coroutine fewer.
        self.quality = quality
        # By alias and tenant: the policy's bounded label sets; only this stage writes it, on the event loop.
        self._cost_usd = Children(metrics.cost, loop_only=True)
        # The answers' token details (by alias and kind) and unpriced answers (by alias), looked up once each.
        self._tokens = Children(metrics.tokens, loop_only=True)
        self._unpriced = Children(metrics.cost_unpriced, loop_only=True)
        self._in_flight = loop_value(loop_child(metrics.in_flight))  # `+= 1`, `-= 1`: only this stage writes it
        self._access_lines = AccessLines()
        # A finished request's names -> `_Named`, for the policy of `_policy`: its names map to bounded labels,
        # so a request's names are mapped once, not per request.
        self._named: dict[Names, _Named] = {}
        self._policy: Policy | None = None
        # The kinds of failure of the quality signals' reading already logged (each once: an upstream that answers
        # so answers so every time).
        self._quality_failures: set[str] = set()

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        if ctx.runtime.policy.server.metrics:  # off (`server.metrics: false`): nothing recorded
            self._in_flight._value += 1
        quality = self.quality
        try:
            if quality is None:
                reply = await call_next(ctx)
            else:
                quality.prepare(ctx)
                reply = await call_next(ctx)
                try:  # (free in CPython 3.11 when nothing is raised)
                    if reply.stream is None:
                        quality.read(ctx, reply)
                    else:  # its reader is ended in `on_end` (the common stream's) or is a stage added before this one
                        quality.read_stream(ctx, reply)
                except Exception as exc:  # noqa: BLE001 -- a reader's bug: a metric lost, never the answer
                    self._quality_failed(exc)
        except BaseException as exc:
            ctx.status, ctx.error_code = raised_ending(ctx, exc)
            self._finish(ctx)
            raise
        if reply.stream is None:
            ctx.status = reply.status
            self._finish(ctx, reply)
        else:
            reply.stream.add(self)
        return reply

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        if end.outcome != "done":  # (a stream that finished keeps its status: no call on the usual path)
            ctx.status, ctx.error_code = stream_ending(ctx, end)
        reader = ctx.quality_reader
        if reader is not None:
            try:
                reader.end(ctx, end)
            except Exception:  # a bug: logged (as a stream stage's end hook is), and the request still recorded
                log.exception("quality signals failed at a stream's end",
                              extra={"fields": {"request_id": ctx.request_id}})
        self._finish(ctx)

    def _quality_failed(self, exc: Exception) -> None:
        """The quality signals failed to read an answer: logged once per kind (the exception's type and where it
        was raised, never its message nor a traceback's values: they may hold the answer's text)."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        kind = f"{type(exc).__name__} at {where}"
        if kind not in self._quality_failures and len(self._quality_failures) < _MAX_QUALITY_FAILURES:
            self._quality_failures.add(kind)
            log.error("quality signals failed to read an answer (%s): the answer goes on uncounted; further "
                      "failures of this kind are not logged", kind)

    def _finish(self, ctx: RequestContext, reply: Reply | None = None) -> None:
        policy = ctx.runtime.policy
        server = policy.server
        if server.metrics:
            self._in_flight._value -= 1
        if ctx.on_finish is not None:  # the answer is final now (the cache stores a miss's)
            ctx.on_finish()
        total = time.perf_counter() - ctx.started
        status = ctx.status
        logged = server.access_log or status >= 500
        if not server.metrics and not logged:  # nothing to record: only the cost (`x-gateway-cost-usd`)
            self._cost(ctx, reply, None)
            return
        names: Names = (
            ctx.endpoint_label, ctx.alias_label, status,
            ctx.provider.name if ctx.provider is not None and ctx.upstream_started else None,
            ctx.target.name if ctx.target is not None else None,
            ctx.key.tenant if ctx.key is not None else "anonymous",  # `ctx.tenant`, in line
            ctx.key.name if ctx.key is not None else None,
            ctx.error_code if status >= 400 else None,
        )
        part = None
        if server.metrics:
            named = self._named.get(names)  # `_named_series`, in line when found (one call fewer per request)
            if named is None or policy is not self._policy:
                named = self._named_series(names, policy)
            usage = ctx.usage
            named[0].record(total, ctx.upstream_seconds, ctx.first_chunk_seconds,
                            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
            self._cost(ctx, reply, named)
            part = named[3]
        else:
            self._cost(ctx, reply, None)
        if logged:
            log_access_of(self._access_lines, ctx, total, names, part)

    def _named_series(self, names: Names, policy: Policy) -> _Named:
        """The series of a finished request, its model label and its cost child, by the request's names."""
        found = self._named.get(names)
        if found is not None and policy is self._policy:
            return found
        if policy is not self._policy:  # another policy's stage (a test's): its names map to other labels
            self._named.clear()
            self._policy = policy
        endpoint, alias, status, provider, target, tenant, key, error = names
        labels = policy.labels
        model, tenant_label = labels.alias(alias), labels.tenant(tenant)
        series = self.metrics.series(endpoint, model, status, provider, labels.target(target), tenant_label,
                                     labels.key(key), error)
        found = (series, model, loop_value(self._cost_usd(model, tenant_label)), access_part(names, policy))
        if len(self._named) < _MAX_NAMED:
            self._named[names] = found
        return found

    def _cost(self, ctx: RequestContext, reply: Reply | None, named: _Named | None) -> None:
        """The answer's cost and token details: counted (when metrics are on: `named`), and sent as
        `x-gateway-cost-usd` on a complete answer (a stream's headers leave before its cost is known: it is in
        the access log and the metrics)."""
        cost = request_cost(ctx)
        if named is not None:
            usage, model = ctx.usage, named[1]
            if usage is not None:
                details = usage.prompt_tokens_details  # `usage.cached_tokens` and `.reasoning_tokens`, in line
                if details is not None and details.cached_tokens:
                    self._tokens(model, "cached_prompt").inc(details.cached_tokens)
                reasoning = usage.completion_tokens_details
                if reasoning is not None and reasoning.reasoning_tokens:
                    self._tokens(model, "reasoning").inc(reasoning.reasoning_tokens)
            if cost is None:
                self._unpriced(model).inc()
            elif cost:
                named[2]._value += cost
        if cost is None:
            return
        if reply is not None and ctx.target is not None and ctx.upstream_started:
            # Rounded as the access line rounds it (`AccessLines.line`), so that both say the same nanodollars: the
            # format's own rounding (of the binary value, ties to even) differed by one at half a nanodollar.
            rounded = floor(cost * 1e9 + 0.5) / 1e9
            ctx.headers = [*(ctx.headers or ()), (b"x-gateway-cost-usd", f"{rounded:.9f}".encode())]


def raised_ending(ctx: RequestContext, exc: BaseException) -> tuple[int, str]:
    """The status and error code of a request that ended with `exc` raised, as its access line and metrics say
    them. A stage inside this one that records the request (the span) reads them here: `ctx.status` and
    `ctx.error_code` are set only when the error reaches the telemetry stage, after it."""
    if isinstance(exc, GatewayError):
        return exc.status, exc.label
    if isinstance(exc, (asyncio.CancelledError, ClientGone)):
        if ctx.lifecycle.reason == "shutdown":
            return 503, "shutting_down"
        return CLIENT_CLOSED, "client_closed_request"
    return 500, "internal_error"


def stream_ending(ctx: RequestContext, end: StreamEnd) -> tuple[int, str | None]:
    """The status and error code of a stream that ended so, as its access line and metrics say them (a finished
    one keeps what it had). Stream end hooks run innermost first: one before the telemetry stage's reads them here."""
    if end.outcome == "error" and end.error is not None:
        return end.error.status, end.error.label
    if end.outcome == "client_gone":
        return CLIENT_CLOSED, "client_closed_request"
    if end.outcome == "shutdown":
        return 503, "shutting_down"
    return ctx.status, ctx.error_code


class TelemetryStages:
    """The optional telemetry stages a policy turns on, in pipeline order, and their background services; the
    quality signals (`quality`) are for the `Telemetry` stage to run in its own frame."""

    def __init__(self, policy: Policy, metrics: Metrics, count_tokens: Callable[[str], int]) -> None:
        spec = policy.telemetry
        stages: list[Stage] = []
        services: list[Service] = []
        if spec.tracing.enabled:
            from .tracing import SpanExporter, Tracing  # (it reads this module's endings)

            exporter = SpanExporter(spec.tracing, metrics) if spec.tracing.otlp_endpoint else None
            stages.append(Tracing(exporter))
            services += [exporter] if exporter is not None else []
        if spec.feedback.enabled:
            stages.append(FeedbackRecorder(spec.feedback.ttl_s))
        # The signals are metrics: with none, no checks.
        self.quality = QualitySignals(metrics, spec.quality.max_text_bytes) \
            if spec.quality.enabled and policy.server.metrics else None
        if spec.payload_log.enabled:
            from .payload_log import PayloadLog, PayloadWriter  # loads the guards: only when the log is on

            writer = PayloadWriter(spec.payload_log, metrics, policy.state, count_tokens)
            stages.append(PayloadLog(writer))
            services.append(writer)
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.services: tuple[Service, ...] = tuple(services)
