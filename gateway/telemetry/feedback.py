"""Feedback on answers: `POST /v1/feedback` with a request id, a score and an optional label.

Built only when `telemetry.feedback.enabled`. The recording stage keeps, for each
answered request, a small record (alias and target labels) in the Store under
the tenant's name and the request id, for `ttl_s` seconds: bounded by the TTL,
and in memory also by the store's `max_entries`. A feedback is looked up under
the caller's own tenant, so a tenant can only rate its own requests: someone
else's request id is unknown to it (404), and so is an id already rated (one
feedback per request, so scores cannot be stuffed). With several replicas the
store must be Redis, so that any replica can take the feedback.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ..errors import GatewayError, InvalidRequest, NotFound
from ..pipeline.context import Reply, RequestContext
from ..pipeline.runner import Next
from ..pipeline.streams import StreamEnd
from ..sanitize import validation_error
from ..schemas.events import StreamEvent
from ..store.base import Store, StoreUnavailable
from .labels import OTHER
from .metrics import Metrics

__all__ = ["FeedbackBody", "FeedbackRecorder", "FeedbackStoreUnavailable", "record_key", "take_feedback"]

log = logging.getLogger("gateway.feedback")
_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(tuple[str, str]).decode


class FeedbackBody(Struct, forbid_unknown_fields=True, frozen=True):
    request_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:\-]{1,128}(?!\n)$")]
    score: Annotated[float, Meta(ge=0, le=1, description="0 (bad) to 1 (good); thumbs: 0 or 1")]
    label: Annotated[str, Meta(max_length=64)] | None = None


class FeedbackStoreUnavailable(GatewayError):
    """503: the shared store did not answer; the feedback was not taken."""

    status = 503
    type = "service_unavailable"
    code = "store_unavailable"


def record_key(tenant: str, request_id: str) -> str:
    """Under `fb:`, one of the memory store's `expendable_prefixes` (a record is evicted before any counter or key);
    length-prefixed: no tenant name can forge another's key."""
    return f"fb:{len(tenant)}:{tenant}:{request_id}"


class FeedbackRecorder:
    """Remember which alias and target answered each request, for the feedback endpoint."""

    name = "feedback"
    reads_events = False

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s

    async def __call__(self, ctx: RequestContext, call_next: Next) -> Reply:
        reply = await call_next(ctx)
        if reply.status == 200:
            if reply.stream is None:
                await self._remember(ctx)
            else:
                reply.stream.add(self)
        return reply

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        if end.outcome in ("done", "client_gone"):
            await self._remember(ctx)

    async def _remember(self, ctx: RequestContext) -> None:
        labels = ctx.runtime.policy.labels
        record = (labels.alias(ctx.alias_label), labels.target(ctx.target.name if ctx.target else None))
        try:
            await ctx.runtime.store.set(record_key(ctx.tenant, ctx.request_id), _encode(record), self.ttl_s)
        except StoreUnavailable:
            log.warning("feedback record not kept: the store did not answer",
                        extra={"fields": {"request_id": ctx.request_id}})


async def take_feedback(
    store: Store, metrics: Metrics, tenant: str, raw: bytes, labels: frozenset[str],
) -> dict[str, Any]:
    """Check and count one feedback; raises 400 for a bad body, 404 for an id this tenant cannot rate."""
    try:
        body = msgspec.json.decode(raw, type=FeedbackBody)
    except msgspec.ValidationError as exc:
        message, at = validation_error(exc)  # msgspec quotes the bad value (an unknown field's name): bounded
        raise InvalidRequest(f"invalid feedback: {message}" + (f" at `{at}`" if at else ""), param=at or None) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequest("the feedback body is not valid JSON") from exc
    key = record_key(tenant, body.request_id)
    try:
        raw_record = await store.get(key)
        taken = raw_record is not None and await store.delete(key)
    except StoreUnavailable as exc:
        raise FeedbackStoreUnavailable("the gateway's store did not answer; retry",
                                       headers={"Retry-After": "1"}) from exc
    if not taken or raw_record is None:
        raise NotFound(f"no request `{body.request_id}` of yours to rate (unknown, expired or already rated)",
                       param="request_id", code="request_not_found")
    model, target = _decode_record(raw_record)
    label = body.label if body.label in labels else (OTHER if body.label else "none")
    metrics.feedback_score.labels(model, target).observe(body.score)
    metrics.feedback.labels(model, target, label).inc()
    return {"object": "feedback", "request_id": body.request_id, "model": model, "target": target,
            "label": label, "score": body.score}
