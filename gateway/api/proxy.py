"""The proxied OpenAI endpoints, as raw ASGI handlers mounted in litestar.

Why raw ASGI here: these three routes are the hot path. Sending the reply
ourselves and watching for the client's disconnect with one task keeps the
per-request cost to what the gateway needs, and gives exact control over a
request's life: events are written as they arrive, a client that goes away
cancels the upstream call at once (waiting for the first byte, or mid-stream),
and a stream cut on shutdown ends with an error event. So does one that fails
once its head went (a framer that meets a malformed upstream chunk, a bug): its
error in the stream's own format (`_fail_stream`), never a second response head.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import GatewayError, InternalError, ShuttingDown
from ..pipeline.context import Reply, RequestContext, RequestHead
from ..pipeline.dialect import Dialect, StreamFramer
from ..pipeline.lifecycle import Lifecycle
from ..pipeline.stages import ClientGone
from ..pipeline.streams import ReplyStream
from ..routing.exchange import TranslatedReply
from ..runtime import Runtime
from ..schemas.endpoints import Endpoint
from ..schemas.events import Chunk, StreamDone, StreamError, StreamEvent
from .asgi import JSON, ChunkWriter, RequestHeaders, RequestIds, chunk_writer, connection_gone, send_body, send_error
from .responses_frames import ResponsesFrames
from .sse import error_frame, frame
from .whole_reply import send_head, send_whole

__all__ = ["EdgeHost", "ProxyEndpoint"]

log = logging.getLogger("gateway.proxy")
# The endpoints whose streams OpenAI frames otherwise than chat's (`responses_frames`).
_FRAMERS: dict[Endpoint, Callable[[RequestContext], StreamFramer]] = {Endpoint.RESPONSES: lambda ctx: ResponsesFrames()}
_ENDS = (StreamDone, StreamError)  # the events that end a stream's last batch
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class EdgeHost(Protocol):
    """What the edge needs from the gateway: handed in, never imported."""

    request_ids: RequestIds
    active: set[Lifecycle]

    def acquire_runtime(self) -> Runtime: ...


class ProxyEndpoint:
    """One OpenAI endpoint: run the pipeline for a request, send the reply."""

    def __init__(self, host: EdgeHost, endpoint: Endpoint, dialect: Dialect | None = None) -> None:
        self.host = host
        self.endpoint = endpoint
        self.dialect = dialect  # the client's API when it is not OpenAI's (translated at ingress and here)
        # A stream's framer, when the client's wire format is not chat's `data:` lines and `[DONE]`: the dialect's,
        # or the endpoint's own (the Responses API's named events). None: `sse.frame`, and a lone chunk's fast path.
        self.framer = dialect.framer if dialect is not None else _FRAMERS.get(endpoint)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        host = self.host
        headers = RequestHeaders(scope["headers"], host.request_ids)
        request_id = headers.request_id
        task = asyncio.current_task()
        assert task is not None
        runtime = host.acquire_runtime()
        life = Lifecycle(task, runtime)
        host.active.add(life)
        dialect = self.dialect
        version = runtime.version_header
        try:
            head = RequestHead(scope["method"], headers.presented, headers.content_length, headers.size,
                               scope["headers"])  # (two different credentials: `AMBIGUOUS`, refused in the pipeline)
            ctx = RequestContext(request_id, self.endpoint, runtime, head, receive, life, started)
            ctx.dialect = dialect
            reply = await runtime.pipeline.run(ctx)
            stream = reply.stream
            if stream is None:
                life.protect()
                assert reply.body is not None
                if dialect is not None:  # (translated within the attempt, unless a stage rewrote it or a cache hit)
                    written = reply.write if type(reply) is TranslatedReply and reply.translated_of is reply.body \
                        else None
                    reply.body = dialect.reply(ctx, reply.body) if written is None else written(ctx)
                body = reply.body
                tail = [(b"x-request-id", request_id.encode()), version, *routing_headers(ctx), *(ctx.headers or ())]
                if not send_whole(send, reply.status, JSON, tail, body):  # else the server's `send`, in two messages
                    await send_body(send, reply.status, [
                        (b"content-type", JSON), (b"content-length", str(len(body)).encode()), *tail], body)
            else:
                # The stream is sent here, not in a helper coroutine: the task resumes through every frame
                # between it and the upstream read on every event (about 1,500 instructions a frame).
                framer = self.framer(ctx) if self.framer is not None else None
                try:
                    writer = await _start_stream(ctx, reply, send)
                    sse = writer if framer is None else None  # OpenAI's framing: a lone chunk in one formatting
                    wants_usage = ctx.wants_usage
                    reads = stream.reads(sse.write_chunk if sse is not None else None)
                    if reads is not None:  # the provider's stream polled here: no generator frame per event
                        ready, wait = reads
                        while True:
                            batch = ready()
                            if batch:
                                if sse is None or not sse.write_chunk(batch):
                                    await _send_batch(batch, wants_usage, framer, writer, send)
                                if type(batch[-1]) is not Chunk and isinstance(batch[-1], _ENDS):
                                    break  # the last batch (`ready()` would say [] now)
                                # not the last: it took all there was, so wait before asking again (it would say None)
                                del batch  # a held stream waits far longer than it writes: keep no event while it waits
                            elif batch is not None:
                                break  # [], after the last batch
                            waiting = wait()
                            try:
                                await waiting
                            except Exception:  # noqa: BLE001 -- the read failed: `ready()` ends the stream with it
                                pass
                    else:
                        async for batch in stream:
                            if sse is None or not sse.write_chunk(batch):
                                await _send_batch(batch, wants_usage, framer, writer, send)
                            del batch
                    await stream.finish()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except asyncio.CancelledError:
                    if life.reason != "shutdown":
                        raise
                    task.uncancel()
                    await _cut_stream(stream, framer, send)
                except OSError:  # the server reports a write to a closed connection
                    life.reason = life.reason or "client_gone"
                except Exception as exc:  # once the head went: the stream's error event, never a new reply
                    if isinstance(exc, RuntimeError) and connection_gone(send):  # uvloop's, for a write once the
                        life.reason = life.reason or "client_gone"  # connection is lost
                    elif life.response_started and not isinstance(exc, ClientGone):
                        await _fail_stream(stream, framer, send, exc, request_id)
                    else:
                        raise
                finally:
                    await stream.aclose("client_gone" if life.reason != "shutdown" else "shutdown")
        except asyncio.CancelledError:
            if life.reason is None:
                raise  # not ours (the server is cancelling its tasks): let it through
            task.uncancel()
            if life.reason == "shutdown" and not life.response_started:
                cut = ShuttingDown("the request was cut at the drain deadline (the gateway is shutting down, or "
                                   "its policy was reloaded); retry")
                await _send_quietly(_send_error(send, cut, request_id, version, dialect))
        except ClientGone:
            pass
        except GatewayError as exc:
            if life.response_started:  # ending the stream with its error event failed too: no reply can follow
                log.error("a stream failed after its head went", exc_info=exc,
                          extra={"fields": {"request_id": request_id}})
            else:
                await _send_error(send, exc, request_id, version, dialect)
        except Exception as exc:
            if isinstance(exc, (OSError, RuntimeError)) and connection_gone(send):
                life.reason = life.reason or "client_gone"  # a write to a connection lost meanwhile: no one to tell
            else:
                log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
                if not life.response_started:  # (after the head, a second one would only break the connection)
                    bug = InternalError("the gateway failed to handle this request")
                    await _send_error(send, bug, request_id, version, dialect)
        finally:
            life.stop()
            host.active.discard(life)
            runtime.release()


async def _start_stream(ctx: RequestContext, reply: Reply, send: Any) -> ChunkWriter | None:
    """Send a stream's head; the writer for its events, when the server allows one (`api.asgi.ChunkWriter`)."""
    headers = [*_SSE_HEADERS, (b"x-request-id", ctx.request_id.encode()), ctx.runtime.version_header,
               *routing_headers(ctx), *(ctx.headers or ())]
    if not send_head(send, reply.status, headers):  # else through the server's `send`
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    ctx.lifecycle.response_started = True
    return chunk_writer(send)


async def _send_batch(batch: list[StreamEvent], wants_usage: bool, framer: StreamFramer | None,
                      writer: ChunkWriter | None, send: Any) -> None:
    """A batch that `ChunkWriter.write_chunk` did not write (not a lone OpenAI chunk, or not writable at once)."""
    data = frame(batch, wants_usage) if framer is None else framer.frame(batch)
    if writer is None or not writer.write(data):
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _cut_stream(stream: ReplyStream, framer: StreamFramer | None, send: Any) -> None:
    """End a stream cut at a drain deadline (shutdown, or its policy retired by a reload): its end hooks, then an
    error event and the end of the body."""
    cut = ShuttingDown("the stream was cut at the drain deadline (the gateway is shutting down, or its policy was "
                       "reloaded)")
    await stream.aclose("shutdown", cut)
    await _end_with_error(framer, send, cut)


async def _fail_stream(stream: ReplyStream, framer: StreamFramer | None, send: Any, exc: Exception,
                       request_id: str) -> None:
    """End a stream that failed after its head went: a `GatewayError` as it is (a framer's `UpstreamError` for a
    malformed upstream chunk), anything else as an internal error, logged. The client reads the stream's error
    event, as for an upstream's failure mid-stream: a cut connection would be retried by its SDK (the upstream
    called, and billed, again)."""
    if isinstance(exc, GatewayError):
        error = exc
    else:
        log.error("unhandled error mid-stream", exc_info=exc, extra={"fields": {"request_id": request_id}})
        error = InternalError("the gateway failed while streaming the answer")
    await stream.aclose("error", error)
    await _end_with_error(framer, send, error)


async def _end_with_error(framer: StreamFramer | None, send: Any, error: GatewayError) -> None:
    """A started stream's error event, in its client's format, then the end of the body."""
    last = error_frame(error) if framer is None else framer.frame([StreamError(error)])
    await _send_quietly(send({"type": "http.response.body", "body": last, "more_body": True}))
    await _send_quietly(send({"type": "http.response.body", "body": b"", "more_body": False}))


_ATTEMPTS = [(b"x-gateway-attempts", str(n).encode()) for n in range(16)]


def routing_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """Which target answered, after how many attempts, and why it fell back (if it did)."""
    target = ctx.target
    if target is None:
        return []
    count = ctx.attempt_count
    attempts = _ATTEMPTS[count] if count < 16 else (b"x-gateway-attempts", str(count).encode())
    if ctx.fallback_reason is None:
        return [target.header, attempts]
    return [target.header, attempts, (b"x-gateway-fallback-reason", ctx.fallback_reason.encode())]


async def _send_error(send: Any, error: GatewayError, request_id: str, version: tuple[bytes, bytes],
                      dialect: Dialect | None) -> None:
    """The error reply: OpenAI's, or the client's API's envelope, with the request id where its SDK reads it when
    the dialect says where (`error_reply(error, request_id)`: the body and headers; Anthropic's `request-id`)."""
    if dialect is None:
        await send_error(send, error, request_id, version)
        return
    error_reply = getattr(dialect, "error_reply", None)
    body, extra = error_reply(error, request_id) if error_reply is not None else (dialect.error_body(error), [])
    await send_error(send, error, request_id, version, *extra, body=body)


async def _send_quietly(sending: Any) -> None:
    try:
        await sending
    except OSError:
        pass
