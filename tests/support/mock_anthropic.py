"""A mock of Anthropic's Messages API (`POST /v1/messages`), with the OpenAI mock's fault injection.

It speaks the wire format of Anthropic's documentation: `x-api-key` and
`anthropic-version` headers, the `message` object with content blocks and usage
(cache reads and writes included), the streaming event sequence (message_start,
content_block_start, ping, content_block_delta with text_delta / input_json_delta,
content_block_stop, message_delta, message_stop), and errors as
`{"type": "error", "error": {"type": ..., "message": ...}}` with Anthropic's
statuses (529 for `overloaded_error`). As the real API, tool ids (`tool_use.id`,
`tool_result.tool_use_id`) must match `^[a-zA-Z0-9_-]+$`.

Faults are chosen by the model name, as in `mock_upstream` (`fault-status-529`,
`fault-slow-first-byte-3000`, `fault-stall-after-3`, `fault-malformed-json`,
`fault-echo`, `fault-echo-tool`, ...), plus `fault-error-first` (an `error`
event before any content), `fault-out-of-order` (a delta before its block
started) and `fault-overloaded-midstream` (an `error` event after some text).

As the real API: `stop_sequences` end the answer before the first one found in
it (`stop_reason: "stop_sequence"` with that `stop_sequence`), and `cache_control`
is checked where it is allowed (system, content and `tool_result` blocks, tools:
an object of type `ephemeral`, at most 4 of them).

Extended thinking: with `thinking: {"type": "enabled", "budget_tokens": n}` (n at
least 1024 and below `max_tokens`), the answer begins with a `thinking` block
whose text repeats the last user text, signed (`signature_delta` in a stream); a
second one when that text holds "think twice"; a `redacted_thinking` block when it
holds Anthropic's magic string (`REDACTED_TRIGGER`). As the real API, a request
with thinking whose last assistant turn has `tool_use` blocks must begin that turn
with its thinking, and every thinking block's signature (and redacted block's
data) must be the mock's own, unchanged: else a 400.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from aiohttp import web

from .mock_upstream import (
    _RECORD,
    LEAKY_DETAIL,
    MockUpstream,
    RecordedRequest,
    SseAnswer,
    _deliver_json,
    _deliver_stream,
    _echo_words,
    _send,
    count_words,
    parse_fault,
)

__all__ = ["CACHE_READ", "CACHE_WRITE", "REDACTED_TRIGGER", "MockAnthropic", "anthropic_error", "thinking_signature"]

CACHE_READ = 3  # every answer reports these cache tokens, so that their mapping can be checked
CACHE_WRITE = 2
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                529: "overloaded_error"}


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_mock"}
    return web.json_response(body, status=status, headers=headers)


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **fields}).encode() + b"\n\n"


def _prompt_tokens(body: dict[str, Any]) -> int:
    total = count_words(body.get("system")) if isinstance(body.get("system"), str) else 0
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, str):
            total += count_words(content)
        for block in content if isinstance(content, list) else ():
            if isinstance(block, dict) and block.get("type") == "text":
                total += count_words(block.get("text"))
        total += 3
    return total


def _user_text(body: dict[str, Any]) -> str:
    """The last user turn's text, as the OpenAI mock's echo reads it."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


_MAX_BREAKPOINTS = 4
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")  # a `tool_use` id's and a `tool_result`'s `tool_use_id`'s alphabet


def _cache_problem(body: dict[str, Any]) -> str | None:
    """What the real API says of the request's `cache_control` breakpoints (None: they are fine)."""
    blocks: list[Any] = list(body.get("tools") or ())
    if isinstance(body.get("system"), list):
        blocks += body["system"]
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            blocks.append(block)
            inner = block.get("content") if isinstance(block, dict) else None
            blocks += inner if isinstance(inner, list) else []
    found = [block["cache_control"] for block in blocks if isinstance(block, dict) and "cache_control" in block]
    for control in found:
        if not isinstance(control, dict) or control.get("type") != "ephemeral":
            return "cache_control: Input tag does not match the expected tag 'ephemeral'"
    if len(found) > _MAX_BREAKPOINTS:
        return f"A maximum of {_MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(found)}."
    return None


REDACTED_TRIGGER = ("ANTHROPIC_MAGIC_STRING_TRIGGER_REDACTED_THINKING_"
                    "46C9A13E193C177646C7398A98432ECCCE4C1253D5E2D82641AC0E52CC2876CB")
_SIGNING_KEY = "mock-anthropic-thinking"


def thinking_signature(text: str) -> str:
    """The signature the mock gives a thinking block's text (and checks when the block comes back)."""
    return "EqMock" + hashlib.sha256(f"{_SIGNING_KEY}:{text}".encode()).hexdigest()[:40]


def _redacted_data(seed: str) -> str:
    digest = hashlib.sha256(f"{_SIGNING_KEY}:redacted:{seed}".encode()).hexdigest()
    return f"EmwMock{seed}.{digest[:32]}"


def _redacted_valid(data: Any) -> bool:
    if not isinstance(data, str) or not data.startswith("EmwMock") or "." not in data:
        return False
    return data == _redacted_data(data[len("EmwMock"):].rpartition(".")[0])


def _thinking_blocks(body: dict[str, Any], serial: int) -> list[dict[str, Any]]:
    """The thinking an answer begins with (none when the request does not enable it)."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") != "enabled":
        return []
    asked = _user_text(body)
    texts = [f"The user asks: {asked}. I should answer briefly."]
    if "think twice" in asked:
        texts.append("On second thought, an echo will do.")
    blocks: list[dict[str, Any]] = [{"type": "thinking", "thinking": text, "signature": thinking_signature(text)}
                                    for text in texts]
    if REDACTED_TRIGGER in asked:
        blocks.insert(1, {"type": "redacted_thinking", "data": _redacted_data(str(serial))})
    return blocks


def _thinking_problem(body: dict[str, Any]) -> str | None:
    """What the real API says of a request's thinking: its budget, the last assistant turn with tool calls
    beginning with its thinking, and every thinking block's signature (redacted block's data) unchanged."""
    thinking = body.get("thinking")
    enabled = isinstance(thinking, dict) and thinking.get("type") == "enabled"
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            return "thinking: Input tag does not match any of the expected tags: 'disabled', 'enabled'"
        budget = thinking.get("budget_tokens")
        if enabled and (type(budget) is not int or budget < 1024):
            return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
        if enabled and budget >= body["max_tokens"]:
            return "`max_tokens` must be greater than `thinking.budget_tokens`"
    messages = body["messages"]
    for index, message in enumerate(messages):
        content = message.get("content")
        for position, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "thinking" and (message.get("role") != "assistant" or not isinstance(block.get("thinking"), str)
                                       or block.get("signature") != thinking_signature(block["thinking"])):
                return f"messages.{index}.content.{position}: Invalid `signature` in `thinking` block"
            if kind == "redacted_thinking" and not _redacted_valid(block.get("data")):
                return f"messages.{index}.content.{position}: Invalid `data` in `redacted_thinking` block"
    last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"), None)
    content = messages[last].get("content") if last is not None else None
    if enabled and isinstance(content, list) and any(b.get("type") == "tool_use" for b in content):
        first = content[0].get("type")
        if first not in ("thinking", "redacted_thinking"):
            return (f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{first}`."
                    " When `thinking` is enabled, a final `assistant` message must start with a thinking block"
                    " (preceeding the lastmost set of `tool_use` and `tool_result` blocks).")
    return None


def _stopped(text: str, sequences: Any) -> tuple[str, str] | None:
    """The text up to the first stop sequence found in it, and that sequence (None: none is found)."""
    hits = [(text.find(seq), seq) for seq in sequences or () if isinstance(seq, str) and seq and seq in text]
    if not hits:
        return None
    at, seq = min(hits)
    return text[:at], seq


def _check(body: Any) -> str | None:
    """What the real API would reject (a subset: the fields a translator can get wrong)."""
    if not isinstance(body, dict):
        return "invalid JSON body"
    if type(body.get("max_tokens")) is not int:
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    seen_tools: set[str] = set()
    for index, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
        if index and messages[index - 1].get("role") == message.get("role"):
            return f"messages.{index}: roles must alternate between user and assistant"
        content = message.get("content")
        for position, block in enumerate(content if isinstance(content, list) else ()):
            for field in ("id", "tool_use_id"):
                if block.get("type") in ("tool_use", "tool_result") and field in block \
                        and not _TOOL_ID.fullmatch(str(block[field])):
                    return (f"messages.{index}.content.{position}.{block['type']}.{field}: String should match "
                            "pattern '^[a-zA-Z0-9_-]+$'")
            if block.get("type") == "tool_use":
                seen_tools.add(block.get("id"))
            if block.get("type") == "tool_result" and block.get("tool_use_id") not in seen_tools:
                return f"messages.{index}: tool_result block(s) without a matching tool_use block"
            if block.get("type") == "image" and block.get("source", {}).get("type") not in ("base64", "url"):
                return f"messages.{index}: invalid image source"
    return _cache_problem(body) or _thinking_problem(body)


class MockAnthropic(MockUpstream):
    """Anthropic's Messages API on 127.0.0.1 (base URL `.../v1`), run in a background thread."""

    def __init__(self, api_key: str | None = "sk-ant-test", **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)

    async def _serve(self) -> int:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     handle_signals=False, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return int(self._runner.addresses[0][1])

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return anthropic_error(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return anthropic_error(400, "anthropic-version: header is required")
        return None

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        record: RecordedRequest = request[_RECORD]
        body = record.json
        fault = parse_fault(self.override or (body.get("model") if isinstance(body, dict) else None))
        problem = _check(body)
        if problem is not None:
            return await _send(request, anthropic_error(400, problem))
        assert isinstance(body, dict)
        if fault and fault.kind == "status":
            headers = {"retry-after": "7"} if fault.value == 429 else None
            return await _send(request, anthropic_error(fault.value, f"Mock failure: {LEAKY_DETAIL}", headers))
        if fault and fault.kind == "context-length":
            return await _send(request, anthropic_error(400, "prompt is too long: 210000 tokens > 200000 maximum"))
        serial = next(self._serials)
        words = list(self.REPLY_WORDS)
        if fault and fault.kind in ("echo", "echo-tool"):
            words = _echo_words({"messages": [{"role": "user", "content": _user_text(body)}]})
        tool = fault is not None and fault.kind == "echo-tool"
        text = " ".join(words)
        stopped = None if tool else _stopped(text, body.get("stop_sequences"))
        if stopped is not None:
            text = stopped[0]
            words = text.split(" ")
        reason = "tool_use" if tool else "stop_sequence" if stopped else "end_turn"
        sequence = stopped[1] if stopped else None
        usage = {"input_tokens": _prompt_tokens(body), "output_tokens": len(words),
                 "cache_creation_input_tokens": CACHE_WRITE, "cache_read_input_tokens": CACHE_READ}
        base = {"id": f"msg_mock{serial}", "type": "message", "role": "assistant", "model": body["model"]}
        thinking = _thinking_blocks(body, serial)
        if not body.get("stream"):
            if tool:
                content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_mock{serial}", "name": "echo",
                                                  "input": {"text": text}}]
            else:
                content = [{"type": "text", "text": text}]
            answer = {**base, "content": thinking + content, "stop_reason": reason, "stop_sequence": sequence,
                      "usage": usage}
            return await _deliver_json(request, answer, fault)
        return await _deliver_stream(request, self._stream(base, words, usage, tool, fault, (reason, sequence),
                                                           thinking, f"toolu_mock{serial}"), fault)

    def _stream(self, base: dict[str, Any], words: list[str], usage: dict[str, Any], tool: bool,
                fault: Any, stop: tuple[str, str | None] = ("end_turn", None),
                thinking: list[dict[str, Any]] | None = None, tool_id: str = "toolu_mock") -> SseAnswer:
        start = _event("message_start", message={**base, "content": [], "stop_reason": None, "stop_sequence": None,
                                                  "usage": {**usage, "output_tokens": 1}})
        if fault and fault.kind == "error-first":
            return SseAnswer([start, _event("error", error={"type": "overloaded_error", "message": "Overloaded"})], 1)
        thought = _thinking_events(thinking or [])
        at = len(thinking or [])  # the answer's own block comes after the thinking blocks
        if tool:
            arguments = json.dumps({"text": " ".join(words)})
            block = {"type": "tool_use", "id": tool_id, "name": "echo", "input": {}}
            deltas = [_event("content_block_delta", index=at,
                             delta={"type": "input_json_delta", "partial_json": arguments[i:i + 5]})
                      for i in range(0, len(arguments), 5)]
        else:
            block = {"type": "text", "text": ""}
            deltas = [_event("content_block_delta", index=at,
                             delta={"type": "text_delta", "text": w if i == 0 else " " + w})
                      for i, w in enumerate(words)]
        opening = [start, *thought, _event("content_block_start", index=at, content_block=block), _event("ping")]
        if fault and fault.kind == "out-of-order":
            opening = [start, _event("ping")]  # deltas for a block that never started
        if fault and fault.kind == "overloaded-midstream":
            deltas = [*deltas[:3], _event("error", error={"type": "overloaded_error", "message": "Overloaded"})]
            return SseAnswer(opening + deltas, len(opening))
        closing = [_event("content_block_stop", index=at),
                   _event("message_delta", delta={"stop_reason": stop[0], "stop_sequence": stop[1]},
                          usage={"output_tokens": len(words)}),
                   _event("message_stop")]
        return SseAnswer(opening + deltas + closing, len(opening))



def _thinking_events(blocks: list[dict[str, Any]]) -> list[bytes]:
    """Thinking blocks as the real API streams them: the text in pieces, then the signature, then the stop."""
    events: list[bytes] = []
    for index, block in enumerate(blocks):
        if block["type"] == "redacted_thinking":
            events += [_event("content_block_start", index=index, content_block=block),
                       _event("content_block_stop", index=index)]
            continue
        text = block["thinking"]
        events.append(_event("content_block_start", index=index,
                             content_block={"type": "thinking", "thinking": "", "signature": ""}))
        events += [_event("content_block_delta", index=index,
                          delta={"type": "thinking_delta", "thinking": text[i:i + 6]})
                   for i in range(0, len(text), 6)]
        events += [_event("content_block_delta", index=index,
                          delta={"type": "signature_delta", "signature": block["signature"]}),
                   _event("content_block_stop", index=index)]
    return events


# -- appended: the real API's stricter checks and odd answers (`StrictAnthropic`) ------------------------------------

# Anthropic's own wording when the prompt and `max_tokens` together do not fit the window (its most common one).
CONTEXT_LIMIT_MESSAGE = ("input length and `max_tokens` exceed context limit: 199759 + 4096 > 200000, decrease input "
                         "length or `max_tokens` and try again")
# Answers with HTTP 200 that are no Message, by model name (as an intermediary or a broken upstream sends them).
ODD_200: dict[str, dict[str, Any]] = {
    "odd-200-overloaded": {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    "odd-200-invalid": {"type": "error", "error": {"type": "invalid_request_error", "message": "Bad thing"}},
    "odd-200-error-only": {"error": {"message": "upstream hiccup", "type": "server_error"}},
    "odd-200-empty": {},
}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _text_problem(block: Any, where: str) -> str | None:
    if isinstance(block, dict) and block.get("type") == "text":
        text = block.get("text")
        if not isinstance(text, str) or not text:
            return f"{where}: text content blocks must be non-empty"
        if not text.strip():
            return f"{where}: text content blocks must contain non-whitespace text"
    return None


def strict_problem(body: dict[str, Any]) -> str | None:
    """What the real API refuses beyond `_check`: empty or whitespace-only text, empty turns, whitespace-only stop
    sequences, image types other than its four, `temperature` with `top_p` (Claude Sonnet 4.5 and later), and
    `metadata` fields other than `user_id`."""
    system = body.get("system")
    for position, block in enumerate(system if isinstance(system, list) else ()):
        problem = _text_problem(block, f"system.{position}")
        if problem:
            return problem
    for index, message in enumerate(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        if content == "" or content == []:
            return f"messages.{index}: all messages must have non-empty content except for the optional final " \
                   "assistant message"
        for position, block in enumerate(content if isinstance(content, list) else ()):
            where = f"messages.{index}.content.{position}"
            inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
            for part in [block, *(inner if isinstance(inner, list) else ())]:
                problem = _text_problem(part, where)
                if problem:
                    return problem
                source = part.get("source") if isinstance(part, dict) and part.get("type") == "image" else None
                if isinstance(source, dict) and source.get("type") == "base64" \
                        and source.get("media_type") not in _IMAGE_TYPES:
                    return (f"{where}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
                            "'image/gif' or 'image/webp'")
    for sequence in body.get("stop_sequences") or ():
        if not isinstance(sequence, str) or not sequence.strip():
            return "stop_sequences: each stop sequence must contain non-whitespace"
    if body.get("temperature") is not None and body.get("top_p") is not None:
        return "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and set(metadata) - {"user_id"}:
        return "metadata: Extra inputs are not permitted"
    return None


class StrictAnthropic(MockAnthropic):
    """`MockAnthropic` with `strict_problem`'s checks, and the model names `odd-context-limit` (a 400 with
    `CONTEXT_LIMIT_MESSAGE`) and those of `ODD_200` (that body with HTTP 200)."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_RECORD].json
        if isinstance(body, dict):
            problem = strict_problem(body)
            if problem is not None:
                return await _send(request, anthropic_error(400, problem))
            model = body.get("model")
            if model == "odd-context-limit":
                return await _send(request, anthropic_error(400, CONTEXT_LIMIT_MESSAGE))
            if isinstance(model, str) and model in ODD_200:
                return await _send(request, web.json_response(ODD_200[model]))
        return await super()._messages(request)
