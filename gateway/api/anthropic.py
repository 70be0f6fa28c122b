"""Anthropic's Messages API at the edge: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

`/v1/messages` is a `ProxyEndpoint` for chat with the `MessagesDialect`: the
request is translated into the internal chat request at ingress
(`translate.anthropic_ingress`) and runs the same pipeline as
`/v1/chat/completions`; the answer, its stream and its errors are written in
Anthropic's format here. `count_tokens` needs no upstream: it checks the key and
the alias like any request and answers with the gateway's own count (tiktoken,
the same estimate accounting uses when an upstream reports none), in a thread
when the body is large, so that a long count does not hold up other requests.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgspec

from ..auth.dynamic import find_key
from ..errors import GatewayError, InternalError, MethodNotAllowed
from ..pipeline.context import RequestContext
from ..pipeline.dialect import StreamFramer
from ..pipeline.stages import BODIES, ClientGone, authenticate, model_not_found, read_body
from ..runtime import Runtime
from ..telemetry.tokens import TokenCounter
from ..translate.anthropic_ingress import (
    MessagesStream,
    anthropic_error_body,
    chat_request,
    count_tokens_request,
    messages_response,
)
from .asgi import JSON, RequestHeaders, RequestIds, send_body, send_error

__all__ = ["CountTokensEndpoint", "MessagesDialect"]

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("gateway.proxy")
_OFF_LOOP_BYTES = 64 * 1024  # a larger body is counted in a thread (as `telemetry.usage` counts large texts)


class MessagesDialect:
    """Anthropic's Messages request and answer formats (see `pipeline.dialect.Dialect`)."""

    label = "messages"

    def decode(self, raw: bytes) -> tuple[dict[str, Any], msgspec.Struct]:
        return chat_request(raw)

    def reply(self, ctx: RequestContext, body: bytes) -> bytes:
        return messages_response(body, ctx.alias_label)

    def framer(self, ctx: RequestContext) -> StreamFramer:
        return MessagesStream(ctx.alias_label)

    def error_body(self, error: GatewayError) -> bytes:
        return anthropic_error_body(error)


class TokensHost(Protocol):
    request_ids: RequestIds
    tokens: TokenCounter

    def acquire_runtime(self) -> Runtime: ...


class CountTokensEndpoint:
    """`POST /v1/messages/count_tokens`: `{"input_tokens": n}` for a Messages request, counted locally."""

    def __init__(self, host: TokensHost) -> None:
        self.host = host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        headers = RequestHeaders(scope["headers"], self.host.request_ids)
        runtime = self.host.acquire_runtime()
        try:
            body = await self._count(scope, receive, headers, runtime)
            await send_body(send, 200, [(b"content-type", JSON), (b"content-length", str(len(body)).encode()),
                                        (b"x-request-id", headers.request_id.encode())], body)
        except ClientGone:
            pass
        except GatewayError as exc:
            await send_error(send, exc, headers.request_id, body=anthropic_error_body(exc))
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": headers.request_id}})
            bug = InternalError("the gateway failed to handle this request")
            await send_error(send, bug, headers.request_id, body=anthropic_error_body(bug))
        finally:
            runtime.release()

    async def _count(self, scope: Any, receive: Any, headers: RequestHeaders, runtime: Runtime) -> bytes:
        policy = runtime.policy
        if scope["method"] != "POST":
            raise MethodNotAllowed("use POST for /v1/messages/count_tokens", headers={"Allow": "POST"})
        if runtime.dynamic_keys is None:
            key = authenticate(policy, headers.credential)
        else:  # keys created at run time, as the pipeline's Authenticate stage looks them up
            key = await find_key(policy, headers.credential, runtime.dynamic_keys)
        server = policy.server
        raw = await read_body(receive, headers.content_length, server.max_body_bytes, server.max_body_bytes_in_flight)
        try:
            chat = count_tokens_request(raw)
            alias = chat["model"]
            route = policy.models.get(alias)
            if route is None or (key is not None and not key.allows(alias)):
                raise model_not_found(alias)
            if len(raw) > _OFF_LOOP_BYTES:
                count = await asyncio.to_thread(_count, self.host.tokens, chat, route.upstream_model)
            else:
                count = _count(self.host.tokens, chat, route.upstream_model)
        finally:
            BODIES.held -= len(raw)
        return _encode({"input_tokens": count})


def _count(tokens: TokenCounter, chat: dict[str, Any], model: str) -> int:
    count = tokens.count_messages(chat["messages"], model)
    if chat.get("tools"):
        count += tokens.count(_encode(chat["tools"]).decode(), model)
    return count
