"""Anthropic's Messages API at the edge: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

`/v1/messages` is a `ProxyEndpoint` for chat with the `MessagesDialect`: the
request is translated into the internal chat request at ingress
(`translate.anthropic_ingress`) and runs the same pipeline as
`/v1/chat/completions`; the answer, its stream and its errors are written in
Anthropic's format here. A complete answer is translated within its attempt
(`MessagesDialect.translate`, called by `routing.exchange`): one the translation
refuses fails that attempt, which is retried and fallen back from as any 502.
A stream is translated at the edge, once its head went: one the translation
refuses ends with its `error` event, and is recorded as that error (`_Framer`),
never cached; a cache hit the translation would refuse is a miss
(`check_stream`, `cache.stage`).
`count_tokens` needs no upstream: it checks the key and
the alias like any request and answers with the gateway's own count (tiktoken,
`accounting.prompt.PromptEstimator.estimate_body`: the estimate a reservation
makes, and the `input_tokens` a `/v1/messages` answer carries and is billed for
when its upstream reports none; images by Anthropic's size rule, thinking only
in the current turn, as Anthropic counts them: docs/providers.md), in a thread
when the body is large, so that a long count does not hold up other requests.

Both answer with the request id also as `request-id` (and errors with `request_id`
in the body), where the Anthropic SDK reads it (`message._request_id`,
`APIStatusError.request_id`); `x-request-id` stays, as on every answer. An
overloaded upstream (`UpstreamOverloaded`, a 503 for OpenAI's clients) is
Anthropic's own 529 `overloaded_error` here, which the SDK raises as
`OverloadedError` (the metrics and the access log keep the gateway's 503).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import msgspec

from ..accounting.prompt import estimate_prompt
from ..auth.dynamic import find_key
from ..errors import GatewayError, InternalError, MethodNotAllowed, ShuttingDown, UpstreamOverloaded
from ..pipeline.context import RequestContext
from ..pipeline.dialect import StreamFramer
from ..pipeline.lifecycle import Lifecycle
from ..pipeline.stages import BODIES, ClientGone, authenticate, model_not_found, read_body
from ..runtime import Runtime
from ..schemas.endpoints import Endpoint
from ..schemas.events import StreamEvent
from ..schemas.openai import Usage
from ..telemetry.tokens import TokenCounter
from ..telemetry.usage import OFF_LOOP_CHARS, estimate_on_loop, pipeline_counter
from ..translate.anthropic_answer import MessagesStream, messages_answer, messages_body, messages_response
from ..translate.anthropic_ingress import anthropic_error_body, chat_request, count_tokens_request
from ..translate.common import BETA, CACHE_MARK
from .asgi import JSON, RequestHeaders, RequestIds, send_body, send_error

__all__ = ["CountTokensEndpoint", "MessagesDialect"]

_encode = msgspec.json.Encoder().encode
log = logging.getLogger("gateway.proxy")
_REQUEST_ID = b"request-id"  # the header the Anthropic SDK reads the request id from
_OVERLOADED = 529  # Anthropic's status for `overloaded_error`


_BETA_HEADER = b"anthropic-beta"
_BETA_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # `interleaved-thinking-2025-05-14`, `context-1m-2025-08-07`
_MAX_BETAS = 16


def client_betas(headers: Any) -> list[str]:
    """The `anthropic-beta` values a client sent (one header or several, comma-separated): names of Anthropic's
    betas only (lower case, digits, `.`, `_`, `-`; others dropped), at most `_MAX_BETAS`, in order, once each."""
    found: list[str] = []
    for name, value in headers:
        if name != _BETA_HEADER:  # (ASGI header names are lower case)
            continue
        for part in bytes(value).decode("latin-1").split(","):
            beta = part.strip()
            if _BETA_NAME.fullmatch(beta) and beta not in found and len(found) < _MAX_BETAS:
                found.append(beta)
    return found


class MessagesDialect:
    """Anthropic's Messages request and answer formats (see `pipeline.dialect.Dialect`)."""

    label = "messages"

    def decode(self, raw: bytes, headers: Any) -> tuple[dict[str, Any], msgspec.Struct]:
        chat, typed = chat_request(raw)
        betas = client_betas(headers)
        if betas:  # for an Anthropic upstream's `anthropic-beta` (every other provider removes them, with the mark)
            chat[BETA], chat[CACHE_MARK] = betas, True
        return chat, typed

    def reply(self, ctx: RequestContext, body: bytes) -> bytes:
        _identify(ctx)
        return messages_response(body, ctx.alias_label, _estimate(ctx))

    def translate(self, body: bytes) -> Callable[[RequestContext], bytes]:
        """A complete answer translated within its attempt (`routing.exchange`), so that one the translation refuses
        (an `UpstreamError`) is the attempt's failure: the writer of its body, called once its usage is known."""
        return partial(_written, messages_answer(body))

    def framer(self, ctx: RequestContext) -> StreamFramer:
        _identify(ctx)
        return _Framer(ctx, MessagesStream(ctx.alias_label, partial(_stream_estimate, ctx)))

    def check_stream(self, events: list[StreamEvent]) -> None:
        """Frame a whole stream to no one (a cache hit's, before it is served: `cache.stage`): the `UpstreamError`
        its translation would end it with, if any (a tool call without a name). A hit the client would get as an
        error is a miss instead: retried and fallen back from as a live answer would be."""
        MessagesStream("").frame(events)

    def error_body(self, error: GatewayError) -> bytes:
        return anthropic_error_body(error)

    def error_reply(self, error: GatewayError, request_id: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """An error's body and its headers beyond the edge's own, with the request id where the SDK reads it; an
        overloaded upstream answered with Anthropic's 529 (the edge sends the error's status: set on this one)."""
        if isinstance(error, UpstreamOverloaded):
            error.status = _OVERLOADED
        return anthropic_error_body(error, request_id), [(_REQUEST_ID, request_id.encode())]


class _Framer:
    """A request's `MessagesStream`, which marks the request failed when it refuses the stream: once the head went, the
    edge ends the stream with the error's event (`api.proxy._fail_stream`), but when the refused batch was the last
    one, the stream had ended whole for its stages, whose end hooks then take it for finished. Marked (its status and
    error code, as a stream ended by the error has them: `telemetry.stage.stream_ending`), it is recorded as the
    error, and the cache does not store an answer its client got as an error (`cache.stage`)."""

    __slots__ = ("_ctx", "_stream")

    def __init__(self, ctx: RequestContext, stream: MessagesStream) -> None:
        self._ctx = ctx
        self._stream = stream

    def frame(self, events: list[StreamEvent]) -> bytes:
        try:
            return self._stream.frame(events)
        except GatewayError as exc:
            self._ctx.status, self._ctx.error_code = exc.status, exc.label
            raise
        except Exception:  # a bug: the edge ends the stream with an internal error
            self._ctx.status, self._ctx.error_code = InternalError.status, InternalError.code
            raise


def _written(answer: dict[str, Any], ctx: RequestContext) -> bytes:
    """A `MessagesDialect.translate`d answer's body: `reply`'s, without translating it again."""
    _identify(ctx)
    return messages_body(answer, ctx.alias_label, _estimate(ctx))


def _identify(ctx: RequestContext) -> None:
    """The request id as `request-id` on the answer's head, beside the headers the stages set."""
    ctx.headers = [*(ctx.headers or ()), (_REQUEST_ID, ctx.request_id.encode())]


def _estimate(ctx: RequestContext) -> Usage | None:
    """An answer's usage when its upstream sent none: the gateway's estimate, billed; on a cache hit (which bills
    nothing) the stored answer's own, the estimate its miss carried (`ctx.shown_usage`)."""
    if ctx.shown_usage is not None:
        return ctx.shown_usage
    return ctx.usage if ctx.usage_estimated else None


def _stream_estimate(ctx: RequestContext) -> Usage | None:
    """A stream's usage when its upstream sent none, as `telemetry.usage.CountTokens` estimates it (whose end hook
    runs only once the last event is written): `estimate_on_loop`; on a cache hit, the stored answer's own."""
    if ctx.shown_usage is not None:
        return ctx.shown_usage
    if ctx.usage is not None or ctx.provider is None or not isinstance(ctx.body.get("messages"), list):
        return None
    counter = pipeline_counter(ctx)
    return estimate_on_loop(counter, ctx) if counter is not None else None


class TokensHost(Protocol):
    request_ids: RequestIds
    tokens: TokenCounter
    active: set[Lifecycle]

    def acquire_runtime(self) -> Runtime: ...


class CountTokensEndpoint:
    """`POST /v1/messages/count_tokens`: `{"input_tokens": n}` for a Messages request, counted locally. Among the
    requests the drain deadline ends (`Gateway.cut_all`): one still reading its body then gets the 503 in Anthropic's
    envelope, where uvicorn, cancelling it later, answered a plain-text 500 and logged a traceback."""

    def __init__(self, host: TokensHost) -> None:
        self.host = host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        host = self.host
        headers = RequestHeaders(scope["headers"], host.request_ids)
        runtime = host.acquire_runtime()
        task = asyncio.current_task()
        assert task is not None
        life = Lifecycle(task, runtime)
        host.active.add(life)
        try:
            body = await self._count(scope, receive, headers, runtime)
            request_id = headers.request_id.encode()
            life.protect()
            await send_body(send, 200, [(b"content-type", JSON), (b"content-length", str(len(body)).encode()),
                                        (b"x-request-id", request_id), (_REQUEST_ID, request_id)], body)
        except asyncio.CancelledError:
            if life.reason is None:
                raise  # not ours (the server is cancelling its tasks): let it through
            task.uncancel()
            if life.reason == "shutdown":
                await self._error(send, ShuttingDown("the request was cut at the drain deadline (the gateway is "
                                                     "shutting down, or its policy was reloaded); retry"),
                                  headers.request_id)
        except ClientGone:
            pass
        except GatewayError as exc:
            await self._error(send, exc, headers.request_id)
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": headers.request_id}})
            await self._error(send, InternalError("the gateway failed to handle this request"), headers.request_id)
        finally:
            host.active.discard(life)
            runtime.release()

    @staticmethod
    async def _error(send: Any, error: GatewayError, request_id: str) -> None:
        await send_error(send, error, request_id, (_REQUEST_ID, request_id.encode()),
                         body=anthropic_error_body(error, request_id))

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
            if len(raw) > OFF_LOOP_CHARS:
                count = await asyncio.to_thread(_count, self.host.tokens, chat, route.upstream_model)
            else:
                count = _count(self.host.tokens, chat, route.upstream_model)
        finally:
            BODIES.held -= len(raw)
        return _encode({"input_tokens": count})


def _count(tokens: TokenCounter, chat: dict[str, Any], model: str) -> int:
    """The gateway's estimate of the prompt (`accounting.prompt.PromptEstimator.estimate_body`), the one it bills
    with when an upstream reports no usage: the chat messages' tokens (text, tool calls and results, with the chat
    format's overhead), the ids that tie tool results to their calls, the images (`translate.image_tokens`), the
    current turn's thinking (the only thinking left in a count's chat request) and the tools' definitions. By an
    estimator that keeps no counts: it may run in a thread."""
    return estimate_prompt(tokens, chat, model, Endpoint.CHAT)
