"""The proxied OpenAI endpoints, as raw ASGI handlers mounted in litestar.

Why raw ASGI here: these three routes are the hot path. Reading the body with
our own size limit, sending the reply ourselves and watching for the client's
disconnect with one task keeps the per-request cost to what the gateway needs,
and gives exact control over streams: chunks are sent as they arrive, and a
client that goes away cancels the upstream read at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import (
    BodyTooLarge,
    GatewayError,
    HeadersTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
)
from ..pipeline.context import Reply, RequestContext
from ..pipeline.endpoints import Endpoint
from .asgi import JSON, RequestHeaders, send_body, send_error

if TYPE_CHECKING:
    from ..app import Gateway

__all__ = ["ProxyEndpoint"]

log = logging.getLogger("gateway.proxy")
# uvicorn's httptools parser sets no limit of its own; nothing legitimate sends more.
MAX_HEADER_BYTES = 64 * 1024
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client closed the connection before the request body arrived."""


class ProxyEndpoint:
    """One OpenAI endpoint: read the body, run the pipeline, send the reply."""

    def __init__(self, gateway: Gateway, endpoint: Endpoint) -> None:
        self.gateway = gateway
        self.endpoint = endpoint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        headers = RequestHeaders(scope["headers"])
        request_id = headers.request_id
        try:
            if headers.size > MAX_HEADER_BYTES:
                raise HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"use POST for /v1/{self.endpoint.path}", headers={"Allow": "POST"})
            runtime = self.gateway.runtime  # one policy for the whole request, even across a reload
            raw = await self._read_body(receive, headers.content_length, runtime.policy.server.max_body_bytes)
        except GatewayError as exc:
            await send_error(send, exc, request_id)
            return
        except ClientGone:
            return
        ctx = RequestContext(request_id, self.endpoint, runtime, raw, headers.credential, started)
        try:
            reply = await self.gateway.pipeline.run(ctx)
        except GatewayError as exc:
            await send_error(send, exc, request_id)
            return
        except Exception:
            log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            await send_error(send, InternalError("the gateway failed to handle this request"), request_id)
            return
        if reply.stream is None:
            assert reply.body is not None
            response_headers = [
                (b"content-type", JSON),
                (b"content-length", str(len(reply.body)).encode()),
                (b"x-request-id", request_id.encode()),
            ]
            await send_body(send, reply.status, response_headers, reply.body)
        else:
            await self._send_stream(reply, request_id, receive, send)

    async def _read_body(self, receive: Any, content_length: int | None, limit: int) -> bytes:
        if content_length is not None:
            if content_length < 0:
                raise InvalidRequest("invalid Content-Length header")
            if content_length > limit:
                raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _send_stream(self, reply: Reply, request_id: str, receive: Any, send: Any) -> None:
        """Forward the stream; if the client goes away, cancel it (and so the upstream read)."""
        stream = reply.stream
        assert stream is not None
        task = asyncio.current_task()
        assert task is not None
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(receive, task, gone))
        try:
            await send({
                "type": "http.response.start", "status": reply.status,
                "headers": [*_SSE_HEADERS, (b"x-request-id", request_id.encode())],
            })
            async for chunk in stream:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            task.uncancel()
        except OSError:  # the server reports a write to a closed connection
            log.debug("client went away mid-stream", extra={"fields": {"request_id": request_id}})
        finally:
            watcher.cancel()
            await stream.aclose()  # runs every stage's clean-up, even if the stream never started


async def _watch_disconnect(receive: Any, task: asyncio.Task[Any], gone: asyncio.Event) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gone.set()
            task.cancel()
            return
