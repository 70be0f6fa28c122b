"""A hit, served in the form the client asked for.

A stored stream replays in its original chunking, its usage as the upstream sent
it (a usage-only chunk, forwarded when the client asked for usage, or on its last
content chunk). A stored complete answer streams as one content chunk per choice
and one closing chunk with its finish reason, then a usage-only chunk carrying
the body's own `usage` object (what OpenAI sends, shortened). The other way round,
a stored stream is assembled into the complete answer: texts and tool calls
joined per choice (as the SDKs join them), the usage object of the upstream's own
chunk at the end.

Anthropic's `reasoning_blocks` (`translate/thinking.py`) convert both ways: a
stream's entries, each with its `index`, are the complete message's list in
order (without it); the list streams in the one delta, each entry with its place
as `index`, given before the delta's `reasoning_content` by `/v1/messages`
(`translate/anthropic_answer.py`). An entry that came after a tool call
(`after_tool_calls`, interleaved thinking) does not stream from a complete answer:
the one delta would carry it before the calls.

A conversion is served only when it is exact: the stored answer must hold nothing
but what the other form carries as it is. Texts (`content`, `refusal`,
`reasoning_content`, `reasoning`) as strings, function tool calls with string
arguments, `reasoning_blocks` entries as objects, logprobs, finish reasons, the
answer's id, model, fingerprint and service tier, and the usage object whole. Anything else (a custom tool call, a
legacy `function_call`, content as a list of parts, arguments as a JSON object,
`reasoning_details`, `audio`, `annotations`, any field the gateway does not know)
that is not null or empty raises `Unconvertible`, and the stage serves the
request as a miss: the upstream's new answer then replaces the entry, in its own
form. A usage the gateway estimated (an upstream that sent none) is never
replayed as if the upstream had sent it; a client that asked for usage
(`stream_options.include_usage`) of a stream stored without usage for a client
that had not (its upstream perhaps not asked for it) is a miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ..schemas.endpoints import Endpoint
from ..schemas.events import DONE, Chunk, StreamEvent, UsageReport
from ..schemas.openai import Usage
from .assemble import (
    BLOCKS,
    CALL,
    CHAT_CHOICE,
    MESSAGE,
    TEXT_CHOICE,
    TEXTS,
    TOP,
    Unconvertible,
    assemble_body,
    chunk_base,
    encode,
    function_call,
    int_field,
    json_list,
    json_object,
    only,
    reported_usage,
    text_field,
)
from .entry import Entry

__all__ = ["ReplaySource", "Unconvertible", "assemble_body", "split_body"]


def split_body(body: bytes, endpoint: Endpoint) -> tuple[list[bytes], dict[str, Any]]:
    """A complete answer as stream chunks, and the fields every chunk carries. `Unconvertible` when a stream would
    not carry it exactly."""
    chunks, base, _ = _split(body, endpoint)
    return chunks, base


def _split(body: bytes, endpoint: Endpoint) -> tuple[list[bytes], dict[str, Any], bytes | None]:
    """`split_body`, and the usage chunk of the body's own usage object (None: the body has none). A value nested
    too deep to read or write here is `Unconvertible` too (see `assemble_body`)."""
    try:
        return _split_body(body, endpoint)
    except RecursionError:
        raise Unconvertible("nested too deep") from None


def _split_body(body: bytes, endpoint: Endpoint) -> tuple[list[bytes], dict[str, Any], bytes | None]:
    data = only(json_object(body), TOP)
    chat = endpoint is Endpoint.CHAT
    base = chunk_base(data, "chat.completion.chunk" if chat else "text_completion")
    chunks: list[bytes] = []
    for position, choice in enumerate(json_list(data.get("choices"))):
        only(choice, CHAT_CHOICE if chat else TEXT_CHOICE)
        index = int_field(choice, "index", position)
        logprobs = choice.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, dict):
            raise Unconvertible("logprobs")
        finish = text_field(choice, "finish_reason")
        if chat:
            first = {"index": index, "delta": _delta(choice.get("message")), "logprobs": logprobs,
                     "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}
        else:
            first = {"index": index, "text": text_field(choice, "text") or "", "logprobs": logprobs,
                     "finish_reason": None}
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": finish}
        chunks.append(encode({**base, "choices": [first]}))
        chunks.append(encode({**base, "choices": [last]}))
    usage = data.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise Unconvertible("usage")
    return chunks, base, None if usage is None else encode({**base, "choices": [], "usage": usage})


def _delta(message: Any) -> dict[str, Any]:
    """A complete message as the one delta that carries all of it."""
    message = only({} if message is None else message, MESSAGE)
    delta: dict[str, Any] = {"role": text_field(message, "role") or "assistant",
                             "content": text_field(message, "content")}
    for name in TEXTS[1:]:
        value = text_field(message, name)
        if value is not None:
            delta[name] = value
    calls = json_list(message.get("tool_calls"))
    if calls:
        delta["tool_calls"] = [{"index": i, **function_call(call, CALL)} for i, call in enumerate(calls)]
    entries = json_list(message.get(BLOCKS))
    if entries:
        delta[BLOCKS] = [_entry(entry, i) for i, entry in enumerate(entries)]
    return delta


def _entry(entry: Any, index: int) -> dict[str, Any]:
    """A `reasoning_blocks` entry as a stream has it: with its `index` (`translate/thinking.py`). One that came after
    a tool call (`after_tool_calls`) is `Unconvertible`: in the one delta it would come before the calls, and a
    `/v1/messages` stream would put its block before them."""
    if type(entry) is not dict or entry.get("after_tool_calls") is not None \
            or entry.get("index", index) not in (None, index):
        raise Unconvertible(BLOCKS)
    return {**entry, "index": index}


class ReplaySource:
    """An `EventSource` over a stored answer: one batch, as a fast upstream would send it. `Unconvertible` (from
    the constructor) when a stored complete answer would not stream exactly, or when the client asked for usage
    (`wants_usage`: `stream_options.include_usage`, not in the key) of a stream stored without usage for a client
    that had not (`usage_unasked`): its upstream may not have been asked (a provider's `stream_usage: false`), where
    this client's own `include_usage` would bring the usage live; the miss's answer replaces the entry. A stream
    stored for a client that asked, without usage, is what its upstream sends: replayed without it, as a complete
    answer without a usage object is (the gateway's estimate is never sent as the upstream's usage)."""

    __slots__ = ("_events",)

    def __init__(self, entry: Entry, endpoint: Endpoint, wants_usage: bool = False) -> None:
        usage: Usage | None
        if entry.kind == "stream":
            if wants_usage and entry.usage_unasked:
                raise Unconvertible("usage")
            payloads, usage_chunk, usage = entry.chunks, entry.usage_chunk, entry.usage
        else:
            payloads, base, usage_chunk = _split(entry.body, endpoint)
            usage = reported_usage(entry)  # an estimate for a body without usage is not replayed as the upstream's
            if usage_chunk is None and usage is not None:
                usage_chunk = encode({**base, "choices": [], "usage": usage})
            elif usage_chunk is not None and usage is None:
                usage = Usage()
        events: list[StreamEvent] = [Chunk(payload) for payload in payloads]
        if usage is not None:
            # no usage chunk: the usage rode on the last content chunk, already among the payloads
            events.append(UsageReport(usage, usage_chunk))
        events.append(DONE)
        self._events: list[StreamEvent] | None = events

    def events(self) -> list[StreamEvent]:
        """The one batch, before it is read (a dialect's check of the replay: `cache.stage`)."""
        return self._events or []

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        events, self._events = self._events, None
        if events is not None:
            yield events

    async def aclose(self) -> None:
        self._events = None
