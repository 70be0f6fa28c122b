"""A mock OpenAI-compatible upstream model server with fault injection.

The gateway's end-to-end tests need an upstream that speaks OpenAI's real wire
format (JSON bodies and server-sent events) and that misbehaves on demand.  The
server runs on its own event loop in a background thread, so synchronous tests
can drive it with ordinary HTTP clients while it records what it received.

Faults are chosen by the request's ``model`` field (see ``parse_fault``): it is
the one value a gateway forwards after mapping an alias, so a test selects a
failure just by picking an alias that maps to, say, ``fault-status-429``.

Routing tests need an upstream whose behaviour changes while the gateway's policy
stays put: set ``override`` to a fault name (``mock.override = "fault-status-500"``)
and every request misbehaves so until it is set back to None. ``retry-after-<s>``
is a 429 with that Retry-After, ``context-length`` a 400 context window overflow,
``error-first`` a stream that answers 200 and then an error event before any content.

Odd but real answers: ``retry-after-raw-<hex>`` a 429 whose Retry-After is any text
(the UTF-8 bytes in hex: ``fault-retry-after-raw-c2b2`` sends "²"), ``redirect-<status>``
a redirect to ``/v1/redirected`` on this server (recorded if anyone follows it),
``split-context-length`` the 400 context window overflow written in two pieces,
``error-trickle-<ms>`` a 500 whose body comes one byte every <ms> milliseconds,
``empty-stream`` a 200 event stream that ends without any event, ``end-after-<n>``
a stream whose body ends cleanly after the role chunk and <n> content chunks (no
finish reason, no [DONE]), ``no-done`` a whole stream without its [DONE].

Chat answers other servers send (``_odd_chat_answer``): ``interleaved-tools`` two tool
calls whose streamed pieces alternate (call 0, 1, 0, 1), ``odd-arguments`` two tool
calls whose arguments are invalid JSON and a JSON array, ``content-parts`` the text
as a list of text parts, ``usage-riding`` the usage (with cached tokens) on the
stream's last content chunk instead of a usage-only chunk. ``echo-reasoning`` and
``echo-refusal``: the echoed text as a reasoning model's reasoning, or as a refusal
(chat and Responses, whole or streamed: ``mock_reasoning.py``).

Run ``python -m tests.support.mock_upstream --port 9999`` to try it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn

from aiohttp import web

from . import mock_reasoning

STALL_SECONDS = 60.0
POLL_SECONDS = 0.05
REASONING_PACE_S = 0.01  # between the events of a streamed reasoning answer or refusal: each its own read
SLOW_STREAM_CHUNKS = 50
PARTIAL_BODY_BYTES = 10
DEFAULT_DIMENSIONS = 8
MODEL_IDS = ("mock-model", "gpt-4o-mini", "text-embedding-3-small")
MODEL_CREATED = 1_700_000_000
# Deliberately leaks an internal address and a key: a gateway must scrub these.
LEAKY_DETAIL = "upstream at http://10.0.0.5:8080/internal rejected key sk-upstream-test"
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "choices": ['
MALFORMED_EVENT = b"data: {not json}\n\n"
SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class RecordedRequest:
    """One request as the mock received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    model: str | None
    query: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Fault:
    """A misbehaviour requested through the model name, e.g. ``fault-stall-after-3``."""

    kind: str
    value: int = 0
    text: str = ""  # ``retry-after-raw``: the header's value


_FAULT_RE = re.compile(
    r"fault-(status|slow-first-byte|stall-after|reset-after|slow-stream|huge-body|retry-after|redirect|end-after"
    r"|error-trickle)-(\d+)"
    r"|fault-(reset-before|malformed-json|no-usage|echo-secrets|echo-secrets-midstream|context-length"
    r"|error-first|echo|echo-tool|content-filter|out-of-order|overloaded-midstream|safety|prompt-blocked|cached-reasoning"
    r"|split-context-length|empty-stream|no-done|interleaved-tools|odd-arguments|content-parts|usage-riding"
    r"|echo-reasoning|echo-refusal|object-arguments|custom-tool|legacy-call)"
    r"|fault-retry-after-raw-((?:[0-9a-f]{2})+)"
)
# What a careless upstream echoes in its errors: internal host names, IPv6, and the very
# credential it was sent, without its `Bearer` (filled in per request).
ECHO_DETAIL = ("Incorrect API key provided: {key}. Backends vllm-0.vllm-headless:8000, vllm-gpu-7:8000, "
               "gpu-worker-17.prod.example.com and fd00::1:8000 refused it.")


def parse_fault(model: Any) -> Fault | None:
    """Return the fault named by ``model``, or None for a well-behaved answer."""
    match = _FAULT_RE.fullmatch(model) if isinstance(model, str) else None
    if match is None:
        return None
    if match.group(4):
        return Fault("retry-after-raw", text=bytes.fromhex(match.group(4)).decode("utf-8", "replace"))
    if match.group(3):
        return Fault(match.group(3))
    return Fault(match.group(1), int(match.group(2)))


class RequestError(Exception):
    """A request the real API would reject with 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SseAnswer:
    """Encoded SSE events; ``first_content`` indexes the first content event,
    which is where "after <n> chunks" faults start counting."""

    events: list[bytes]
    first_content: int


# ---------------------------------------------------------------- wire format


def error_response(
    status: int, message: str, type_: str, code: str | None,
    param: str | None = None, headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def status_fault_response(status: int) -> web.Response:
    """The error a real upstream would send for ``status``, plus leaky details."""
    message = f"Mock upstream failure {status}: {LEAKY_DETAIL}"
    if status == 429:
        return error_response(status, message, "rate_limit_exceeded",
                              "rate_limit_exceeded", headers={"Retry-After": "7"})
    if status == 401:
        return error_response(status, message, "invalid_request_error", "invalid_api_key")
    if status == 404:
        return error_response(status, message, "invalid_request_error", "model_not_found")
    if status >= 500:
        return error_response(status, message, "server_error", None)
    if status == 400:  # as OpenAI names what it refused
        return error_response(status, message, "invalid_request_error", "invalid_value", param="temperature")
    return error_response(status, message, "invalid_request_error", None)


def auth_error_response(authorization: str) -> web.Response:
    key = authorization.removeprefix("Bearer ").strip()
    if not key:
        message = "You didn't provide an API key."
    else:  # mask like OpenAI does, so the mock itself never echoes a key
        message = f"Incorrect API key provided: {key[:3]}***{key[-4:]}."
    return error_response(401, message, "invalid_request_error", "invalid_api_key")


def bad_json_response() -> web.Response:
    return error_response(
        400, "We could not parse the JSON body of your request. The API expects a "
        "JSON object as the request body.", "invalid_request_error", None)


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def count_words(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def chat_prompt_tokens(messages: Any) -> int:
    """Deterministic stand-in for a tokenizer: words in text content + 3 per message."""
    total = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            total += sum(count_words(part.get("text")) for part in content
                         if isinstance(part, dict) and part.get("type") == "text")
        else:
            total += count_words(content)
        total += 3
    return total


def prompt_inputs(value: Any, param: str) -> list[tuple[str, int]]:
    """Normalise a completions prompt / embeddings input to (text, tokens) pairs.

    Accepts a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(value, str):
        return [(value, count_words(value))]
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return [(" ".join(map(str, value)), len(value))]
    if isinstance(value, list) and value:
        items = [prompt_inputs(v, param) for v in value if isinstance(v, (str, list))]
        if len(items) == len(value) and all(len(i) == 1 for i in items):
            return [i[0] for i in items]
    raise RequestError(f"'{param}' must be a string, a list of strings or token lists", param)


CACHED_SHARE = 2  # fault-cached-reasoning: half the prompt tokens were read from the prompt cache
REASONING_TOKENS = 8  # fault-cached-reasoning: of the completion tokens, this many were reasoning


def chat_usage(prompt: int, completion: int, details: bool = False) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": prompt // CACHED_SHARE if details else 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": min(REASONING_TOKENS, completion) if details else 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }


# Azure OpenAI's error for a prompt its content filter rejects (HTTP 400).
AZURE_CONTENT_FILTER = {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
        "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": True, "severity": "high"}}},
}


def responses_answer(body: dict[str, Any], words: list[str], serial: int,
                     tool: bool = False) -> dict[str, Any] | SseAnswer:
    """The Responses API: a `response` object, or its event stream (`event:` lines, no `[DONE]`).
    `tool` (`fault-echo-tool`): one `function_call` item whose arguments are `{"text": <the text>}`."""
    text, pieces = _joined(body, words)
    prompt = body.get("input")
    prompt_tokens = count_words(prompt) if isinstance(prompt, str) else chat_prompt_tokens(prompt)
    details = parse_fault(body.get("model")) == Fault("cached-reasoning")
    usage = {"input_tokens": prompt_tokens,
             "input_tokens_details": {"cached_tokens": prompt_tokens // CACHED_SHARE if details else 0},
             "output_tokens": len(words),
             "output_tokens_details": {"reasoning_tokens": min(REASONING_TOKENS, len(words)) if details else 0},
             "total_tokens": prompt_tokens + len(words)}
    rid, mid = f"resp_mock{serial}", f"msg_mock{serial}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item: dict[str, Any] = {"id": mid, "type": "message", "status": "completed", "role": "assistant",
                            "content": [part]}
    arguments = json.dumps({"text": text})
    if tool:
        item = {"id": f"fc_mock{serial}", "type": "function_call", "status": "completed", "call_id": "call_mock",
                "name": "echo", "arguments": arguments}
    response = {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
                "model": body.get("model"), "output": [item], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": usage, "error": None, "incomplete_details": None, "instructions": None,
                "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}}
    if not body.get("stream"):
        return response
    pending = {**response, "status": "in_progress", "output": [], "usage": None}
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return (f"event: {kind}\n".encode()
                + sse({"type": kind, "sequence_number": next(sequence), **fields}))

    if tool:
        size = body.get("echo_chunk") if type(body.get("echo_chunk")) is int else 5
        fid = item["id"]
        opening = [event("response.created", response=pending), event("response.in_progress", response=pending),
                   event("response.output_item.added", output_index=0,
                         item={**item, "status": "in_progress", "arguments": ""})]
        deltas = [event("response.function_call_arguments.delta", item_id=fid, output_index=0,
                        delta=arguments[i:i + size]) for i in range(0, len(arguments), size)]
        closing = [event("response.function_call_arguments.done", item_id=fid, output_index=0, arguments=arguments),
                   event("response.output_item.done", output_index=0, item=item),
                   event("response.completed", response=response)]
        return SseAnswer(opening + deltas + closing, len(opening))
    opening = [event("response.created", response=pending), event("response.in_progress", response=pending),
               event("response.output_item.added", output_index=0,
                     item={**item, "status": "in_progress", "content": []}),
               event("response.content_part.added", item_id=mid, output_index=0, content_index=0,
                     part={**part, "text": ""})]
    deltas = [event("response.output_text.delta", item_id=mid, output_index=0, content_index=0, delta=piece,
                    logprobs=[]) for piece in pieces]
    closing = [event("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text,
                     logprobs=[]),
               event("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=part),
               event("response.output_item.done", output_index=0, item=item),
               event("response.completed", response=response)]
    return SseAnswer(opening + deltas + closing, len(opening))


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """Deterministic pseudo-embedding in [-1, 1), rounded to float32 so that the
    float and base64 encodings carry exactly the same numbers."""
    raw = b"".join(hashlib.sha256(f"{block}:{text}".encode()).digest()
                   for block in range((dimensions * 4 + 31) // 32))
    values = [n / 2**31 - 1.0 for n in struct.unpack(f"<{dimensions}I", raw[:dimensions * 4])]
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *values)))


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if type(n) is int and n > 1 else 1


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _streamed(base: dict[str, Any], n: int, pieces: list[dict[str, Any]], final: dict[str, Any],
              usage: dict[str, Any] | None, first: dict[str, Any] | None = None) -> SseAnswer:
    """Encode an OpenAI stream: optional opening choice, one event per piece and
    choice index, a finishing event per choice, the usage event, then [DONE]."""
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return sse({**base, "choices": choices, **({"usage": None} if usage else {}), **extra})

    opening = [event([{"index": i, **first}]) for i in range(n)] if first else []
    body = [event([{"index": i, **piece}]) for piece in pieces for i in range(n)]
    closing = [event([{"index": i, **final}]) for i in range(n)]
    tail = [event([], usage=usage)] if usage else []
    return SseAnswer(opening + body + closing + tail + [SSE_DONE], len(opening))


def _joined(body: dict[str, Any], words: list[str]) -> tuple[str, list[str]]:
    """The answer's text and its streamed pieces: words joined by spaces, or (`echo_chunk`) exact pieces."""
    if type(body.get("echo_chunk")) is int:
        return "".join(words), words
    return " ".join(words), [w if pos == 0 else " " + w for pos, w in enumerate(words)]


def chat_answer(body: dict[str, Any], words: list[str], serial: int) -> dict[str, Any] | SseAnswer:
    n = _choice_count(body)
    text, parts = _joined(body, words)
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or "mock-model", "system_fingerprint": "fp_mock"}
    usage = chat_usage(chat_prompt_tokens(body.get("messages")), len(words) * n,
                       details=parse_fault(body.get("model")) == Fault("cached-reasoning"))
    if not body.get("stream"):
        message = {"role": "assistant", "content": text, "refusal": None}
        choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": "stop"}
                   for i in range(n)]
        return {**base, "choices": choices, "usage": usage}
    pieces = [{"delta": {"content": w}, "logprobs": None, "finish_reason": None} for w in parts]
    first = {"delta": {"role": "assistant", "content": "", "refusal": None},
             "logprobs": None, "finish_reason": None}
    final = {"delta": {}, "logprobs": None, "finish_reason": "stop"}
    return _streamed({**base, "object": "chat.completion.chunk"}, n, pieces, final,
                     usage if _include_usage(body) else None, first)


def completion_answer(body: dict[str, Any], words: list[str], serial: int) -> dict[str, Any] | SseAnswer:
    n = _choice_count(body)
    prompts = body.get("prompt")
    if isinstance(prompts, list) and prompts and not isinstance(prompts[0], int):
        n *= len(prompts)  # as OpenAI answers: `n` choices for each prompt listed
    text, parts = _joined(body, words)
    prompt = sum(tokens for _, tokens in prompt_inputs(body.get("prompt", ""), "prompt"))
    base = {"id": f"cmpl-mock-{serial}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model") or "mock-model", "system_fingerprint": "fp_mock"}
    completion = len(words) * n
    usage = {"prompt_tokens": prompt, "completion_tokens": completion,
             "total_tokens": prompt + completion}
    if not body.get("stream"):
        choices = [{"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
                   for i in range(n)]
        return {**base, "choices": choices, "usage": usage}
    pieces = [{"text": w, "logprobs": None, "finish_reason": None} for w in parts]
    final = {"text": "", "logprobs": None, "finish_reason": "stop"}
    return _streamed(base, n, pieces, final, usage if _include_usage(body) else None)


def embeddings_answer(body: dict[str, Any], words: list[str], serial: int) -> dict[str, Any]:
    inputs = prompt_inputs(body.get("input"), "input")
    dimensions = body.get("dimensions")
    dimensions = dimensions if type(dimensions) is int and dimensions > 0 else DEFAULT_DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, (text, _) in enumerate(inputs):
        vector: Any = embedding_vector(text, dimensions)
        if as_base64:
            vector = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(t for _, t in inputs)
    return {"object": "list", "data": data, "model": body.get("model") or "mock-model",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# ---------------------------------------------------------------- delivery

_RECORD = web.RequestKey("mock_record", RecordedRequest)
_RESPONSE = web.RequestKey("mock_response", web.StreamResponse)
_ABORTED = web.RequestKey("mock_aborted", bool)
_GONE = web.RequestKey("mock_gone", bool)
Builder = Callable[[dict[str, Any], list[str], int], "dict[str, Any] | SseAnswer"]


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.BaseRequest, seconds: float) -> None:
    """Sleep, but notice a vanished client within POLL_SECONDS (raises then)."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        if _client_gone(request):
            raise ConnectionResetError("client went away")
        await asyncio.sleep(min(POLL_SECONDS, remaining))


def _abort(request: web.BaseRequest) -> NoReturn:
    """Reset the TCP connection (SO_LINGER 0 makes close() send an RST)."""
    request[_ABORTED] = True
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise ConnectionResetError("mock upstream reset the connection")


async def _send(request: web.BaseRequest, resp: web.Response) -> web.Response:
    """Write a whole response inside the handler, so a failed write is seen there."""
    request[_RESPONSE] = resp
    await resp.prepare(request)
    await resp.write_eof()
    return resp


async def _before_first_byte(request: web.BaseRequest, fault: Fault | None) -> None:
    if fault and fault.kind == "slow-first-byte":
        await _pause(request, fault.value / 1000)
    elif fault and fault.kind == "reset-before":
        _abort(request)


async def _deliver_json(request: web.BaseRequest, payload: dict[str, Any],
                        fault: Fault | None) -> web.StreamResponse:
    await _before_first_byte(request, fault)
    kind, value = (fault.kind, fault.value) if fault else (None, 0)
    if kind == "slow-stream":
        await _pause(request, SLOW_STREAM_CHUNKS * value / 1000)
    if kind == "malformed-json":
        return await _send(request, web.Response(body=MALFORMED_BODY, content_type="application/json"))
    if kind not in ("stall-after", "reset-after"):
        return await _send(request, web.json_response(payload))
    # Announce the full length, send a few bytes, then stall or reset.
    body = json.dumps(payload).encode()
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    request[_RESPONSE] = resp
    await resp.prepare(request)
    await resp.write(body[:PARTIAL_BODY_BYTES])
    if kind == "reset-after":
        await asyncio.sleep(POLL_SECONDS)  # let the partial body leave before the RST
        _abort(request)
    await _pause(request, STALL_SECONDS)
    await resp.write(body[PARTIAL_BODY_BYTES:])
    await resp.write_eof()
    return resp


async def _deliver_error_slowly(request: web.BaseRequest, fault: Fault) -> web.StreamResponse:
    """An error answer whose body comes in pieces: `split-context-length` (a 400 in two writes, 0.2 s apart),
    `error-trickle-<ms>` (a 500, one byte every <ms> milliseconds)."""
    if fault.kind == "split-context-length":
        status, pieces, gap = 400, 2, 0.2
        error = {"message": "This model's maximum context length is 128 tokens. However, your messages resulted "
                 "in 4000 tokens.", "type": "invalid_request_error", "param": "messages",
                 "code": "context_length_exceeded"}
    else:
        status, pieces, gap = 500, 0, fault.value / 1000
        error = {"message": "The server had an error while processing your request", "type": "server_error",
                 "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    size = -(-len(body) // pieces) if pieces else 1
    resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
    resp.content_length = len(body)
    request[_RESPONSE] = resp
    await resp.prepare(request)
    for start in range(0, len(body), size):
        if start or fault.kind == "error-trickle":  # a trickle's first byte is late too
            await _pause(request, gap)
        await resp.write(body[start:start + size])
    await resp.write_eof()
    return resp


async def _deliver_stream(request: web.BaseRequest, answer: SseAnswer,
                          fault: Fault | None, pace: float = 0.0) -> web.StreamResponse:
    """The answer's events, one write each, `pace` seconds apart (else as a fault says)."""
    await _before_first_byte(request, fault)
    kind, value = (fault.kind, fault.value) if fault else (None, 0)
    events = list(answer.events)
    if kind == "malformed-json":
        events.insert(1, MALFORMED_EVENT)
    if kind == "empty-stream":
        events = []
    if kind == "no-done":
        events = [event for event in events if event != SSE_DONE]
    if kind == "end-after":  # the body ends cleanly there: no finish reason, no [DONE]
        events = events[:answer.first_content + value]
    cut = answer.first_content + value if kind in ("stall-after", "reset-after") else -1
    gap = value / 1000 if kind == "slow-stream" else pace
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    request[_RESPONSE] = resp
    await resp.prepare(request)
    for index, event in enumerate(events):
        if index == cut and kind == "reset-after":
            await asyncio.sleep(POLL_SECONDS)  # let the sent chunks leave before the RST
            _abort(request)
        if index == cut:  # stall-after: hang (connection open), carry on if nobody left
            await _pause(request, STALL_SECONDS)
        if gap and index:
            await _pause(request, gap)
        await resp.write(event)  # one write per event: the client sees them one by one
    await resp.write_eof()
    return resp


def _echo_words(body: dict[str, Any]) -> list[str]:
    """The last user message (or the prompt), split so that streaming sends it piece by piece:
    `fault-echo` answers with what the gateway forwarded, placeholders and all."""
    text = ""
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
    if not text and isinstance(body.get("prompt"), str):
        text = body["prompt"]
    if not text:
        text = _responses_input_text(body.get("input"))
    size = body.get("echo_chunk")  # a test may ask for pieces of a given size (else: words)
    if type(size) is int and size > 0:
        return [text[i:i + size] for i in range(0, len(text), size)] or [""]
    return text.split(" ") or [""]


def _responses_input_text(value: Any) -> str:
    """A Responses request's input: the string, or its last user item's text (string or text parts)."""
    if isinstance(value, str):
        return value
    text = ""
    for item in value if isinstance(value, list) else []:
        if isinstance(item, dict) and item.get("role") == "user":
            content = item.get("content")
            text = content if isinstance(content, str) else " ".join(
                p.get("text", "") for p in content or [] if isinstance(p, dict))
    return text


async def _deliver_tool_echo(request: web.BaseRequest, body: dict[str, Any], text: str,
                             serial: int) -> web.StreamResponse:
    """The echoed text as the arguments of one tool call (JSON), streamed in pieces or whole; with
    `"echo_raw_arguments": true` in the request, the text is the arguments themselves."""
    arguments = text if body.get("echo_raw_arguments") is True else json.dumps({"text": text})
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "system_fingerprint": "fp_mock"}
    call = {"id": "call_mock", "type": "function", "function": {"name": "echo", "arguments": arguments}}
    if not body.get("stream"):
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        return await _send(request, web.json_response({**base, "choices": [choice]}))
    size = body.get("echo_chunk") if type(body.get("echo_chunk")) is int else 5
    pieces = [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + size]}}]},
               "logprobs": None, "finish_reason": None} for i in range(0, len(arguments), size)]
    first = {"delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_mock", "type": "function", "function": {"name": "echo", "arguments": ""}}]},
        "logprobs": None, "finish_reason": None}
    final = {"delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    answer = _streamed({**base, "object": "chat.completion.chunk"}, 1, pieces, final, None, first)
    return await _deliver_stream(request, answer, None)


ODD_CHAT_ANSWERS = ("interleaved-tools", "odd-arguments", "content-parts", "usage-riding")
ODD_ARGUMENTS = ('{"text": ', "[1, 2]")  # fault-odd-arguments: invalid JSON (cut short), then an array


def _odd_chat_answer(kind: str, body: dict[str, Any], words: list[str], serial: int) -> dict[str, Any] | SseAnswer:
    """A chat answer as some servers write it (see the module's docstring), whole or streamed. The echoed text
    is the answer's text, or the first tool call's `{"text": ...}`; `interleaved-tools`' second call is
    `{"words": <how many>}`."""
    text = " ".join(words)
    base = {"id": f"chatcmpl-mock-{serial}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"), "system_fingerprint": "fp_mock"}
    usage = chat_usage(chat_prompt_tokens(body.get("messages")), len(words), details=kind == "usage-riding")
    arguments = {"interleaved-tools": [json.dumps({"text": text}), json.dumps({"words": len(words)})],
                 "odd-arguments": list(ODD_ARGUMENTS)}.get(kind)
    calls = [{"id": f"call_mock{i}", "type": "function", "function": {"name": f"tool{i}", "arguments": given}}
             for i, given in enumerate(arguments or ())]
    finish = "tool_calls" if calls else "stop"
    if not body.get("stream"):
        content: Any = [{"type": "text", "text": text}] if kind == "content-parts" else text
        message = {"role": "assistant", "content": None if calls else content, "refusal": None,
                   **({"tool_calls": calls} if calls else {})}
        return {**base, "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage}
    pieces = _odd_pieces(kind, words, calls)
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None}]})]
    events += [sse({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) for delta in pieces]
    last = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    if kind == "usage-riding":
        events.append(sse({**last, "usage": usage}))
    else:
        events += [sse(last)] + ([sse({**chunk, "choices": [], "usage": usage})] if _include_usage(body) else [])
    return SseAnswer([*events, SSE_DONE], 1)


def _odd_pieces(kind: str, words: list[str], calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The deltas of `_odd_chat_answer`'s stream: text pieces, or each tool call in two halves, which
    `interleaved-tools` sends as call 0's first half, call 1's, call 0's second half, call 1's."""
    if not calls:
        texts = [w if i == 0 else " " + w for i, w in enumerate(words)]
        return [{"content": [{"type": "text", "text": t}]} if kind == "content-parts" else {"content": t}
                for t in texts]
    halves: list[list[dict[str, Any]]] = []
    for index, call in enumerate(calls):
        whole = call["function"]["arguments"]
        cut = len(whole) // 2
        first = {"index": index, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": whole[:cut]}}
        halves.append([first, {"index": index, "function": {"arguments": whole[cut:]}}])
    order = ([halves[0][0], halves[1][0], halves[0][1], halves[1][1]] if kind == "interleaved-tools"
             else [piece for pair in halves for piece in pair])
    return [{"tool_calls": [piece]} for piece in order]


# ---------------------------------------------------------------- server


class MockUpstream:
    """OpenAI-compatible model server on 127.0.0.1, run in a background thread."""

    REPLY_WORDS: tuple[str, ...] = (
        "Hello", "from", "the", "mock", "upstream", "server:", "this", "canned", "reply",
        "has", "exactly", "twenty", "words", "for", "deterministic", "end", "to", "end",
        "gateway", "tests.",
    )

    def __init__(self, api_key: str | None = "sk-upstream-test", *,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.override: str | None = None  # a fault name applied to every request (see the module's docstring)
        self.disconnects: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._serials = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False

    @property
    def reply_text(self) -> str:
        return " ".join(self.REPLY_WORDS)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    # -- lifecycle

    def start(self) -> MockUpstream:
        """Start serving; returns once the socket is accepting connections."""
        if self._thread is not None:
            return self
        self._stopping = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="mock-upstream", daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        """Close the server, cut in-flight requests (not counted as disconnects)."""
        if self._thread is None or self._loop is None:
            return
        self._stopping = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._thread = self._loop = self._runner = None

    def __enter__(self) -> MockUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _serve(self) -> int:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._route(chat_answer))
        app.router.add_post("/v1/completions", self._route(completion_answer))
        app.router.add_post("/v1/embeddings", self._route(embeddings_answer))
        app.router.add_post("/v1/responses", self._route(responses_answer))
        # Azure OpenAI: the same formats under deployment URLs (`?api-version=` is recorded in `query`)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._route(chat_answer))
        app.router.add_post("/openai/deployments/{deployment}/completions", self._route(completion_answer))
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self._route(embeddings_answer))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model_id:.+}", self._model)
        # handler_cancellation: a client that goes away cancels its handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     handle_signals=False, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return int(self._runner.addresses[0][1])

    async def _shutdown(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- recording

    def clear(self) -> None:
        self.override = None
        with self._cond:
            self.requests.clear()
            self.disconnects.clear()

    def wait_for_disconnect(self, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.disconnects) > 0, timeout)

    def _record(self, request: web.BaseRequest, body: bytes) -> RecordedRequest:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        model = parsed.get("model") if isinstance(parsed, dict) else None
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = RecordedRequest(request.method, request.path, headers, body, parsed,
                                 model if isinstance(model, str) else None, dict(request.query))
        with self._cond:
            self.requests.append(record)
        return record

    def _note_disconnect(self, request: web.BaseRequest) -> None:
        """Record a client that left early; once, and not for our own resets."""
        if self._stopping or _RECORD not in request or request.get(_ABORTED) or request.get(_GONE):
            return
        request[_GONE] = True
        with self._cond:
            self.disconnects.append(request[_RECORD])
            self._cond.notify_all()

    # -- handlers

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        """Record, authenticate, and turn early client exits into disconnect records."""
        request[_RECORD] = self._record(request, await request.read())
        try:
            refused = self._auth_error(request)
            if refused is not None:
                return await _send(request, refused)
            try:
                return await handler(request)
            except web.HTTPException as exc:  # unknown route or method
                return await _send(request, error_response(
                    exc.status, f"Invalid URL ({request.method} {request.path})",
                    "invalid_request_error", None))
        except asyncio.CancelledError:
            self._note_disconnect(request)
            raise
        except ConnectionResetError:
            self._note_disconnect(request)
            return request.get(_RESPONSE) or web.Response()

    def _auth_error(self, request: web.Request) -> web.Response | None:
        """The 401 for a request without the key (Azure's `api-key` header is accepted as well)."""
        authorization = request.headers.get("Authorization", "")
        if self.api_key is None or authorization == f"Bearer {self.api_key}":
            return None
        if request.path.startswith("/openai/deployments/") and request.headers.get("api-key") == self.api_key:
            return None
        return auth_error_response(authorization)

    def _route(self, build: Builder) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = request[_RECORD].json
            if not isinstance(body, dict):
                return await _send(request, bad_json_response())
            fault = parse_fault(self.override or body.get("model"))
            if fault and fault.kind == "status":
                return await _send(request, status_fault_response(fault.value))
            if fault and fault.kind in ("retry-after", "retry-after-raw"):
                value = fault.text if fault.kind == "retry-after-raw" else str(fault.value)
                return await _send(request, error_response(429, "Rate limit reached, retry later",
                                                           "rate_limit_exceeded", "rate_limit_exceeded",
                                                           headers={"Retry-After": value}))
            if fault and fault.kind == "redirect":
                location = f"http://{request.host}/v1/redirected"
                return await _send(request, error_response(fault.value, f"Moved to {location}", "moved", None,
                                                           headers={"Location": location}))
            if fault and fault.kind == "context-length":
                return await _send(request, error_response(
                    400, "This model's maximum context length is 128 tokens. However, your messages resulted in "
                    "4000 tokens.", "invalid_request_error", "context_length_exceeded", param="messages"))
            if fault and fault.kind in ("split-context-length", "error-trickle"):
                return await _deliver_error_slowly(request, fault)
            if fault and fault.kind == "content-filter":  # Azure's answer to a prompt its filter rejects
                return await _send(request, web.json_response({"error": AZURE_CONTENT_FILTER}, status=400))
            if fault and fault.kind == "error-first" and body.get("stream") is True:
                error = {"error": {"message": "The server had an error while processing your request",
                                   "type": "server_error"}}
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                request[_RESPONSE] = resp
                await resp.prepare(request)
                await resp.write(sse(error))
                await resp.write_eof()
                return resp
            if fault and fault.kind == "error-first":
                return await _send(request, status_fault_response(500))
            key = request.headers.get("Authorization", "").removeprefix("Bearer ")
            if fault and fault.kind == "echo-secrets":
                return await _send(request, error_response(
                    500, ECHO_DETAIL.format(key=key), "server_error", None))
            if fault and fault.kind == "no-usage":
                body = {**body, "stream_options": None}  # answer as an upstream that ignores include_usage
            if fault and fault.kind in mock_reasoning.KINDS:  # reasoning or a refusal: `mock_reasoning`
                build_kind = mock_reasoning.responses if request.path.endswith("/responses") else mock_reasoning.chat
                made = build_kind(fault.kind, body, " ".join(_echo_words(body)), next(self._serials))
                if isinstance(made, list):  # paced: a test may count the pieces the gateway passed on
                    return await _deliver_stream(request, SseAnswer(made, 1), None, REASONING_PACE_S)
                return await _send(request, web.json_response(made))
            if fault and fault.kind in ODD_CHAT_ANSWERS and request.path.endswith("/chat/completions"):
                odd = _odd_chat_answer(fault.kind, body, _echo_words(body), next(self._serials))
                if isinstance(odd, SseAnswer):
                    return await _deliver_stream(request, odd, None)
                return await _send(request, web.json_response(odd))
            words = list(self.REPLY_WORDS)
            make = build
            if fault and fault.kind in ("echo", "echo-tool"):
                words = _echo_words(body)
                if fault.kind == "echo-tool" and request.path.endswith("/chat/completions"):
                    return await _deliver_tool_echo(request, body, _joined(body, words)[0], next(self._serials))
                if fault.kind == "echo-tool" and request.path.endswith("/responses"):
                    make = partial(responses_answer, tool=True)
            if fault and fault.kind == "slow-stream":
                words = list(itertools.islice(itertools.cycle(words), SLOW_STREAM_CHUNKS))
            try:
                answer = make(body, words, next(self._serials))
            except RequestError as exc:
                return await _send(request, error_response(
                    400, str(exc), "invalid_request_error", None, param=exc.param))
            if isinstance(answer, SseAnswer):
                if fault and fault.kind == "echo-secrets-midstream":
                    error = {"error": {"message": ECHO_DETAIL.format(key=key), "type": "server_error"}}
                    answer.events.insert(answer.first_content + 2, sse(error))
                return await _deliver_stream(request, answer, fault)
            if fault and fault.kind == "no-usage":
                answer.pop("usage", None)
            if fault and fault.kind == "huge-body":  # a valid answer of fault.value KiB
                answer["padding"] = "x" * (fault.value * 1024)
            return await _deliver_json(request, answer, fault)
        return handle

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [_model_object(model_id) for model_id in MODEL_IDS]
        return await _send(request, web.json_response({"object": "list", "data": data}))

    async def _model(self, request: web.Request) -> web.StreamResponse:
        """Every id exists: chat accepts any model name, so the mock knows them all."""
        return await _send(request, web.json_response(_model_object(request.match_info["model_id"])))


def _model_object(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the mock OpenAI upstream in the foreground.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="sk-upstream-test",
                        help="required bearer key; empty string disables the check")
    args = parser.parse_args(argv)
    # Ctrl-C stops it even when started from a shell's background job, which starts it with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mock = MockUpstream(args.api_key or None, host=args.host, port=args.port).start()
    print(f"mock upstream listening on {mock.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        mock.stop()


if __name__ == "__main__":
    main()
