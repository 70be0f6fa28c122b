"""The gateway's one error tree.

Every failure a client can see is a `GatewayError`. Each subclass fixes the HTTP
status and the OpenAI error `type`, so that the official SDKs raise the matching
exception class (`BadRequestError` for 400, `AuthenticationError` for 401, ...).
Foreign exceptions (transport, JSON, policy) are mapped to this tree at the
boundary where they happen and re-raised `from exc`; nothing else reaches the
client. Messages are written by the gateway, never copied from an upstream
without going through `sanitize_upstream_message`.
"""

from __future__ import annotations

import re

import msgspec

__all__ = [
    "AuthenticationFailed",
    "BodyTooLarge",
    "GatewayBusy",
    "GatewayError",
    "HeadersTooLarge",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ShuttingDown",
    "UpstreamError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "sanitize_upstream_message",
]


class ErrorDetail(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorDetail


_encoder = msgspec.json.Encoder()


class GatewayError(Exception):
    """Base of every client-visible error: a status, an OpenAI type, a safe message."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(GatewayError):
    """429: the upstream (or, later, the gateway's own limits) refused for rate."""

    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class UpstreamError(GatewayError):
    """502: the upstream failed, answered garbage or went away."""

    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class UpstreamUnavailable(UpstreamError):
    """502: could not connect to the upstream at all."""

    code = "upstream_unavailable"


class GatewayBusy(GatewayError):
    """503: the gateway cannot take this request now (a full upstream pool); retry shortly."""

    status = 503
    type = "server_error"
    code = "gateway_busy"


class ShuttingDown(GatewayError):
    """503: the gateway is draining for shutdown and cut this request at the deadline."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class InternalError(GatewayError):
    """A bug in the gateway. The message is generic; details go to the log only."""

    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    """The OpenAI error envelope, as bytes."""
    return _encoder.encode(ErrorEnvelope(ErrorDetail(message, type_, param, code)))


# What an upstream error message may carry that a client must not see: URLs and
# host:port pairs (internal addresses), IP addresses, and anything shaped like a
# credential. Compiled once, at import.
_SCRUBBERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE), "[url]"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b"), "[address]"),
    (re.compile(r"\[[0-9a-f:]{2,}\](?::\d+)?", re.IGNORECASE), "[address]"),
    (re.compile(r"\b(?:sk|pk|rk|gw|key|api|token)[-_][A-Za-z0-9*_\-]{6,}", re.IGNORECASE), "[redacted]"),
    (re.compile(r"\b(?:Bearer|Basic)\s+[A-Za-z0-9._~+/=*-]+", re.IGNORECASE), "[redacted]"),
    (re.compile(r"\b[A-Za-z0-9_\-]{32,}\b"), "[redacted]"),
    (re.compile(r"\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:internal|local|lan|svc|cluster\.local)(?::\d+)?\b", re.IGNORECASE), "[host]"),
)
_MAX_UPSTREAM_MESSAGE = 500


def sanitize_upstream_message(message: object) -> str:
    """Make an upstream's error message safe to show: no credentials, no internal addresses."""
    text = message if isinstance(message, str) else ""
    text = text[: _MAX_UPSTREAM_MESSAGE * 2]
    for pattern, replacement in _SCRUBBERS:
        text = pattern.sub(replacement, text)
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:_MAX_UPSTREAM_MESSAGE]
