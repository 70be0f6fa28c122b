"""Answers of reasoning models and refusals, as OpenAI-compatible servers write them, for the mock upstream.

`fault-echo-reasoning`: the echoed text (the last user message) is the model's reasoning, and the answer
is `Done.`. A chat answer carries it as vLLM does, in `reasoning_content` and `reasoning` both, and as
OpenRouter does, in `reasoning_details` too; streamed, a piece per word in each, then the content. A
Responses answer carries it as a `reasoning` item's summary part (streamed: `response.reasoning_summary_*`
events) and as its content (`reasoning_text`, streamed: `response.reasoning_text.*`), then a message.

`fault-echo-refusal`: the echoed text is the refusal: a chat message's `refusal` (streamed: `delta.refusal`
pieces), or a Responses message's `refusal` part (streamed: `response.refusal.*` events).

Chat answers whose call carries the echoed text: `fault-object-arguments`, a tool call whose `arguments` are a
JSON object `{"text": ...}` (as some servers send them; streamed, the whole call in one delta);
`fault-custom-tool`, a custom tool call whose `input` is the text; `fault-legacy-call`, a legacy
`function_call` whose arguments are `{"text": ...}` (streamed: a piece per word of each).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

ANSWER = "Done."
KINDS = frozenset({"echo-reasoning", "echo-refusal", "object-arguments", "custom-tool", "legacy-call"})
_CALLS = frozenset({"object-arguments", "custom-tool", "legacy-call"})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def chat(kind: str, body: dict[str, Any], text: str, serial: int) -> dict[str, Any] | list[bytes]:
    """A chat answer, or its stream's events (with `[DONE]`)."""
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "system_fingerprint": "fp_mock"}
    usage = {"prompt_tokens": 5, "completion_tokens": len(text.split()) + 1, "total_tokens": len(text.split()) + 6}
    finish = "stop"
    if kind in _CALLS:
        return _calls(kind, body, text, base, usage)
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": ANSWER, "refusal": None}
        if kind == "echo-reasoning":
            message.update(reasoning_content=text, reasoning=text,
                           reasoning_details=[{"type": "reasoning.text", "text": text, "format": "unknown"}])
        else:
            message.update(content=None, refusal=text)
        return {**base, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}
    chunk = {**base, "object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], reason: str | None = None) -> bytes:
        return _sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})

    events = [event({"role": "assistant", "content": ""})]
    for piece in _pieces(text):
        if kind == "echo-reasoning":
            events.append(event({"content": None, "reasoning_content": piece, "reasoning": piece,
                                 "reasoning_details": [{"type": "reasoning.text", "text": piece}]}))
        else:
            events.append(event({"refusal": piece}))
    if kind == "echo-reasoning":
        events.append(event({"content": ANSWER}))
    events += [event({}, finish), _sse({**chunk, "choices": [], "usage": usage}), b"data: [DONE]\n\n"]
    return events


def _calls(kind: str, body: dict[str, Any], text: str, base: dict[str, Any], usage: dict[str, Any]
           ) -> dict[str, Any] | list[bytes]:
    """A chat answer whose call carries `text` (see the module's docstring), or its stream's events."""
    arguments = json.dumps({"text": text})
    call: dict[str, Any]
    if kind == "custom-tool":
        call = {"id": "call_custom", "type": "custom", "custom": {"name": "note", "input": text}}
    else:
        call = {"id": "call_object", "type": "function", "function": {"name": "note", "arguments": {"text": text}}}
    finish = "function_call" if kind == "legacy-call" else "tool_calls"
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if kind == "legacy-call":
            message["function_call"] = {"name": "note", "arguments": arguments}
        else:
            message["tool_calls"] = [call]
        return {**base, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}
    chunk = {**base, "object": "chat.completion.chunk"}

    def event(delta: dict[str, Any], reason: str | None = None) -> bytes:
        return _sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]})

    events = [event({"role": "assistant", "content": None})]
    if kind == "object-arguments":
        events.append(event({"tool_calls": [{"index": 0, **call}]}))
    elif kind == "custom-tool":
        events.append(event({"tool_calls": [{"index": 0, "id": call["id"], "type": "custom",
                                             "custom": {"name": "note", "input": ""}}]}))
        events += [event({"tool_calls": [{"index": 0, "custom": {"input": piece}}]}) for piece in _pieces(text)]
    else:
        events.append(event({"function_call": {"name": "note", "arguments": ""}}))
        events += [event({"function_call": {"arguments": piece}}) for piece in _pieces(arguments)]
    return [*events, event({}, finish), b"data: [DONE]\n\n"]


def responses(kind: str, body: dict[str, Any], text: str, serial: int) -> dict[str, Any] | list[bytes]:
    """A Responses answer, or its stream's events."""
    rid, reasoning_id, message_id = f"resp_mock{serial}", f"rs_mock{serial}", f"msg_mock{serial}"
    items: list[dict[str, Any]] = []
    if kind == "echo-reasoning":
        items.append({"id": reasoning_id, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}],
                      "content": [{"type": "reasoning_text", "text": text}]})
        items.append({"id": message_id, "type": "message", "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]})
    else:
        items.append({"id": message_id, "type": "message", "status": "completed", "role": "assistant",
                      "content": [{"type": "refusal", "refusal": text}]})
    response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": body.get("model"), "output": items, "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
                "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 9,
                          "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 14}}
    if not body.get("stream"):
        return response
    sequence = itertools.count()

    def event(name: str, **fields: Any) -> bytes:
        return f"event: {name}\n".encode() + _sse({"type": name, "sequence_number": next(sequence), **fields})

    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    events = [event("response.created", response=pending), event("response.in_progress", response=pending)]
    for index, item in enumerate(items):
        events += _item_events(event, index, item)
    return [*events, event("response.completed", response=response)]


def _item_events(event: Callable[..., bytes], index: int, item: dict[str, Any]) -> list[bytes]:
    """One output item's events, its texts a word at a time."""
    where = {"item_id": item["id"], "output_index": index}
    added = {**item, "summary": [], "content": []} if item["type"] == "reasoning" else {**item, "content": []}
    events = [event("response.output_item.added", output_index=index, item=added)]
    if item["type"] == "reasoning":
        for position, part in enumerate(item["summary"]):
            at = {**where, "summary_index": position}
            events.append(event("response.reasoning_summary_part.added", **at, part={**part, "text": ""}))
            events += [event("response.reasoning_summary_text.delta", **at, delta=piece)
                       for piece in _pieces(part["text"])]
            events.append(event("response.reasoning_summary_text.done", **at, text=part["text"]))
            events.append(event("response.reasoning_summary_part.done", **at, part=part))
        for position, part in enumerate(item["content"]):
            at = {**where, "content_index": position}
            events += [event("response.reasoning_text.delta", **at, delta=piece) for piece in _pieces(part["text"])]
            events.append(event("response.reasoning_text.done", **at, text=part["text"]))
    else:
        for position, part in enumerate(item["content"]):
            at = {**where, "content_index": position}
            key = "refusal" if part["type"] == "refusal" else "text"
            events.append(event("response.content_part.added", **at, part={**part, key: ""}))
            if key == "refusal":
                events += [event("response.refusal.delta", **at, delta=piece) for piece in _pieces(part[key])]
                events.append(event("response.refusal.done", **at, refusal=part[key]))
            else:
                events += [event("response.output_text.delta", **at, delta=piece, logprobs=[])
                           for piece in _pieces(part[key])]
                events.append(event("response.output_text.done", **at, text=part[key], logprobs=[]))
            events.append(event("response.content_part.done", **at, part=part))
    events.append(event("response.output_item.done", output_index=index, item=item))
    return events
