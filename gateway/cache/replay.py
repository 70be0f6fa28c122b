"""A hit, served in the form the client asked for.

A stored stream replays in its original chunking; a stored complete answer
streams as one content chunk per choice and one closing chunk with its finish
reason (what OpenAI sends, shortened). The other way round, a stored stream is
assembled into the complete answer OpenAI would have sent: contents and tool
calls joined per choice, the usage at the end. A usage chunk is added when the
client asked for one (`stream_options.include_usage`), as the edge decides.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ..schemas.endpoints import Endpoint
from ..schemas.events import DONE, Chunk, StreamEvent, UsageReport
from .entry import Entry

__all__ = ["ReplaySource", "assemble_body", "split_body"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
_BASE_FIELDS = ("id", "created", "model", "system_fingerprint")


def _base(data: dict[str, Any], obj: str) -> dict[str, Any]:
    base = {name: data[name] for name in _BASE_FIELDS if name in data}
    return {"id": base.pop("id", "cached"), "object": obj, **base}


def split_body(body: bytes, endpoint: Endpoint) -> tuple[list[bytes], dict[str, Any]]:
    """A complete answer as stream chunks, and the fields every chunk carries (for a usage chunk)."""
    data = _decode(body)
    chat = endpoint is Endpoint.CHAT
    base = _base(data, "chat.completion.chunk" if chat else "text_completion")
    chunks: list[bytes] = []
    for position, choice in enumerate(data.get("choices") or ()):
        index = choice.get("index", position)
        if chat:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"role": message.get("role") or "assistant", "content": message.get("content")}
            if message.get("refusal") is not None:
                delta["refusal"] = message["refusal"]
            calls = message.get("tool_calls")
            if isinstance(calls, list) and calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls) if isinstance(call, dict)]
            first = {"index": index, "delta": delta, "logprobs": choice.get("logprobs"), "finish_reason": None}
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        else:
            first = {"index": index, "text": choice.get("text") or "", "logprobs": choice.get("logprobs"),
                     "finish_reason": None}
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")}
        chunks.append(_encode({**base, "choices": [first]}))
        chunks.append(_encode({**base, "choices": [last]}))
    return chunks, base


def assemble_body(entry: Entry, endpoint: Endpoint) -> bytes:
    """A stored stream as the complete answer a non-streamed request would have got."""
    chat = endpoint is Endpoint.CHAT
    choices: dict[int, dict[str, Any]] = {}
    head: dict[str, Any] | None = None
    for payload in entry.chunks:
        data = _decode(payload)
        if head is None:
            head = data
        for choice in data.get("choices") or ():
            if isinstance(choice, dict):
                _merge(choices, choice, chat)
    base = _base(head or {}, "chat.completion" if chat else "text_completion")
    body: dict[str, Any] = {**base, "choices": [_finish(choices[i], chat) for i in sorted(choices)]}
    if entry.usage is not None:
        body["usage"] = entry.usage
    return _encode(body)


def _merge(choices: dict[int, dict[str, Any]], choice: dict[str, Any], chat: bool) -> None:
    index = choice.get("index", 0) if isinstance(choice.get("index", 0), int) else 0
    slot = choices.setdefault(index, {"index": index, "role": "assistant", "content": [], "refusal": [],
                                      "calls": {}, "finish_reason": None, "logprobs": None})
    if choice.get("finish_reason") is not None:
        slot["finish_reason"] = choice["finish_reason"]
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):  # each chunk's lists, joined in order (chat: `content`, `refusal`; completions:
        joined = slot["logprobs"] = slot["logprobs"] or {}  # `tokens`, `token_logprobs`, `top_logprobs`...)
        for name, values in logprobs.items():
            if isinstance(values, list):
                joined.setdefault(name, []).extend(values)
    if not chat:
        if isinstance(choice.get("text"), str):
            slot["content"].append(choice["text"])
        return
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return
    if isinstance(delta.get("role"), str):
        slot["role"] = delta["role"]
    for name in ("content", "refusal"):
        if isinstance(delta.get(name), str):
            slot[name].append(delta[name])
    for call in delta.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        entry = slot["calls"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                  "function": {"name": "", "arguments": ""}})
        if call.get("id"):
            entry["id"] = call["id"]
        function = call.get("function")
        if isinstance(function, dict):
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str):
                    entry["function"][name] += function[name]


def _finish(slot: dict[str, Any], chat: bool) -> dict[str, Any]:
    text = "".join(slot["content"])
    logprobs = slot["logprobs"]
    if not chat:
        return {"index": slot["index"], "text": text, "logprobs": logprobs, "finish_reason": slot["finish_reason"]}
    # No content at all: null beside tool calls or a refusal, as the upstream's complete answer has it.
    content = text if slot["content"] or not (slot["calls"] or slot["refusal"]) else None
    message: dict[str, Any] = {"role": slot["role"], "content": content,
                               "refusal": "".join(slot["refusal"]) if slot["refusal"] else None}
    if slot["calls"]:
        message["tool_calls"] = [slot["calls"][i] for i in sorted(slot["calls"])]
    return {"index": slot["index"], "message": message, "logprobs": logprobs, "finish_reason": slot["finish_reason"]}


class ReplaySource:
    """An `EventSource` over a stored answer: one batch, as a fast upstream would send it."""

    __slots__ = ("_events",)

    def __init__(self, entry: Entry, endpoint: Endpoint) -> None:
        if entry.kind == "stream":
            payloads = entry.chunks
            base = _base(_decode(payloads[0]), "chat.completion.chunk" if endpoint is Endpoint.CHAT
                         else "text_completion") if payloads else {}
        else:
            payloads, base = split_body(entry.body, endpoint)
        events: list[StreamEvent] = [Chunk(payload) for payload in payloads]
        if entry.usage is not None:
            usage_chunk = entry.usage_chunk or _encode({**base, "choices": [], "usage": entry.usage})
            events.append(UsageReport(entry.usage, usage_chunk))
        events.append(DONE)
        self._events: list[StreamEvent] | None = events

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        events, self._events = self._events, None
        if events is not None:
            yield events

    async def aclose(self) -> None:
        self._events = None
