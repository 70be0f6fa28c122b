"""The replies of the HTTP edge's refusals (OpenAI-style error bodies on `connection: close` replies, built once
where they do not vary), and how refusals are counted and logged: refusals never reach the app, and they come
in floods.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .errors import error_body
from .telemetry.metrics import HTTP_REFUSED

__all__ = ["NOT_WEBSOCKET", "bad_request", "count_refusal", "heads_held", "overloaded", "peer", "timed_out",
           "too_large", "warn_once"]

log = logging.getLogger("gateway.http")


def _json_error(status: bytes, message: str, type_: str, code: str, extra: bytes = b"") -> tuple[bytes, bytes]:
    """(status line, the rest of a complete `connection: close` reply) for an OpenAI-style error."""
    body = error_body(message, type_, None, code)
    rest = b"".join([
        b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
        b"\r\nconnection: close\r\n", extra, b"\r\n", body,
    ])
    return b"HTTP/1.1 " + status + b"\r\n", rest


def too_large(limit: int, what: str = "the request line and headers") -> tuple[bytes, bytes]:
    return _json_error(b"431 Request Header Fields Too Large", f"{what} exceed {limit} bytes",
                       "invalid_request_error", "headers_too_large")


def heads_held() -> tuple[bytes, bytes]:
    """A `503` for a head that arrived while incomplete heads hold over `max_pending_head_bytes`."""
    return _json_error(b"503 Service Unavailable", "the gateway holds too many incomplete requests; retry shortly",
                       "server_error", "server_overloaded", b"retry-after: 1\r\n")


def bad_request(message: str, code: str = "invalid_http_request") -> tuple[bytes, bytes]:
    """A `400` for what the HTTP parser refused (or a WebSocket upgrade), as every other error: OpenAI's body."""
    return _json_error(b"400 Bad Request", message, "invalid_request_error", code)


NOT_WEBSOCKET = bad_request("WebSocket upgrades are not supported: the gateway serves HTTP requests only",
                             "websocket_not_supported")


_OVERLOADED_BODY = error_body("the gateway is at its limit of concurrent requests; retry shortly",
                              "server_error", None, "server_overloaded")
_OVERLOADED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_OVERLOADED_BODY)).encode()),
    (b"retry-after", b"1"),
    (b"connection", b"close"),
]


async def overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The app that runs instead of the real one above `max_requests`."""
    await send({"type": "http.response.start", "status": 503, "headers": _OVERLOADED_HEADERS})
    await send({"type": "http.response.body", "body": _OVERLOADED_BODY, "more_body": False})


def timed_out(message: str) -> tuple[bytes, bytes]:
    return _json_error(b"408 Request Timeout", message, "invalid_request_error", "request_timeout")


def peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


_last_warning: dict[str, float] = {}
_refused = HTTP_REFUSED.labels


def count_refusal(reason: str) -> None:
    """Refusals never reach the app, so they are counted here (`gateway_http_refused_total`)."""
    _refused(reason).inc()


def warn_once(kind: str, message: str, *args: object) -> None:
    """A warning, at most one per kind per 10 s: refusals come in floods."""
    now = time.monotonic()
    if now - _last_warning.get(kind, -1e9) >= 10.0:
        _last_warning[kind] = now
        log.warning(message, *args)
