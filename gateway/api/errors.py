"""Litestar's own errors (no route, wrong method, a body too large...) and the gateway's, answered in OpenAI's
error shape with the request's id, as every other answer: the app's exception handlers (`create_app`). Under the
Messages API's paths (`/v1/messages`, `/v1/messages/...`: an unknown route, an invalid `Host`), in Anthropic's, as
every other answer there: the request id also as `request-id` and in the body (`api/anthropic.py`)."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from ..errors import BodyTooLarge, GatewayError, InternalError, InvalidRequest, MethodNotAllowed, NotFound
from ..translate.anthropic_errors import anthropic_error_body, messages_path
from .asgi import RequestHeaders, RequestIds, error_header_map

__all__ = ["error_handlers"]

log = logging.getLogger("gateway")


def _error_response(error: GatewayError, request: Request[Any, Any, Any], ids: RequestIds) -> Response[bytes]:
    request_id = RequestHeaders(request.scope["headers"], ids).request_id
    headers = error_header_map(error, request_id)
    if messages_path(request.scope.get("path", "")):
        headers["request-id"] = request_id
        return Response(anthropic_error_body(error, request_id), status_code=error.status,
                        media_type="application/json", headers=headers)
    return Response(error.body(), status_code=error.status, media_type="application/json", headers=headers)


def error_handlers(ids: RequestIds) -> dict[Any, Any]:
    """Litestar's own errors (no route, wrong method, ...) and ours, in OpenAI's shape (Anthropic's under
    `/v1/messages`)."""

    def http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
        status = exc.status_code
        error: GatewayError
        if status == 404:
            error = NotFound(f"no route for {request.method} {request.url.path[:200]}")
        elif status == 405:  # with the route's `Allow` (RFC 9110 15.5.6), which litestar's exception carries
            allowed = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
            error = MethodNotAllowed(f"method {request.method} is not allowed here", headers=allowed)
        elif status == 413:
            error = BodyTooLarge("the request body is too large")
        elif status < 500:
            error = InvalidRequest(str(exc.detail)[:200] if exc.detail else "invalid request")
            error.status = status
        else:
            error = InternalError("the gateway failed to handle this request")
        return _error_response(error, request, ids)

    def gateway_error(request: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
        return _error_response(exc, request, ids)

    def unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        log.error("unhandled error: %s", type(exc).__name__, exc_info=exc)
        return _error_response(InternalError("the gateway failed to handle this request"), request, ids)

    return {GatewayError: gateway_error, HTTPException: http_exception, Exception: unexpected}
