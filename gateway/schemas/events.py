"""Typed stream events: what a provider's stream yields, and what stream stages transform.

A provider turns its upstream's wire format into these events; stages read or
rewrite them; the HTTP edge frames them as Server-Sent Events exactly once. So an
output guard can hold text back, accounting can read usage without re-parsing,
and a cache can store an answer as events, while a stream that no stage reads
passes its raw bytes straight through (a `Chunk` is decoded only when asked).

Events travel in batches (`list[StreamEvent]`): one batch per network read, so
that a fast upstream's twenty events cost one trip through the stages and one
write to the client, not twenty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

from ..errors import GatewayError
from .openai import ChoicePeek, Usage

__all__ = ["DONE", "ChoicesReader", "Chunk", "EventSource", "StreamDone", "StreamError", "StreamEvent", "UsageReport",
           "begins_another_call", "is_content_event"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode


def is_content_event(kind: object) -> bool:
    """Whether a Responses stream event of this `type` carries generated content (`Chunk.content`): its `*.delta`
    events (`response.output_text.delta`, `.function_call_arguments.delta`, ...), about a token each."""
    return isinstance(kind, str) and kind.endswith(".delta")


class Chunk(msgspec.Struct, gc=False, eq=False):
    """One content event in OpenAI's chunk shape: its JSON bytes, decoded on demand, at most once.

    `Chunk(payload, data=None, choices=None, content=True)`, positionally. A struct, not a class with
    `__init__`: one is made for every event forwarded, and a Python `__init__` cost about 1,200 instructions
    more a chunk (CPython 3.11). Compared by identity, as a plain object; untracked by the garbage collector (its
    decoded JSON holds no cycles)."""

    payload: bytes
    _data: dict[str, Any] | None = None
    # The typed view of its choices, when the provider decoded them anyway (`Call.read_choices`).
    choices: list[ChoicePeek] | None = None
    # Whether the event carries generated content (about a token): False for the Responses API's events that carry
    # none (`response.created`, `.output_item.added`, `.completed`, ...: `ResponsesEvents`), which a stream's length
    # does not count (`pipeline.streams`). A chat stream's count never reads it (a budget's cut does, only past the
    # stream's reservation); a default field costs a chunk's construction about 3 ns.
    content: bool = True

    @classmethod
    def of(cls, data: dict[str, Any]) -> Chunk:
        """A chunk built by the gateway (a translator, a guard, a cache replay)."""
        return cls(_encode(data), data)

    def data(self) -> dict[str, Any]:
        """The decoded chunk. Stages that change it must build a new `Chunk.of(...)`."""
        if self._data is None:
            self._data = _decode(self.payload)
        return self._data

    def __repr__(self) -> str:
        return f"Chunk({len(self.payload)} bytes)"


class UsageReport:
    """Token usage for the whole answer. `payload` is the upstream's usage-only chunk, if any:
    the edge forwards it only to a client that asked for usage (`stream_options.include_usage`)."""

    __slots__ = ("payload", "usage")

    def __init__(self, usage: Usage, payload: bytes | None = None) -> None:
        self.usage = usage
        self.payload = payload


class StreamError:
    """The stream failed after it started: the last event; the edge writes an error event."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


class StreamDone:
    """The upstream finished cleanly (OpenAI's `[DONE]`): the last event."""

    __slots__ = ()


DONE = StreamDone()
StreamEvent = Chunk | UsageReport | StreamError | StreamDone


class ChoicesReader(Protocol):
    """A stage's reader of a stream's choices (the quality signals'), handed to a source that decodes them anyway
    (`ReplyStream.read_choices`): the source then calls it as it decodes each chunk, and its chunk events carry
    no typed choices. Never raises (a reader that fails stops reading by itself)."""

    def take(self, choices: list[ChoicePeek]) -> bool:
        """One chunk's choices, typed; whether every chunk's are still wanted. Once False, only the chunks that
        carry more than text come here (a finish reason, tool calls, a refusal): `ChunkTextOnlyPeek`."""
        ...

    def take_payload(self, payload: bytes) -> None:
        """A chunk whose choices do not fit the typed form (`"content": 5`), or that the source did not type (read
        before the reader came, after the first text: `OpenAIStream`), as its JSON."""
        ...

    def skim(self, last: Callable[[], list[ChoicePeek] | None]) -> bool:
        """Asked once `take` said False: whether the reader now needs no chunk at all as it passes, only the
        stream's last chunk with choices at its end, `last()` (typed; None: none, or not of the typed form). The
        source then decodes the later chunks as it does when no stage reads them (the common stream's reader,
        whose request can get nothing but text between its first text and its finish: `PlainStreamQuality`)."""
        ...


class EventSource(Protocol):
    """A started provider stream: the upstream accepted it (its headers said 200).

    Iterating yields batches of events as they arrive, ending with a `StreamDone`
    or a `StreamError` (never an exception: the client already has its 200).
    `aclose` releases the upstream connection; safe to call twice, and before the
    first batch.
    """

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]: ...

    async def aclose(self) -> None: ...


def begins_another_call(piece: dict[str, Any], held_id: Any) -> bool:
    """Whether a streamed tool call delta at an index that holds a call (named `held_id`) begins another call there:
    it names itself, another id than the held call's, and its tool (a call's first piece does). Ollama 0.20 streams
    each of its parallel calls whole at `index: 0`, each with its own id; but some servers give the later pieces of
    one call another id than its first (Poolside's API; mlx-openai-server before its PR 216 a new one each piece),
    without the name: those pieces go on the held call."""
    named = piece.get("id")
    if not named or not held_id or named == held_id:
        return False
    tool = piece.get("function") or piece.get("custom")
    return isinstance(tool, dict) and bool(tool.get("name"))
