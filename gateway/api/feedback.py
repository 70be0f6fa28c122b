"""`POST /v1/feedback`: a score for an answered request (see `telemetry.feedback`). Off: 404."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from ..auth.dynamic import find_key
from ..errors import NotFound
from ..pipeline.stages import authenticate
from ..telemetry.feedback import take_feedback
from .asgi import RequestHeaders
from .routes import OpsHost

__all__ = ["feedback_routes"]

_encode = msgspec.json.Encoder().encode


def feedback_routes(host: OpsHost) -> list[Any]:
    @post("/v1/feedback", status_code=200)
    async def feedback(request: Request[Any, Any, Any]) -> Response[bytes]:
        headers = RequestHeaders(request.scope["headers"], host.request_ids)
        runtime = host.acquire_runtime()  # held to the end: a reload closes its store only after this call
        try:
            spec = runtime.policy.telemetry.feedback
            if not spec.enabled:
                raise NotFound("feedback is turned off in this policy (telemetry.feedback)")
            if runtime.dynamic_keys is None:
                key = authenticate(runtime.policy, headers.credential)
            else:  # keys created at run time may rate their answers too
                key = await find_key(runtime.policy, headers.credential, runtime.dynamic_keys)
            tenant = key.tenant if key is not None else "anonymous"
            result = await take_feedback(runtime.store, host.metrics, tenant, await request.body(),
                                         frozenset(spec.labels))
        finally:
            runtime.release()
        return Response(_encode(result), status_code=200, media_type="application/json",
                        headers={"x-request-id": headers.request_id})

    return [feedback]
