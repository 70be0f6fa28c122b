"""The Responses API's stream framing at the HTTP edge (`POST /v1/responses`), as OpenAI frames it.

OpenAI writes every Responses event with its name, `event: <type>` before the
`data:` line, and sends no `[DONE]`: the stream ends after `response.completed`
(`.incomplete`, `.failed`). The chat framing (`sse.frame`) writes `data:` lines
only and ends with `[DONE]`; the openai SDK reads either, but a client that
listens by event name (a browser's `EventSource.addEventListener(
"response.output_text.delta", ...)`, most JS SSE libraries) received nothing.

The name is the event's JSON `type`, which is what OpenAI's `event:` line says
(the SSE decoder keeps payloads only, so an upstream's own line is not seen).
It is read from the payload's first bytes: OpenAI, the mock servers and the
gateway's own events (a guard's rewrites, `Chunk.of`) all write `type` first,
so the name costs a comparison and a `find`, not a decode; an event written
otherwise is decoded for it (a decode's cost grows with the event: about 1.5 µs
for a 4 KB `response.completed`, against 0.3 µs for the look at its first bytes).
The name is not carried from the provider (`ResponsesEvents`, which decodes the
type anyway) because an event has nowhere to carry it: a field on `Chunk` would
cost every chat chunk, and a subclass would miss the `type(e) is Chunk` paths;
and events the gateway builds (a guard's, a cache replay's) would need it too.
An event with no string `type` goes out as `data:` alone, an unnamed SSE event.

A failure after the stream started (an upstream cut, a timeout, a stage's error,
the drain deadline) is the Responses API's `error` event: `event: error`, data
`{"type": "error", "sequence_number": N, "error": {"type", "code", "message",
"param"}}`, as OpenAI sends it, numbered after the last event. Its top-level
`error` object is what the openai SDK raises `APIError` for, with the same
message and body as the chat framing's `data: {"error": ...}`. The usage report
adds nothing (the usage is in the final response's event), and a `StreamDone`
ends the stream with no bytes of its own.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..errors import GatewayError
from ..schemas.events import Chunk, StreamError, StreamEvent

__all__ = ["ResponsesFrames", "event_name"]

_encode = msgspec.json.Encoder().encode
_TYPE_TIGHT = b'{"type":"'  # msgspec's, OpenAI's encoding
_TYPE_SPACED = b'{"type": "'  # Python's `json.dumps`
_BACKSLASH = 92


class _TypePeek(msgspec.Struct):
    type: Any = None


class _SequencePeek(msgspec.Struct):
    sequence_number: Any = None


_peek_type = msgspec.json.Decoder(_TypePeek).decode
_peek_sequence = msgspec.json.Decoder(_SequencePeek).decode


def event_name(payload: bytes) -> bytes | None:
    """An event's SSE name: its JSON `type`; None when it has none (or one an `event:` line cannot carry)."""
    if payload[:9] == _TYPE_TIGHT:
        start = 9
    elif payload[:10] == _TYPE_SPACED:
        start = 10
    else:
        return _decoded_name(payload)
    end = payload.find(b'"', start)
    if end < 0:
        return _decoded_name(payload)
    name = payload[start:end]
    if _BACKSLASH in name or not name:  # an escape: the decoded string is the name
        return _decoded_name(payload)
    return name


def _decoded_name(payload: bytes) -> bytes | None:
    try:
        kind = _peek_type(payload).type
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not isinstance(kind, str) or not kind or "\n" in kind or "\r" in kind:
        return None
    return kind.encode()


class ResponsesFrames:
    """Per stream (`pipeline.dialect.StreamFramer`): typed events in, OpenAI's Responses SSE bytes out."""

    __slots__ = ("_framed", "_last")

    def __init__(self) -> None:
        self._framed = 0  # events written: the error event's number when the upstream numbers none
        self._last: Chunk | None = None  # the last event written: the error event is numbered after it

    def frame(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        last = None
        for event in events:
            if type(event) is Chunk:
                payload = event.payload
                name = event_name(payload)
                out.append(b"event: %b\ndata: %b\n\n" % (name, payload) if name is not None
                           else b"data: %b\n\n" % payload)
                last = event
            elif type(event) is StreamError:  # the stream's last event: numbered after the chunks before it
                if last is not None:
                    self._last = last
                    self._framed += len(out)
                    last = None
                out.append(self._error(event.error))
            # a `UsageReport`: its usage is in the final response's event; a `StreamDone`: no `[DONE]`
        if last is not None:
            self._last = last
            self._framed += len(out)
        return out[0] if len(out) == 1 else b"".join(out)

    def _error(self, error: GatewayError) -> bytes:
        body = {"type": "error", "sequence_number": self._next_number(),
                "error": {"type": error.type, "code": error.code, "message": error.message, "param": None}}
        return b"event: error\ndata: " + _encode(body) + b"\n\n"

    def _next_number(self) -> int:
        """One more than the last event's `sequence_number` (OpenAI's count from 0 up, one by one)."""
        if self._last is not None:
            try:
                number = _peek_sequence(self._last.payload).sequence_number
            except (msgspec.DecodeError, msgspec.ValidationError):
                number = None
            if type(number) is int:
                return number + 1
        return self._framed
