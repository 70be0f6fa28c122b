"""Quality signals for the Responses API (`/v1/responses`): the same checks as for chat, read from
a `response` object.

A Responses answer is not in `choices`: its text is in the `output_text` parts of its `message`
items, a refusal is a `refusal` part, tool calls are `function_call` items, and how it ended is
its `status` (with `incomplete_details.reason`). A stream's last event (`response.completed` or
`response.incomplete`) carries the whole `response`, so a stream is read once, at that event:
the deltas before it pass with one byte search each. What the request asked is in `text.format`
(a JSON object or a JSON schema, flat: `{"type": "json_schema", "schema": ...}`) and in `tools`
(`{"type": "function", "name": ..., "parameters": ...}`; the names of other types' too, and a stored
`prompt`'s tools are unknown). A `failed` response is not an answer and is not counted. A `function_call` item's
arguments count toward `max_text_bytes` as a chat call's do (`quality_reading.add_call`): past it, the answer's calls
are judged only by whether the request offered a tool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

from ..pipeline.streams import StreamEnd
from ..schemas.events import Chunk, StreamEvent
from .answers import Answer, Asked
from .quality_reading import add_call

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from .quality import QualitySignals

__all__ = ["ResponsesStreamQuality", "answer_of", "responses_asked"]


class _Part(msgspec.Struct):
    type: str = ""
    text: str | None = None


class _Item(msgspec.Struct):
    type: str = ""
    content: list[_Part] | None = None
    name: str | None = None
    arguments: str | None = None


class _Incomplete(msgspec.Struct):
    reason: str | None = None


class ResponsePeek(msgspec.Struct):
    """What the checks read of a `response` object (the rest is skipped, not decoded)."""

    status: str | None = None
    output: list[_Item] | None = None
    incomplete_details: _Incomplete | None = None


class _TerminalEvent(msgspec.Struct):
    type: str = ""
    response: ResponsePeek | None = None


decode_response = msgspec.json.Decoder(ResponsePeek).decode
_decode_event = msgspec.json.Decoder(_TerminalEvent).decode
# The events that carry the finished `response`. In an event's JSON these bytes can only be its type:
# inside a string value (a delta's text) the quotes would be escaped.
_TERMINAL = (b'"response.completed"', b'"response.incomplete"')
_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def answer_of(response: ResponsePeek, limit: int) -> Answer | None:
    """The answer as the checks read it; None for a response that failed (no answer to judge)."""
    if response.status not in ("completed", "incomplete"):
        return None
    answer = Answer()
    for item in response.output or ():
        if item.type == "message":
            for part in item.content or ():
                if part.type == "output_text" and part.text is not None:
                    answer.add_text(part.text, limit)
                elif part.type == "refusal":
                    answer.refusal = True
        elif item.type == "function_call":
            add_call(answer, len(answer.tool_calls), item.name, item.arguments or "", limit)
    if response.status == "incomplete":
        reason = response.incomplete_details.reason if response.incomplete_details is not None else None
        answer.finish_reasons.append(_INCOMPLETE_REASONS.get(reason or "", "other"))
    else:
        answer.finish_reasons.append("tool_calls" if answer.tool_calls else "stop")
    return answer


def responses_asked(request: dict[str, Any]) -> Asked:
    """`text.format` and the tools of a Responses request: the function tools' parameters, every tool's name (flat,
    whatever its type: `custom` too; built-in tools have none), and whether it offered any. A stored `prompt` may
    offer tools of its own: with one, a call of any name is taken as offered (only its arguments are checked)."""
    text = request.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    schema = fmt.get("schema") if isinstance(fmt, dict) else None
    tools: dict[str, Any] = {}
    names: set[str] = set()
    offered = request.get("tools")
    offered = offered if isinstance(offered, list) else []
    for tool in offered:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            names.add(tool["name"])
            if tool.get("type") == "function":
                tools[tool["name"]] = tool.get("parameters")
    prompted = request.get("prompt") is not None
    return Asked(kind if isinstance(kind, str) else None, schema, tools, None if prompted else frozenset(names),
                 bool(offered) or prompted)


class ResponsesStreamQuality:
    """A Responses stream's part of the quality stage: the finished `response` read from the last event."""

    __slots__ = ("answer", "stage")
    reads_events = True

    def __init__(self, stage: QualitySignals) -> None:
        self.stage = stage
        self.answer: Answer | None = None

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        for event in events:
            if type(event) is Chunk and any(marker in event.payload for marker in _TERMINAL):
                try:
                    terminal = _decode_event(event.payload)
                except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # (Recursion: nested too deep)
                    continue
                if terminal.response is not None:
                    self.answer = answer_of(terminal.response, self.stage.limit)
        return events

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        if end.outcome == "done" and self.answer is not None:
            self.stage.count(ctx, self.answer, responses_asked(ctx.body))
