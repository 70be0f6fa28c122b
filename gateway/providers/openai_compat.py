"""Any OpenAI-compatible upstream: OpenAI itself, Azure-style deployments, vLLM, Ollama...

The request is the client's own body with `model` rewritten, so nothing is lost
in translation. This module adds the discipline around it: a bounded wait for a
pooled connection, per-phase timeouts, mapping of upstream statuses to the
gateway's errors with sanitized messages, usage read from the answer, and streams
turned into typed events as they arrive, their bytes untouched unless the gateway
itself changed what the upstream sends (the usage it asked for).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec

from ..errors import (
    BodyTooLarge,
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)
from ..policy.compiled import ProviderConfig
from ..sanitize import sanitize_upstream_message
from ..schemas.endpoints import Endpoint
from ..schemas.events import DONE, Chunk, EventSource, StreamError, StreamEvent, UsageReport
from ..schemas.openai import ChunkChoicesPeek, ChunkPeek, UsageChoicesPeek, UsagePeek, has_choices
from ..schemas.responses import ResponsesPeek, responses_usage
from ..upstream.client import ConnectionGate, new_session, transport_error
from ..upstream.read_timer import ReadTimer
from ..upstream.sse import DONE as DONE_PAYLOAD
from ..upstream.sse import SSEDecoder
from .base import ALL_ENDPOINTS, Call, Completion, check_endpoint
from .deadline import deadline_in
from .streaming import ResponsesEvents, TranslatedStream

__all__ = ["OpenAICompatProvider", "status_error"]

_encode = msgspec.json.Encoder().encode
# Read per request: an attribute of an enum class goes through its metaclass's `__getattr__` hook on
# CPython 3.11 (about 900 instructions), a module global does not.
_RESPONSES = Endpoint.RESPONSES
_peek_usage = msgspec.json.Decoder(UsagePeek).decode
_peek_usage_choices = msgspec.json.Decoder(UsageChoicesPeek).decode  # when a stage reads the answer's text
_peek_chunk = msgspec.json.Decoder(ChunkPeek).decode
_peek_chunk_choices = msgspec.json.Decoder(ChunkChoicesPeek).decode  # when a stage reads every chunk's text


def _peek_or_none(payload: bytes) -> tuple[ChunkPeek | None, bool]:
    """The chunk as `_peek_chunk` reads it (its choices left raw) and whether usage rides on a content chunk,
    or (None, False) when even that fails (as it does when no stage reads the choices)."""
    try:
        peek: ChunkPeek = _peek_chunk(payload)
        return peek, peek.usage is not None and has_choices(peek.choices)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None, False
_peek_responses = msgspec.json.Decoder(ResponsesPeek).decode
_peek_error = msgspec.json.Decoder(dict[str, Any]).decode
_MAX_ERROR_BODY = 64 * 1024
# The `"usage": null` an upstream adds to every chunk once asked for usage. A JSON key
# cannot occur inside a string unescaped, so this never matches content text.
_NULL_USAGE_AFTER = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])')
_NULL_USAGE_FIRST = re.compile(rb'"usage"\s*:\s*null\s*,\s*')
# How OpenAI, vLLM, Azure and others word a prompt that does not fit the model's window.
_CONTEXT_LENGTH = re.compile(r"context[ _]length|context window|maximum context|prompt is too long", re.IGNORECASE)


class OpenAICompatProvider:
    endpoints = ALL_ENDPOINTS

    def __init__(self, config: ProviderConfig, gate: ConnectionGate) -> None:
        self.name = config.name
        self.config = config
        self.stream_usage_expected = config.stream_usage  # set False once the upstream ignores the request
        self._urls = {endpoint: f"{config.base_url}/{endpoint.path}" for endpoint in Endpoint}
        self._query = dict(config.query) or None
        self._gate = gate
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session(self.config)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, call: Call) -> str:
        return self._urls[call.endpoint]

    def _params(self, call: Call) -> dict[str, str] | None:
        return self._query

    def _payload(self, call: Call) -> bytes:
        body = call.body
        if self._asks_for_usage(call):
            # Ask for the usage chunk so that accounting has real figures; the stream undoes
            # every trace of this request before the client sees it (see `_OpenAIStream`).
            options = body.get("stream_options")
            body = {**body, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
        return _encode(body)

    def _headers(self, call: Call) -> dict[str, str]:
        if call.traceparent is None:
            return {"X-Request-Id": call.request_id}
        return {"X-Request-Id": call.request_id, "traceparent": call.traceparent.decode("ascii")}

    def _asks_for_usage(self, call: Call) -> bool:
        """Whether the gateway adds `stream_options.include_usage` itself (Chat and Completions streams)."""
        return (call.stream and self.config.stream_usage and not call.client_wants_usage
                and call.endpoint is not _RESPONSES)

    def sanitize(self, message: object) -> str:
        return sanitize_upstream_message(message, secrets=self.config.secrets, public_hosts=self.config.public_hosts)

    async def _send(self, call: Call) -> tuple[aiohttp.ClientResponse, float]:
        """POST and wait for the response headers (connect + first byte); map failures.

        The caller holds a connection permit from the gate and must release it.
        """
        assert self._session is not None, "provider not started"
        timeouts = call.timeouts or self.config.timeouts
        deadline = asyncio.get_running_loop().time() + timeouts.total_s
        extra: dict[str, Any] = {}
        if call.timeouts is not None and call.timeouts.connect_s != self.config.timeouts.connect_s:
            extra["timeout"] = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=call.timeouts.connect_s)
        try:
            async with deadline_in(timeouts.first_byte_s):  # asyncio.timeout's semantics, less of its cost
                # `_request` itself, as `post` calls it: not through its context manager (three calls fewer)
                response = await self._session._request(
                    "POST", self._url(call), data=self._payload(call), params=self._params(call),
                    headers=self._headers(call), **extra,
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise transport_error(exc, self.name, "waiting for the response") from exc
        if response.status != 200:
            try:
                raise await self._status_error(response)
            finally:
                response.close()
        return response, deadline

    async def complete(self, call: Call) -> Completion:
        check_endpoint(self, call.endpoint)
        await self._gate.acquire()
        try:
            response, deadline = await self._send(call)
            body = await self._read_body(response, deadline, (call.timeouts or self.config.timeouts).idle_s)
        finally:
            self._gate.release()
        return self._completion(call, body)

    def _completion(self, call: Call, body: bytes) -> Completion:
        """The answer for the client from the upstream's body (here: as it is, with its usage read)."""
        try:
            if call.endpoint is _RESPONSES:
                return Completion(body, responses_usage(_peek_responses(body).usage))
            if call.read_choices:  # a stage reads the answer's text: its choices in the same decode
                try:
                    peek = _peek_usage_choices(body)
                    return Completion(body, peek.usage, choices=peek.choices or [])
                except msgspec.ValidationError:
                    pass  # choices of unusual types: the usage alone (the stage reads the body its own way)
            usage = _peek_usage(body).usage
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise UpstreamError(f"upstream `{self.name}` answered with invalid JSON") from exc
        return Completion(body, usage)

    async def _read_body(self, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> bytes:
        """Read a whole body with the idle timeout between reads and the size cap while reading.

        What has already arrived is taken without a timer: only a read that waits can time out, and a
        small answer usually comes whole with its headers. An `asyncio.timeout` per read armed and
        cancelled a loop timer and read its enum state about nine times (slow on CPython 3.11)."""
        loop = asyncio.get_running_loop()
        content = response.content
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                data = content.read_nowait()
                if not data:
                    if content.at_eof():
                        break
                    async with asyncio.timeout_at(min(deadline, loop.time() + idle_s)):
                        data = await content.readany()
                    if not data:
                        break
                size += len(data)
                if size > self.config.max_response_bytes:
                    raise UpstreamError(f"upstream `{self.name}` answered with an oversized body")
                parts.append(data)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            response.close()
            raise transport_error(exc, self.name, "reading the response") from exc
        except GatewayError:
            response.close()
            raise
        response.release()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def open_stream(self, call: Call) -> EventSource:
        check_endpoint(self, call.endpoint)
        await self._gate.acquire()
        try:
            response, deadline = await self._send(call)
        except BaseException:
            self._gate.release()
            raise
        if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
            response.close()
            self._gate.release()
            raise UpstreamError(f"upstream `{self.name}` did not answer with an event stream")
        return self._stream(call, response, deadline, (call.timeouts or self.config.timeouts).idle_s)

    def _stream(self, call: Call, response: aiohttp.ClientResponse, deadline: float, idle_s: float) -> EventSource:
        """The started stream's events (here: OpenAI's chunks, or the Responses API's events)."""
        if call.endpoint is _RESPONSES:
            return TranslatedStream(self, response, deadline, idle_s, ResponsesEvents(self))
        return _OpenAIStream(self, response, deadline, self._asks_for_usage(call), idle_s, call.read_choices)

    def release(self) -> None:
        """Give back the connection permit a started stream held."""
        self._gate.release()

    async def _status_error(self, response: aiohttp.ClientResponse) -> GatewayError:
        """Turn a non-200 answer into the gateway error a client should see."""
        try:
            async with asyncio.timeout(self.config.timeouts.idle_s):
                raw = await response.content.read(_MAX_ERROR_BODY)
            message, code = self._error_detail(_peek_error(raw))
        except (aiohttp.ClientError, OSError, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
            message = code = None
        error = self._map_status(response.status, self.sanitize(message), response.headers.get("Retry-After"),
                                 code if isinstance(code, str) else None, message if isinstance(message, str) else "")
        error.upstream_status = response.status
        return error

    def _error_detail(self, body: dict[str, Any]) -> tuple[object, object]:
        """The message and code of an upstream's error body (here: OpenAI's `{"error": {...}}`)."""
        detail = body.get("error")
        if isinstance(detail, dict):
            return detail.get("message"), detail.get("code")
        return detail, None

    def _map_status(self, status: int, detail: str, retry_after: str | None, code: str | None, raw: str
                    ) -> GatewayError:
        return status_error(self.name, status, detail, retry_after, code, raw)


def status_error(
    provider: str, status: int, detail: str, retry_after: str | None, code: str | None = None, raw: str = "",
) -> GatewayError:
    """The client-facing error for an upstream's HTTP status (`detail` already sanitized; `code` and `raw`,
    the upstream's own error code and message, are only read to recognise a context window overflow)."""
    suffix = f": {detail}" if detail else ""
    if status in (400, 413, 422) and (code == "context_length_exceeded" or _CONTEXT_LENGTH.search(raw[:2000])):
        return ContextLengthExceeded(f"upstream `{provider}` rejected the request: the prompt exceeds its context "
                                     f"window{suffix}")
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after and _safe_retry_after(retry_after) else {}
        return RateLimited(f"upstream `{provider}` is rate limited{suffix}", headers=headers)
    if status in (400, 422):
        return InvalidRequest(f"upstream `{provider}` rejected the request{suffix}")
    if status == 413:
        return BodyTooLarge(f"upstream `{provider}` rejected the request as too large")
    if status in (408, 504):
        return UpstreamTimeout(f"upstream `{provider}` timed out (HTTP {status})")
    if status in (401, 403):
        return UpstreamError(f"upstream `{provider}` rejected the gateway's credentials (HTTP {status})")
    return UpstreamError(f"upstream `{provider}` failed with HTTP {status}{suffix}")


def _safe_retry_after(value: str) -> bool:
    return len(value) <= 40 and (value.isdigit() or value[:3].isalpha())


_COMPACT_NULL_USAGE = b',"usage":null}'
_COMPACT_CUT = -len(_COMPACT_NULL_USAGE)


def strip_null_usage(payload: bytes) -> bytes:
    """Remove the top-level `"usage": null` that the gateway's own usage request added."""
    if payload.endswith(_COMPACT_NULL_USAGE):  # OpenAI's own compact form, last key: the common case
        return payload[:_COMPACT_CUT] + b"}"
    stripped, count = _NULL_USAGE_AFTER.subn(b"", payload, count=1)
    return stripped if count else _NULL_USAGE_FIRST.sub(b"", payload, count=1)


def _unobserved(batch: list[StreamEvent]) -> None:
    """No one observes the stream's batches (see `_OpenAIStream.observe`)."""


class _OpenAIStream:
    """A started OpenAI SSE stream, as batches of typed events (see `EventSource`).

    Two ways to read it: iterate it (an async generator, for consumers that rewrite events), or,
    once observed, poll it (`reads()`: `ready()` hands over the next batch when the upstream's bytes
    are there, else None, and the reader awaits the body's `wait()` before asking again). The edge
    polls it when no stage rewrites events: on a slow stream the task then resumes through no
    generator frame on every event (about 1,500 instructions an event). A poller may also `forward` the
    batches to a sink that writes them from the upstream connection's read, its task left asleep."""

    __slots__ = ("_asked_for_usage", "_closed", "_deadline", "_decoder", "_finished", "_held", "_idle_s", "_observer",
                 "_peek", "_provider", "_read_choices", "_response", "_saw_usage", "_sink", "_timer")

    def __init__(
        self, provider: OpenAICompatProvider, response: aiohttp.ClientResponse, deadline: float,
        asked_for_usage: bool, idle_s: float, read_choices: bool = False,
    ) -> None:
        self._read_choices = read_choices
        self._peek: Any = _peek_chunk_choices if read_choices else _peek_chunk
        self._idle_s = idle_s
        self._provider = provider
        self._response = response
        self._deadline = deadline
        self._asked_for_usage = asked_for_usage
        self._closed = False
        self._finished = False  # the batch that ends the stream was handed over
        self._saw_usage = False
        self._timer: ReadTimer | None = None
        self._decoder = SSEDecoder()
        self._observer: Callable[[list[StreamEvent]], None] = _unobserved
        self._held: list[StreamEvent] | None = None  # a batch the sink declined: `ready()` hands it over first
        self._sink: Callable[[list[StreamEvent]], bool] | None = None

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    def observe(self, observer: Callable[[list[StreamEvent]], None]) -> None:
        """Show `observer` every batch before it is handed over (`pipeline.streams.ReplyStream` then lets the
        edge read this stream directly). Every stream ends with a batch that ends with a `StreamDone` or a
        `StreamError`."""
        self._observer = observer

    def reads(self) -> tuple[Callable[[], list[StreamEvent] | None], Callable[[], Awaitable[object]]]:
        """(`ready`, `wait`) for reading this stream without iterating it: `ready()` is the next batch, None
        when the upstream's next bytes have not come yet (await `wait()`, then ask again), or [] once the
        batch that ends the stream was handed over. `aclose()` when done, as after iterating.

        `wait()` is `ReadTimer.wait`: it may fail with the upstream's failure, which the next `ready()` turns
        into the stream's last batch (a `StreamError`): a reader ignores the failure of the wait itself."""
        return self.ready, self._start().wait

    def forward(self, sink: Callable[[list[StreamEvent]], bool]) -> bool:
        """While the reader of `reads()` waits, hand each batch to `sink` as soon as its bytes arrive, from the
        connection's read itself (`ReadTimer.pump`): True from `sink` means it wrote the batch, and the reader
        waits on, its task not resumed; a batch `sink` declines (False, e.g. the last one) ends the wait, and
        `ready()` hands it over next. False: not on this connection (every batch goes through `ready()`)."""
        if self._timer is None or not self._timer.pump(self._pump):
            return False
        self._sink = sink
        return True

    def _pump(self) -> bool:
        """The connection read bytes while the reader waits: whether their events were all written by the sink."""
        if self._finished or self._held is not None or self._sink is None:
            return False
        batch = self.ready()
        if batch:
            self._held = batch
            if self._finished or not self._sink(batch):
                return False
            self._held = None
        elif batch is not None:
            return False
        self._timer.waits_on()  # type: ignore[union-attr]  # set by `forward`
        return True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._sink = None
            self._observer = _unobserved  # it is usually the ReplyStream that holds this stream: no cycle left
            if self._timer is not None:
                self._timer.stop()
            self._response.close()
            self._provider.release()

    def _start(self) -> ReadTimer:
        timer = self._timer
        if timer is None:
            timer = self._timer = ReadTimer(self._response.content, self._deadline, self._idle_s)
        return timer

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        wait = self._start().wait
        try:
            while True:
                batch = self.ready()
                while batch is None:
                    waiting = wait()
                    try:
                        await waiting
                    except Exception:  # noqa: BLE001 -- the read failed: `ready()` ends the stream with it
                        pass
                    batch = self.ready()
                if not batch:
                    return
                yield batch
                del batch  # nothing of this read is kept while the next one waits
        finally:
            await self.aclose()

    def ready(self) -> list[StreamEvent] | None:
        """The next batch of events (shown to the observer first), None when there is none yet, [] after the
        last. Never raises for the upstream's failures: they end the stream with a `StreamError` batch."""
        held = self._held
        if held is not None:
            self._held = None
            return held
        if self._finished:
            return []
        timer = self._timer
        assert timer is not None, "reads() or iterating starts the stream"
        while True:
            try:  # not `read()` nor `readany()`: no coroutine frames between the task and the wait
                data = timer.ready()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return self._last([StreamError(transport_error(exc, self._provider.name, "mid-stream"))])
            if data is None:
                return None
            try:
                payloads = self._decoder.feed(data) if data else self._decoder.flush()
            except ValueError as exc:
                return self._last([self._fail(f"sent an invalid stream: {exc}")])
            events, finished = self._events(payloads)
            if not data and not finished:  # the upstream ended without [DONE]: end the stream properly
                events.append(DONE)
                finished = True
            if finished:
                if self._asked_for_usage and not self._saw_usage:
                    self._provider.stream_usage_expected = False  # it ignores include_usage: count ourselves
                return self._last(events)
            if events:
                self._observer(events)
                return events
            # bytes without a whole event: read on (None when nothing more has come)

    def _last(self, events: list[StreamEvent]) -> list[StreamEvent]:
        """The batch that ends the stream: shown to the observer, and the last one handed over."""
        self._finished = True
        self._observer(events)
        return events

    def _events(self, payloads: list[bytes]) -> tuple[list[StreamEvent], bool]:
        """The events for these SSE payloads, and whether the stream is over."""
        events: list[StreamEvent] = []
        hide = self._asked_for_usage
        read = self._read_choices
        for payload in payloads:
            if payload == DONE_PAYLOAD:
                events.append(DONE)
                return events, True
            typed = read
            try:  # every event is checked: a malformed one ends the stream cleanly (~0.5 us)
                peek = self._peek(payload)
                riding = peek.usage is not None and has_choices(peek.choices)  # usage on a content chunk
            except (msgspec.DecodeError, msgspec.ValidationError):
                # choices a reader cannot type (`"content": 5`) pass as they do when no stage reads them
                peek, riding = _peek_or_none(payload) if read else (None, False)
                if peek is None:
                    events.append(self._fail("sent a malformed stream event"))
                    return events, True
                typed = False
            if peek.error is not None:
                detail = self._provider.sanitize(peek.error.message)
                events.append(self._fail(f"failed mid-stream: {detail}"))
                return events, True
            if peek.usage is not None:
                self._saw_usage = True
                if riding:
                    events.append(Chunk(payload, None, peek.choices) if typed else Chunk(payload))
                    events.append(UsageReport(peek.usage))
                else:
                    events.append(UsageReport(peek.usage, payload))
                continue
            if hide:
                if payload[_COMPACT_CUT:] == _COMPACT_NULL_USAGE:  # the common case, without a call (strip_null_usage;
                    # a slice compared, not `endswith`: see upstream/sse.py)
                    payload = payload[:_COMPACT_CUT] + b"}"
                elif payload.find(b'"usage"') >= 0:  # not `in`: see upstream/sse.py
                    payload = strip_null_usage(payload)
            events.append(Chunk(payload, None, peek.choices) if typed else Chunk(payload))
        return events, False

    def _fail(self, what: str) -> StreamError:
        return StreamError(UpstreamError(f"upstream `{self._provider.name}` {what}"))

