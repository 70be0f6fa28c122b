"""The replies of the HTTP edge's refusals (error bodies on `connection: close` replies, built once where they do not
vary), and how refusals are counted and logged: refusals never reach the app, and they come in floods.

Each refusal is written in OpenAI's error envelope, or in Anthropic's for a request to the Messages API's paths
(`translate.anthropic_errors`: the same status, message and headers; the type Anthropic's for the status, and no
`code`, which Anthropic's envelope does not have). A `Refusal` holds both; the protocol picks one by the refused
request's target (`http_guard.Guard`), when it refuses, never on a request it serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from .errors import error_body
from .telemetry.metrics import HTTP_REFUSED
from .translate.anthropic_errors import error_envelope, messages_path, status_type

__all__ = ["NOT_WEBSOCKET", "UNPARSABLE", "Refusal", "bad_request", "count_refusal", "heads_held", "overloaded", "peer",
           "saturated", "timed_out", "too_large", "warn_once"]

log = logging.getLogger("gateway.http")
UNPARSABLE = "the request is not valid HTTP/1.1"  # what the parser refused (its reason after it, when it has one)


class Refusal(NamedTuple):
    """A refusal's status line, and the rest of its complete `connection: close` reply in each client API's
    envelope."""

    status: bytes
    openai: bytes
    anthropic: bytes

    def reply(self, messages: bool) -> tuple[bytes, bytes]:
        """(status line, the rest): Anthropic's envelope for a Messages API request (`messages`), else OpenAI's."""
        return self.status, self.anthropic if messages else self.openai


def _rest(body: bytes, extra: bytes) -> bytes:
    return b"".join([
        b"content-type: application/json\r\ncontent-length: ", str(len(body)).encode(),
        b"\r\nconnection: close\r\n", extra, b"\r\n", body,
    ])


def _json_error(status: bytes, message: str, type_: str, code: str, extra: bytes = b"") -> Refusal:
    """A refusal with an OpenAI error of `type_` and `code`, or Anthropic's error for the status."""
    anthropic = error_envelope(message, status_type(int(status[:3])))
    return Refusal(b"HTTP/1.1 " + status + b"\r\n", _rest(error_body(message, type_, None, code), extra),
                   _rest(anthropic, extra))


def too_large(limit: int, what: str = "the request line and headers") -> Refusal:
    return _json_error(b"431 Request Header Fields Too Large", f"{what} exceed {limit} bytes",
                       "invalid_request_error", "headers_too_large")


def heads_held() -> Refusal:
    """A `503` for a head that arrived while incomplete heads hold over `max_pending_head_bytes`."""
    return _json_error(b"503 Service Unavailable", "the gateway holds too many incomplete requests; retry shortly",
                       "server_error", "server_overloaded", b"retry-after: 1\r\n")


def bad_request(message: str, code: str = "invalid_http_request") -> Refusal:
    """A `400` for what the HTTP parser refused (or a WebSocket upgrade), as every other error."""
    return _json_error(b"400 Bad Request", message, "invalid_request_error", code)


NOT_WEBSOCKET = bad_request("WebSocket upgrades are not supported: the gateway serves HTTP requests only",
                             "websocket_not_supported")


_OVERLOADED = "the gateway is at its limit of concurrent requests; retry shortly"


def _overloaded_head(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close")]


_OVERLOADED_BODY = error_body(_OVERLOADED, "server_error", None, "server_overloaded")
_OVERLOADED_HEADERS = _overloaded_head(_OVERLOADED_BODY)
_OVERLOADED_MESSAGES_BODY = error_envelope(_OVERLOADED, status_type(503))
_OVERLOADED_MESSAGES_HEADERS = _overloaded_head(_OVERLOADED_MESSAGES_BODY)


async def overloaded(scope: Any, receive: Any, send: Any) -> None:
    """The app that runs instead of the real one above `max_requests` (its reply in the envelope of the request's
    API)."""
    if messages_path(scope.get("path", "")):
        head, body = _OVERLOADED_MESSAGES_HEADERS, _OVERLOADED_MESSAGES_BODY
    else:
        head, body = _OVERLOADED_HEADERS, _OVERLOADED_BODY
    await send({"type": "http.response.start", "status": 503, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


_PROBES = frozenset((method, path) for method in ("GET", "HEAD") for path in ("/healthz", "/metrics"))  # api.routes


def saturated(app: Any, max_requests: int) -> Callable[..., Awaitable[None]]:
    """The app a request runs with `max_requests` in flight (made only then: no cost below the limit): liveness
    probes and scrapes (`_PROBES`) run `app` as any request; anything else is refused, counted and logged here."""

    async def probe_or_overloaded(scope: Any, receive: Any, send: Any) -> None:
        if (scope["method"], scope["path"]) in _PROBES:
            await app(scope, receive, send)
            return
        warn_once("503", "503: %d requests in flight (max_requests)", max_requests)
        count_refusal("too_many_requests")
        await overloaded(scope, receive, send)

    return probe_or_overloaded


def timed_out(message: str) -> Refusal:
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
