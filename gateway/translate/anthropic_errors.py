"""Anthropic's error envelope, and which requests get it: those of the Messages API's paths.

Every error a `/v1/messages` or `/v1/messages/count_tokens` client can get is written in Anthropic's envelope,
`{"type": "error", "error": {"type": ..., "message": ...}}` (with `request_id` when the request has one), whichever
layer refuses it: the pipeline and the endpoints (`api/anthropic.py`), litestar's own errors (`api/errors.py`: no
route under `/v1/messages/`, an invalid `Host`) and the HTTP server's refusals before the app (`http_replies.py`,
`http_guard.py`: a head too large, malformed HTTP, a slow head or body, too many requests). Every other path keeps
OpenAI's. The type follows the status, as Anthropic's docs list them (other 4xx are `invalid_request_error`, other
5xx `api_error`); the status, and so the SDK's exception class and its retries, is the gateway's. A refusal the
Anthropic SDK recovers from when told why (`ThreadUnsupported`) carries Anthropic's `error.details` for it.

Light on purpose: the HTTP server imports it, so it imports nothing of the pipeline.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from ..errors import GatewayError, InvalidRequest, Unsupported

__all__ = ["MESSAGES_PATH", "ThreadUnsupported", "anthropic_error_body", "error_envelope", "error_type",
           "messages_path", "messages_target", "status_type"]

MESSAGES_PATH = "/v1/messages"
_MESSAGES_TARGET = MESSAGES_PATH.encode()
_encode = msgspec.json.Encoder().encode
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                504: "timeout_error", 529: "overloaded_error"}


def status_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def error_type(error: GatewayError) -> str:
    return status_type(error.status)


class ThreadUnsupported(InvalidRequest):
    """400: a Messages request with `thread` (server-side message threads, a beta), which the gateway does not keep.
    Its `details` are Anthropic's for a request a server cannot thread: the Anthropic SDK's tool runner sends
    `thread: {"type": "create"}` by default and, told so (`anthropic/lib/threads/_thread_state.py`,
    `recovers_from`), sends the turn again without it, the whole history each time, instead of failing the run."""

    details: ClassVar[dict[str, Any]] = {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}

    def __init__(self) -> None:
        super().__init__("`thread` is not supported by this gateway's /v1/messages: it keeps no conversation; send "
                         "the whole history without it", param="thread")


def error_envelope(message: str, type_: str, request_id: str | None = None,
                   details: dict[str, Any] | None = None) -> bytes:
    """Anthropic's error envelope; with `request_id`, which the Anthropic SDK shows with the error, and the error's
    `details` when it has any (`ThreadUnsupported`)."""
    error: dict[str, Any] = {"type": type_, "message": message}
    if details is not None:
        error["details"] = details
    body: dict[str, Any] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return _encode(body)


# Chat Completions fields the Messages ingress writes from fields of other names (`anthropic_ingress.chat_request`):
# a target refusing one (Gemini: `parallel_tool_calls: false`) is named to a Messages client by the field it sent.
# Only a target's refusal of that field (an `Unsupported` whose `param` it is) is renamed, and only the field's
# backticked name in it: any other 400 (the ingress's own wording, "`user` or `assistant`", or its refusal of a
# top-level `user` the client sent; an upstream's text) is left as it was written.
_MESSAGES_NAMES = {"parallel_tool_calls": ("`parallel_tool_calls`", "`tool_choice.disable_parallel_tool_use`"),
                   "stop": ("`stop`", "`stop_sequences`"), "user": ("`user`", "`metadata.user_id`")}


def anthropic_error_body(error: GatewayError, request_id: str | None = None) -> bytes:
    message = error.message
    renamed = _MESSAGES_NAMES.get(error.param) if isinstance(error, Unsupported) and error.param else None
    if renamed is not None:
        message = message.replace(*renamed)
    details = error.details if isinstance(error, ThreadUnsupported) else None
    return error_envelope(message, error_type(error), request_id, details)


def messages_path(path: str) -> bool:
    """Whether a request's path (ASGI's `scope["path"]`) is one of the Messages API's: `/v1/messages` or under it."""
    return path.startswith(MESSAGES_PATH) and (len(path) == len(MESSAGES_PATH) or path[len(MESSAGES_PATH)] == "/")


def messages_target(target: bytes) -> bool:
    """`messages_path` for a request target as it came on the request line, whole or as far as it was read (an
    origin form with its query, or an absolute form); percent-escapes are not decoded (such a request gets OpenAI's
    envelope)."""
    if target[:1] != b"/":  # the absolute form, `http://host/v1/messages`
        scheme, found, rest = target.partition(b"://")
        if not found or b"/" in scheme:
            return False
        target = rest[rest.find(b"/"):] if b"/" in rest else b""
    end = len(_MESSAGES_TARGET)
    return target.startswith(_MESSAGES_TARGET) and (len(target) == end or target[end:end + 1] in (b"/", b"?"))
