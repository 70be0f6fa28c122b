"""A started upstream SSE stream turned into typed events by a per-request translator.

Providers whose upstream does not speak OpenAI's chunk format (Anthropic's
Messages events, Gemini's `streamGenerateContent`, the Responses API's events)
share this loop: read with the idle timeout and the total deadline, split the
bytes into SSE payloads, hand each payload to the request's translator, and
yield what it made, one batch per network read, as soon as it arrives (nothing
is buffered beyond one incomplete SSE event). A translator that meets an event
it cannot place (malformed JSON, an event out of order) raises
`StreamProtocolError`: the stream then ends with an error event. So does an
event of valid JSON whose values a translator's lookups cannot read (a string
where an object belongs: `AttributeError`, `TypeError`, `LookupError`): what it
reads is the upstream's JSON, so such an event is malformed, never the
gateway's failure (which would cut the stream), as the providers' complete
answers treat theirs (`AnthropicProvider._completion`). A translator that reads usage
before the stream's last event (`usage_so_far`) has it read when the stream ends
without its usage.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
import msgspec

from ..errors import GatewayError, UpstreamError, with_detail
from ..schemas.events import DONE, Chunk, StreamDone, StreamError, StreamEvent, UsageReport, is_content_event
from ..schemas.openai import Usage
from ..schemas.responses import responses_usage
from ..translate.common import StreamProtocolError
from ..upstream.client import transport_error
from ..upstream.read_timer import ReadTimer
from ..upstream.sse import SSEDecoder
from .openai_chunks import is_utf8
from .scrub import ResponsesEventScrubPeek, scrubbed_error

__all__ = ["ResponsesEvents", "StreamHost", "StreamProtocolError", "StreamTranslator", "TranslatedStream"]

_peek_event = msgspec.json.Decoder(ResponsesEventScrubPeek).decode
# (`RecursionError`: msgspec's, for JSON nested past the interpreter's recursion limit: ~1,000 levels, 3 KB; every
# decode of an upstream's bytes takes it for a malformed answer)
_MALFORMED = (StreamProtocolError, msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError)
_MISSHAPEN = (AttributeError, TypeError, LookupError)  # a lookup on a value of another type than the API's
log = logging.getLogger("gateway.providers")


class StreamHost(Protocol):
    """What the stream needs from its provider."""

    name: str

    def release(self) -> None: ...

    def sanitize(self, message: object) -> str: ...

    def unsecret(self, text: str) -> str: ...


class StreamTranslator(Protocol):
    """Per request: upstream SSE payloads in, typed events out."""

    def feed(self, payload: bytes) -> list[StreamEvent]:
        """The events for one payload; a `StreamDone` or `StreamError` ends the stream."""

    def end(self) -> list[StreamEvent]:
        """The upstream closed the stream: its last events (a `StreamError` if it stopped half-way)."""


class TranslatedStream:
    """A started SSE stream, as batches of typed events (see `schemas.events.EventSource`)."""

    __slots__ = ("_closed", "_deadline", "_idle_s", "_provider", "_response", "_timer", "_translator")

    def __init__(self, provider: StreamHost, response: aiohttp.ClientResponse, deadline: float, idle_s: float,
                 translator: StreamTranslator) -> None:
        self._provider = provider
        self._response = response
        self._deadline = deadline
        self._idle_s = idle_s
        self._translator = translator
        self._closed = False
        self._timer: ReadTimer | None = None

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    @property
    def usage_so_far(self) -> Usage | None:
        """The usage the upstream reported before its last event (Anthropic's `message_start`, Gemini's latest
        `usageMetadata`), for a stream that ends without its usage (an error, the client gone, a cut): the bill
        keeps its prompt figures (`pipeline.streams.StreamEnd.usage_so_far`)."""
        so_far: Usage | None = getattr(self._translator, "usage_so_far", None)
        return so_far

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._timer is not None:
                self._timer.stop()
            self._response.close()
            self._provider.release()

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        decoder = SSEDecoder()
        timer = self._timer = ReadTimer(self._response.content, self._deadline, self._idle_s)
        translator = self._translator
        try:
            while True:
                try:  # not `read()` nor `readany()`: no coroutine frames between the task and the wait
                    data = timer.ready()
                    while data is None:
                        await timer.wait()
                        timer.end()
                        data = timer.ready()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    yield [StreamError(transport_error(exc, self._provider.name, "mid-stream",
                                                       self._response.status))]  # (its head came: `at_work`)
                    return
                events: list[StreamEvent] = []
                try:
                    for payload in decoder.feed(data) if data else decoder.flush():
                        events += translator.feed(payload)
                        if events and isinstance(events[-1], (StreamDone, StreamError)):
                            break
                    else:
                        if not data:
                            events += translator.end()
                except _MALFORMED as exc:
                    what = str(exc) if isinstance(exc, StreamProtocolError) else "a malformed stream event"
                    events.append(StreamError(UpstreamError(f"upstream `{self._provider.name}` sent {what}")))
                except _MISSHAPEN:
                    log.debug("a stream event the translator could not read", exc_info=True)  # (a bug would show here)
                    events.append(StreamError(UpstreamError(f"upstream `{self._provider.name}` sent a malformed "
                                                            "stream event")))
                except GatewayError as exc:
                    events.append(StreamError(exc))
                if events:
                    yield events
                if not data or (events and isinstance(events[-1], (StreamDone, StreamError))):
                    return
        finally:
            await self.aclose()


class ResponsesEvents:
    """The Responses API's events, forwarded as they are; usage read from `response.completed`.

    An event whose `response` carries an `error` (`response.failed`) is forwarded with that error's
    strings scrubbed, and those beside it (`scrub`): the event is re-encoded only when one of them
    changes, so every other event, and a clean failure, keeps its bytes. An `error` event, any event
    with an `error` of its own (as chat-style servers write theirs), or one of `"object": "error"` (an
    error written flat: vLLM's), ends the stream with the scrubbed message. The response's last event
    (`response.completed` / `.incomplete` / `.failed`) ends the stream, as `message_stop` ends
    Anthropic's: what the upstream writes after it, or a connection it then holds open or drops, is
    never read (the client has its answer whole).

    Only an event of generated content, a `*.delta` (`response.output_text.delta`, `.refusal.delta`,
    `.function_call_arguments.delta`, `.reasoning_text.delta`, `.reasoning_summary_text.delta`, ...: about a
    token each, as a chat chunk), is a `Chunk` that counts (`Chunk.content`): a stream's length, which a budget's
    cut and the bill of a stream that ends without its usage follow, is theirs. The others (`response.created`,
    `.in_progress`, `.output_item.added`/`.done`, `.content_part.added`/`.done`, `.output_text.done`, the
    response's last event) carry no tokens of their own, only what the deltas carried, or nothing."""

    __slots__ = ("_provider",)

    def __init__(self, provider: StreamHost) -> None:
        self._provider = provider

    def feed(self, payload: bytes) -> list[StreamEvent]:
        if payload == b"[DONE]":  # (OpenAI sends none; a chat-style server may): before the response's end, a cut
            return self.end()
        if not payload.isascii() and not is_utf8(payload):  # forwarded as it is: it must be what charset=utf-8 says
            return [StreamError(UpstreamError(f"upstream `{self._provider.name}` sent invalid UTF-8"))]
        peek = _peek_event(payload)
        # (a top-level `error`: a chat-style server's error event; `"object": "error"`: one written flat, vLLM's)
        if peek.type == "error" or peek.error is not None or peek.object == "error":
            message = peek.message
            if message is None and isinstance(peek.error, dict):  # `{"type": "error", "error": {"message": ...}}`
                message = peek.error.get("message")
            elif message is None and isinstance(peek.error, str):  # `{"error": "..."}`
                message = peek.error
            base = f"upstream `{self._provider.name}` failed mid-stream"
            return [StreamError(with_detail(UpstreamError, base, self._provider.sanitize(message)))]
        response = peek.response
        if response is not None and response.error is not None:  # not null: the upstream's own error text
            payload = scrubbed_error(payload, self._provider.sanitize, self._provider.unsecret, "response")
        kind = peek.type
        if is_content_event(kind):  # generated content: about a token each (see the class's docstring)
            return [Chunk(payload)]
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            usage = responses_usage(response.usage) if response is not None else None
            last = Chunk(payload, None, None, False)
            return [last, UsageReport(usage), DONE] if usage is not None else [last, DONE]
        return [Chunk(payload, None, None, False)]

    def end(self) -> list[StreamEvent]:
        return [StreamError(UpstreamError(f"upstream `{self._provider.name}` ended the stream before the response "
                                          "completed"))]
