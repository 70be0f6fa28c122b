"""The outermost pipeline stage: in-flight count, metrics, and the access log, always.

For a stream the record is made when the stream ends (completed, failed or
cancelled by a client that went away), by wrapping the reply's iterator.
"""

from __future__ import annotations

import logging
import time

from ..errors import GatewayError
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamWatch
from .metrics import Metrics

__all__ = ["Telemetry"]

access_log = logging.getLogger("gateway.access")


class Telemetry:
    name = "telemetry"

    def __init__(self, metrics: Metrics, log_requests: bool) -> None:
        self.metrics = metrics
        self.log_requests = log_requests

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        self.metrics.in_flight.inc()
        try:
            reply = await call_next(ctx)
        except GatewayError as exc:
            ctx.status, ctx.error_code = exc.status, exc.code
            self._finish(ctx)
            raise
        except BaseException:
            ctx.status, ctx.error_code = 500, "internal_error"
            self._finish(ctx)
            raise
        if reply.stream is None:
            ctx.status = reply.status
            self._finish(ctx)
            return reply
        reply.stream = self._follow(ctx, reply.stream)
        return reply

    def _follow(self, ctx: RequestContext, stream: StreamWatch) -> StreamWatch:
        def on_end(reason: BaseException | None) -> None:
            if reason is not None and ctx.error_code is None:
                ctx.status, ctx.error_code = 499, "client_closed_request"
            self._finish(ctx)

        return StreamWatch(stream, on_end)

    def _finish(self, ctx: RequestContext) -> None:
        self.metrics.in_flight.dec()
        total = time.perf_counter() - ctx.started
        usage = ctx.usage
        provider = ctx.provider.name if ctx.provider is not None and ctx.upstream_started else None
        self.metrics.record(
            ctx.endpoint.label, ctx.alias_label, ctx.status, total, provider, ctx.upstream_seconds,
            ctx.first_chunk_seconds, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
        )
        if self.log_requests or ctx.status >= 500:
            access_log.info(
                "request", extra={"fields": {
                    "request_id": ctx.request_id, "endpoint": ctx.endpoint.label, "model": ctx.alias_label,
                    "tenant": ctx.tenant, "provider": provider, "stream": ctx.stream, "status": ctx.status,
                    "error": ctx.error_code, "total_ms": round(total * 1000, 2),
                    "upstream_ms": round(ctx.upstream_seconds * 1000, 2),
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                }},
            )
