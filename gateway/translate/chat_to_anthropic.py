"""Chat Completions to Anthropic's Messages API and back: pure functions and a per-stream translator.

Request: system and developer messages become `system`; text and image parts
become content blocks (a `data:` URL a base64 image, any other URL an image by
URL); an assistant's `tool_calls` become `tool_use` blocks and `tool` messages
`tool_result` blocks (consecutive ones in one user turn, as Anthropic wants);
tools, `tool_choice`, `parallel_tool_calls`, `stop`, `user`, JSON mode (as an
instruction in `system`: Messages has no JSON mode) and `max_tokens` (the
provider's default when the client gave none) are translated. A field Messages
has no equivalent for (`n > 1`, `logprobs`, penalties, `seed`, audio...) is a
400 naming it, never a silent drop.

Answer: text blocks become `content`, `tool_use` blocks `tool_calls`, stop
reasons finish reasons, and usage OpenAI's shape (`prompt_tokens` counts cache
reads and writes, as OpenAI's does; `prompt_tokens_details.cached_tokens` the
reads, `prompt_tokens_details.cache_write_tokens` the writes).

Stream: `AnthropicEvents` turns each Messages event into chunks as it arrives;
an event out of order (a delta before its block started, anything before
`message_start`) raises `StreamProtocolError`, which ends the client's stream
with an error event.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import GatewayError, InvalidRequest
from ..schemas.events import DONE, StreamError, StreamEvent, UsageReport
from ..schemas.openai import PromptTokensDetails, Usage
from .common import ChunkWriter, StreamProtocolError, data_url, json_instruction, parse_arguments, unsupported

__all__ = ["FINISH_REASONS", "AnthropicEvents", "anthropic_request", "chat_completion", "chat_usage"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode

FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "model_context_window_exceeded": "length",
}
# Chat fields Messages has no equivalent for: a 400 naming the field when set to anything but its neutral value.
_REFUSED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v not in (None, 1),
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: v is not None,
    "presence_penalty": lambda v: v not in (None, 0),
    "frequency_penalty": lambda v: v not in (None, 0),
    "logit_bias": lambda v: bool(v),
    "seed": lambda v: v is not None,
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "functions": lambda v: v is not None,
    "function_call": lambda v: v is not None,
}
# Read and translated below, or harmless to leave out (OpenAI-only bookkeeping).
_HANDLED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "user", "metadata", "response_format",
    "store", "service_tier",
})
# Messages' own fields, passed as they are (a target's `extra_body` may set them).
_NATIVE = frozenset({"top_k", "thinking"})


def anthropic_request(body: dict[str, Any], default_max_tokens: int, target: str) -> dict[str, Any]:
    """The Messages request for a Chat Completions request (`body["model"]` already the upstream's)."""
    for field, refused in _REFUSED.items():
        if field in body and refused(body[field]):
            raise unsupported(field, target)
    for field in body:
        if field not in _HANDLED and field not in _NATIVE and field not in _REFUSED:
            raise unsupported(field, target)
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for index, message in enumerate(body["messages"]):
        _add_message(message, index, system, messages, target)
    json_mode = json_instruction(body.get("response_format"))
    if json_mode:
        system.append({"type": "text", "text": json_mode})
    out: dict[str, Any] = {
        "model": body["model"],
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or default_max_tokens,
        "messages": messages,
    }
    if system:
        plain = all(set(block) == {"type", "text"} for block in system)
        out["system"] = "\n\n".join(block["text"] for block in system) if plain else system
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature > 1:
            raise InvalidRequest(f"`temperature` above 1 is not supported by {target} (Messages allows 0 to 1)",
                                 param="temperature", code="unsupported_parameter")
        out["temperature"] = temperature
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("stream"):
        out["stream"] = True
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool, i, target) for i, tool in enumerate(tools)]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None:
        if choice == {"type": "none"} and not tools:
            choice = None
        elif not tools:
            raise InvalidRequest("`tool_choice` needs `tools`", param="tool_choice")
    if choice is not None:
        out["tool_choice"] = choice
    user = body.get("user")
    metadata = body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if user_id or user:
        out["metadata"] = {"user_id": str(user_id or user)}
    for field in _NATIVE:
        if field in body:
            out[field] = body[field]
    return out


def _add_message(message: Any, index: int, system: list[dict[str, Any]], messages: list[dict[str, Any]],
                 target: str) -> None:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise InvalidRequest(f"`{where}` must be an object", param=where)
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        system.extend(_blocks(content, where, target, images=False))
        return
    if role == "user":
        _append(messages, "user", _blocks(content, where, target, images=True))
        return
    if role == "assistant":
        blocks = _blocks(content, where, target, images=False) if content else []
        for position, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"`{where}.tool_calls.{position}` needs a function name",
                                     param=f"{where}.tool_calls")
            blocks.append({"type": "tool_use", "id": str(call.get("id") or f"toolu_{index}_{position}"),
                           "name": function["name"],
                           "input": parse_arguments(function.get("arguments"), f"{where}.tool_calls.{position}")})
        if blocks:
            _append(messages, "assistant", blocks)
        return
    if role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": str(message.get("tool_call_id") or "")}
        if content:
            result["content"] = content if isinstance(content, str) else _blocks(content, where, target, images=True)
        _append(messages, "user", [result])
        return
    raise unsupported(f"{where}.role", target, f"role `{role}`")


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one turn (Messages alternates user and assistant)."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:
        messages.append({"role": role, "content": blocks})


def _blocks(content: Any, where: str, target: str, *, images: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of parts", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url" and images:
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise InvalidRequest(f"`{where}.content.{position}.image_url.url` is missing",
                                     param=f"{where}.content")
            inline = data_url(url)
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        else:
            raise unsupported(f"{where}.content.{position}", target, f"a `{kind}` content part here")
    return blocks


def _tool(tool: Any, index: int, target: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise unsupported(f"tools.{index}", target, "a tool other than a function with a name")
    out: dict[str, Any] = {"name": function["name"],
                           "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = {"type": "auto"} if parallel is False else None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        out = {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequest("`tool_choice` must be auto, required, none or a function", param="tool_choice")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# -- the answer ---------------------------------------------------------------------------------------


def chat_usage(usage: dict[str, Any]) -> tuple[Usage, dict[str, Any]]:
    """Anthropic's usage as the gateway's `Usage` and as OpenAI's usage object, both with the cache reads and
    writes (what accounting prices apart, and what an answer replayed from the gateway's cache reports)."""
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    prompt = fresh + read + written
    shape = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
             "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written}}
    details = PromptTokensDetails(cached_tokens=read, cache_write_tokens=written) if read or written else None
    return Usage(prompt, output, prompt + output, details), shape


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def chat_completion(answer: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
    """A Messages answer as a `chat.completion`, and its usage."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in answer.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = _encode(block.get("input", {})).decode()
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    usage, shape = chat_usage(answer["usage"]) if isinstance(answer.get("usage"), dict) else (None, None)
    body: dict[str, Any] = {
        "id": str(answer.get("id") or "msg"), "object": "chat.completion", "created": int(time.time()),
        "model": answer.get("model"),
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(str(answer.get("stop_reason")), "stop")}],
    }
    if shape is not None:
        body["usage"] = shape
    return body, usage


class AnthropicEvents:
    """Per stream: Messages events in, chat.completion.chunk events out, one by one as they come."""

    __slots__ = ("_blocks", "_error", "_filled", "_finish", "_opened", "_started", "_tools", "_usage", "_writer")

    def __init__(self, error: Callable[[dict[str, Any]], GatewayError]) -> None:
        self._writer: ChunkWriter | None = None
        self._error = error  # maps an in-stream `error` event's body to the client's error
        self._blocks: dict[int, int | None] = {}  # open block index -> tool call index (None: a text block)
        self._tools = 0
        self._filled: set[int] = set()  # tool calls whose input has come (`content_block_stop`)
        self._usage: dict[str, Any] = {}
        self._finish: str | None = None
        self._started = False
        self._opened = False

    def feed(self, payload: bytes) -> list[StreamEvent]:
        event = _decode(payload)
        kind = event.get("type")
        if kind == "ping":
            return []
        if kind == "error":
            detail = event.get("error")
            return [StreamError(self._error(detail if isinstance(detail, dict) else {}))]
        if kind == "message_start":
            if self._started:
                raise _order("a second message_start")
            message = event.get("message") or {}
            self._started = True
            self._usage.update(message.get("usage") or {})
            self._writer = ChunkWriter(str(message.get("id") or "msg"), message.get("model"))
            return []  # the role chunk waits for the first block: an `error` before it is a failed attempt
        writer = self._writer
        if writer is None:
            raise _order(f"`{_name(kind)}` before message_start")
        if kind == "content_block_start":
            index, block = event.get("index"), event.get("content_block") or {}
            if not isinstance(index, int) or index in self._blocks:
                raise _order("content_block_start for a block already started")
            events = self._role(writer)
            if block.get("type") == "tool_use":
                tool = self._tools
                self._tools += 1
                self._blocks[index] = tool
                events.append(writer.chunk({"tool_calls": [{"index": tool, "id": block.get("id"), "type": "function",
                                                            "function": {"name": block.get("name"),
                                                                         "arguments": ""}}]}))
                return events
            self._blocks[index] = None
            text = block.get("text")
            if isinstance(text, str) and text:
                events.append(writer.chunk({"content": text}))
            return events
        if kind == "content_block_delta":
            index, delta = event.get("index"), event.get("delta") or {}
            if index not in self._blocks:
                raise _order("content_block_delta for a block that was not started")
            dtype = delta.get("type")
            if dtype == "text_delta":
                return [writer.chunk({"content": delta.get("text", "")})]
            if dtype == "input_json_delta":
                position = self._blocks[index]
                if position is None:
                    raise _order("input_json_delta in a text block")
                piece = delta.get("partial_json", "")
                if piece:
                    self._filled.add(position)
                return [writer.chunk({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})]
            return []  # thinking, signature and citation deltas have no Chat Completions form
        if kind == "content_block_stop":
            index = event.get("index")
            if index not in self._blocks:
                raise _order("content_block_stop for a block that was not started")
            position = self._blocks[index]
            if position is not None and position not in self._filled:  # a tool without input sends only `""`: its
                # arguments are `{}`, as the complete answer's (a client parsing `""` as JSON fails)
                return [writer.chunk({"tool_calls": [{"index": position, "function": {"arguments": "{}"}}]})]
            return []
        if kind == "message_delta":
            self._usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            self._finish = FINISH_REASONS.get(str(reason), "stop")
            return [*self._role(writer), writer.chunk({}, self._finish)]
        if kind == "message_stop":
            if self._finish is None:
                raise _order("message_stop before message_delta")
            usage, shape = chat_usage(self._usage)
            return [UsageReport(usage, writer.usage_chunk(shape)), DONE]
        return []  # event types added later are skipped, as Anthropic's versioning policy asks

    def _role(self, writer: ChunkWriter) -> list[StreamEvent]:
        """OpenAI's first chunk (the role), once, before the first content."""
        if self._opened:
            return []
        self._opened = True
        return [writer.chunk({"role": "assistant", "content": ""})]

    def end(self) -> list[StreamEvent]:
        raise _order("the end of the stream before message_stop")


def _name(kind: Any) -> str:
    return kind if isinstance(kind, str) and kind.isidentifier() and len(kind) < 40 else "an unknown event"


def _order(what: str) -> StreamProtocolError:
    return StreamProtocolError(f"an event out of order ({what})")
