"""Canned payloads shared by the nginx upstream, the pass-through apps and the load generator.

Everything lives in one module so that the upstream's answer, the ceiling app's answer
and the request bodies wrk sends cannot drift apart between Part 1 (transport choice)
and Part 2 (gateway benchmark).
"""

from __future__ import annotations

import json
from typing import Any

#: Model names the benchmark policy maps to the non-streaming / streaming upstream.
JSON_MODEL = "bench-json"
SSE_MODEL = "bench-sse"

#: The model the benchmark policy maps to the canned Anthropic upstream (the translator's row).
ANTHROPIC_MODEL = "bench-anthropic"

#: Number of ``chat.completion.chunk`` events in the SSE answer (the last one carries usage).
SSE_CHUNKS = 20

_CREATED = 1732540000
_ID = "chatcmpl-BenchAbCdEfGhIjKlMnOpQrStUvWx"
_FINGERPRINT = "fp_0ba0d124f1"
_WORDS = (
    "Hello",
    "!",
    " How",
    " can",
    " I",
    " help",
    " you",
    " today",
    "?",
    " I",
    " am",
    " a",
    " benchmark",
    " upstream",
    " answering",
    " canned",
    " tokens",
)
_USAGE = {  # the same usage in the JSON answer and in the stream's final chunk
    "prompt_tokens": 9,
    "completion_tokens": len(_WORDS),
    "total_tokens": 9 + len(_WORDS),
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def _dumps(obj: Any) -> str:
    """Compact JSON like OpenAI sends it (no spaces, no trailing newline)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def request_body(stream: bool) -> bytes:
    """The client request wrk sends; ``"stream":true`` is written without spaces on purpose.

    The pass-through apps route on the literal bytes ``"stream":true`` instead of parsing
    JSON, so the spelling here is part of their contract.
    """
    body: dict[str, Any] = {
        "model": SSE_MODEL if stream else JSON_MODEL,
        "messages": [{"role": "user", "content": "Say hello"}],
    }
    if stream:
        body["stream"] = True
    return _dumps(body).encode()


def chat_completion() -> bytes:
    """A realistic non-streamed ``chat.completion`` object (about 700 bytes)."""
    content = "".join(_WORDS)
    obj = {
        "id": _ID,
        "object": "chat.completion",
        "created": _CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _USAGE,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
    }
    return _dumps(obj).encode()


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
    obj: dict[str, Any] = {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": choices,
        "usage": usage,
    }
    return "data: " + _dumps(obj) + "\n\n"


def sse_events(chunks: int = SSE_CHUNKS) -> list[bytes]:
    """``chunks`` ``chat.completion.chunk`` events (each ``data: ...\n\n``), as OpenAI sends them.

    Event 1 carries the role, events 2..chunks-2 one token each (the canned words, repeated
    as needed), event chunks-1 the finish_reason and the last one the usage (with
    ``choices: []``). ``data: [DONE]`` is not included (see :data:`SSE_DONE`).
    """
    if chunks < 3:
        raise ValueError("an SSE answer needs at least 3 chunks (role, finish, usage)")
    tokens = chunks - 3
    events = [
        _chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    ]
    for i in range(tokens):
        word = _WORDS[i % len(_WORDS)]
        events.append(_chunk([{"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}]))
    events.append(_chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    usage = dict(_USAGE, completion_tokens=tokens, total_tokens=9 + tokens)
    events.append(_chunk([], usage))
    assert len(events) == chunks
    return [event.encode() for event in events]


#: The end-of-stream marker that follows the last event.
SSE_DONE = b"data: [DONE]\n\n"


def sse_stream() -> bytes:
    """A 20-event ``chat.completion.chunk`` stream as OpenAI sends it with include_usage.

    Event 1 carries the role, events 2..18 one token each, event 19 the finish_reason and
    event 20 the usage (with ``choices: []``); then ``data: [DONE]``.
    """
    return b"".join(sse_events(SSE_CHUNKS)) + SSE_DONE


def request_body_for(mode: str) -> bytes:
    """The client request of a benchmark mode: ``json``, ``sse``, or ``anthropic`` (a chat stream whose
    alias routes to the canned Anthropic upstream, so the gateway translates every event)."""
    if mode == "anthropic":
        return request_body(stream=True).replace(SSE_MODEL.encode(), ANTHROPIC_MODEL.encode())
    return request_body(stream=mode == "sse")


def _anthropic_event(kind: str, fields: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {_dumps({'type': kind, **fields})}\n\n".encode()


def anthropic_stream(chunks: int = SSE_CHUNKS) -> bytes:
    """The same answer as :func:`sse_stream`, as Anthropic's Messages API streams it.

    message_start, content_block_start, ping, one ``text_delta`` per token (``chunks - 3``, as
    the OpenAI stream has), content_block_stop, message_delta (stop reason and usage),
    message_stop: the event sequence of Anthropic's streaming documentation.
    """
    tokens = chunks - 3
    message = {"id": "msg_01BenchAbCdEfGhIjKlMnOpQr", "type": "message", "role": "assistant", "content": [],
               "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 9, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                         "output_tokens": 1}}
    events = [
        _anthropic_event("message_start", {"message": message}),
        _anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        _anthropic_event("ping", {}),
    ]
    for i in range(tokens):
        delta = {"type": "text_delta", "text": _WORDS[i % len(_WORDS)]}
        events.append(_anthropic_event("content_block_delta", {"index": 0, "delta": delta}))
    events += [
        _anthropic_event("content_block_stop", {"index": 0}),
        _anthropic_event("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                           "usage": {"output_tokens": tokens}}),
        _anthropic_event("message_stop", {}),
    ]
    return b"".join(events)


def upstream_body(mode: str) -> bytes:
    """What the canned nginx upstream serves for a mode."""
    return {"json": chat_completion, "sse": sse_stream, "anthropic": anthropic_stream}[mode]()
