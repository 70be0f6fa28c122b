"""Chat Completions to Anthropic's Messages API and back: pure functions and a per-stream translator.

Request: system and developer messages become `system`; text and image parts
become content blocks (a `data:` URL a base64 image, any other URL an image by
URL); an assistant's `tool_calls` become `tool_use` blocks and `tool` messages
`tool_result` blocks (consecutive ones in one user turn, as Anthropic wants);
tools, `tool_choice`, `parallel_tool_calls`, `stop`, `user` and `safety_identifier`
(`metadata.user_id`: the client's own `metadata.user_id` first, then
`safety_identifier`, then the deprecated `user`), JSON mode (as an instruction in
`system`: Messages has no JSON mode) and `max_tokens` (the provider's default when
the client gave none) are translated; `prompt_cache_key` (OpenAI's own cache
routing) is left out. A field Messages has no equivalent for (`n > 1`,
`logprobs`, penalties, `seed`, audio...) is a 400 naming it, never a silent drop.

What Messages refuses is not sent: empty or whitespace-only text (a part, a
`content: ""`, the `"\n\n"` some servers put beside `tool_calls`, a tool result's) is left out,
and a turn left empty with it (an assistant's: its neighbours join; a user's that
joins another user message) goes; a user turn left empty between two assistant
turns, or at either end, is refused (`Unsupported`: routing tries the next
target), never filled with invented text. A whitespace-only stop sequence is
dropped; `top_p` is dropped when `temperature` is set (newer Claude models refuse
both); an image's `data:` URL must be JPEG (`image/jpg` is read so), PNG, GIF or
WebP (else `Unsupported`). `cache_control` (Anthropic's prompt caching, in LiteLLM's places: on a
part, a message, a tool call or a tool) goes on the matching block. An assistant's thinking
(`reasoning_content` with `reasoning_blocks`, see `thinking.py`) goes back as its `thinking` and
`redacted_thinking` blocks, before its text and tool calls; reasoning without them has no signature and is
left out.

Tool call ids, which Messages checks (each `tool_use` id unique, each `tool_result` answering a `tool_use` of the turn
before it): a call without an id gets `toolu_<message>_<position>`, and a result without one answers the first call
of the assistant turn before it that had no id and has no result yet (none left: `Unsupported`); a call whose id an
earlier call already had (older gateway versions gave Gemini's calls `call_0`, `call_1`... in every turn) is sent as
`<id>_<n>` (the first n not taken), and the results after it with that id answer it, one result a call, in order.
An id with characters outside Messages' alphabet (`[a-zA-Z0-9_-]`: Kimi's `functions.get_weather:0`, `call 1`) is sent
with each of them as `_` (then made unique as above), its results with the id its call was sent with.
A request with nothing but system and developer messages is `Unsupported` (Messages needs a turn; OpenAI answers
it, so routing's next target may), never sent with invented text.

The answer, complete or streamed, is translated back in `anthropic_to_chat.py`
(its names are re-exported here).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import InvalidRequest, Unsupported
from .anthropic_to_chat import FINISH_REASONS, AnthropicEvents, chat_completion, chat_usage
from .cache_control import CACHE, CACHE_MARK
from .common import ANTHROPIC_ONLY, BETA, data_url, json_instruction, parse_arguments, tool_calls_of, unsupported
from .thinking import BLOCKS, REASONING, messages_blocks, ordered

__all__ = ["FINISH_REASONS", "AnthropicEvents", "anthropic_request", "chat_completion", "chat_usage"]

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
    "store", "service_tier", "safety_identifier", "prompt_cache_key", CACHE_MARK, BETA, ANTHROPIC_ONLY,
})
# The image types Messages takes (`image/jpg` is read as `image/jpeg`: `common.data_url`).
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# Messages' own fields, passed as they are (a target's `extra_body` may set them).
_NATIVE = frozenset({"top_k", "thinking"})
# A character Messages refuses in a `tool_use` id or a `tool_use_id` ("String should match pattern
# '^[a-zA-Z0-9_-]+$'"): other APIs' ids have them (Kimi's `functions.get_weather:0`).
_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]")


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
    ids = _ToolIds()
    for index, message in enumerate(body["messages"]):
        _add_message(message, index, system, messages, ids, target)
    if not messages:  # Messages refuses `messages: []` (a 400 the client would get as the upstream's): the next
        # target (an OpenAI one answers a system prompt alone) is tried; a turn made up here would be invented text
        raise unsupported("messages", target, "a request with only system or developer messages (Messages needs a "
                                              "user or assistant message)")
    for turn in messages:
        if not turn["content"]:  # a user turn with no text, between two assistant turns or at an end: dropping it
            # would join the assistant turns (or make the request a prefill); Messages refuses an empty turn
            raise unsupported("messages", target, "a user message with no content (empty or only whitespace) "
                                                  "that is not next to another user message")
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
            raise Unsupported(f"`temperature` above 1 is not supported by {target} (Messages allows 0 to 1)",
                              param="temperature")
        out["temperature"] = temperature
    if body.get("top_p") is not None and temperature is None:  # newer Claude models refuse both together
        out["top_p"] = body["top_p"]
    stop = body.get("stop")
    if stop:  # a whitespace-only sequence is refused ("each stop sequence must contain non-whitespace"): dropped
        sequences = [one for one in ([stop] if isinstance(stop, str) else stop) if not isinstance(one, str) or
                     one.strip()]
        if sequences:
            out["stop_sequences"] = sequences
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
    metadata = body.get("metadata")
    user_id = ((metadata.get("user_id") if isinstance(metadata, dict) else None) or body.get("safety_identifier")
               or body.get("user"))
    if user_id:
        out["metadata"] = {"user_id": str(user_id)}
    for field in _NATIVE:
        if field in body:
            out[field] = body[field]
    return out


class _ToolIds:
    """The `tool_use` ids of one request, so that each is unique and each result names its call's (see the module's
    docstring): Messages refuses a repeated id, and a result whose id names no call of the turn before it."""

    __slots__ = ("open", "used")

    def __init__(self) -> None:
        self.used: set[str] = set()  # every `tool_use` id sent so far
        # The calls of the last assistant turn not answered yet: the client's id ("" for none) -> ids sent, in order.
        self.open: dict[str, list[str]] = {}

    def unique(self, wanted: str) -> str:
        """`wanted` in Messages' alphabet (`_sendable`), or `<that>_<n>` when an earlier call took it (the same for
        the same history)."""
        wanted = _sendable(wanted)
        sent, n = wanted, 1
        while sent in self.used:
            sent, n = f"{wanted}_{n}", n + 1
        self.used.add(sent)
        return sent


def _sendable(given: str) -> str:
    """A client's tool call id as Messages takes it: each character outside its alphabet replaced by `_`."""
    return _NOT_ID.sub("_", given)


def _add_message(message: Any, index: int, system: list[dict[str, Any]], messages: list[dict[str, Any]],
                 ids: _ToolIds, target: str) -> None:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise InvalidRequest(f"`{where}` must be an object", param=where)
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        system.extend(_cached(_blocks(content, where, target, images=False), message))
        return
    if role == "user":
        _append(messages, "user", _cached(_blocks(content, where, target, images=True), message))
        return
    if role == "assistant":
        blocks = _blocks(content, where, target, images=False) if content else []
        tools: list[dict[str, Any]] = []
        calls: list[tuple[str, str]] = []  # (the client's id or "", the id sent)
        for position, call in enumerate(tool_calls_of(message, where)):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"`{where}.tool_calls.{position}` needs a function name",
                                     param=f"{where}.tool_calls")
            given = str(call.get("id") or "")
            calls.append((given, ids.unique(given or f"toolu_{index}_{position}")))
            tools.append(_cached([{"type": "tool_use", "id": calls[-1][1], "name": function["name"],
                                   "input": parse_arguments(function.get("arguments"),
                                                            f"{where}.tool_calls.{position}")}], call)[0])
        _cached([*blocks, *tools], message)
        if BLOCKS in message:  # Anthropic's own thinking, sent back with its signatures before the tool calls
            blocks = ordered(messages_blocks(message.get(REASONING), message[BLOCKS], signed_only=True), blocks, tools)
        else:  # reasoning without a signature (another model's) cannot be sent back: Anthropic would refuse it
            blocks.extend(tools)
        if blocks:
            if ids.open and messages[-1]["role"] != "assistant":  # a new assistant turn: results answer its calls
                ids.open.clear()
            _append(messages, "assistant", blocks)
        for given, sent in calls:
            ids.open.setdefault(given, []).append(sent)
        return
    if role == "tool":
        given = str(message.get("tool_call_id") or "")
        waiting = ids.open.get(given)
        if not waiting and not given:
            raise unsupported(f"{where}.tool_call_id", target, "a tool result without a `tool_call_id` that no "
                              "tool call without an id, in the assistant turn before it, is left for")
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": waiting.pop(0) if waiting else _sendable(given)}
        # Empty or whitespace-only text (a command's "\n"), a string or parts (`_blocks`), is no `content` at all
        parts: str | list[dict[str, Any]] = (content if content.strip() else "") if isinstance(content, str) \
            else _blocks(content, where, target, images=True)
        if parts:
            result["content"] = parts
        _append(messages, "user", _cached([result], message))
        return
    raise unsupported(f"{where}.role", target, f"role `{role}`")


def _cached(blocks: list[dict[str, Any]], holder: dict[str, Any]) -> list[dict[str, Any]]:
    """`blocks`, the last with `holder`'s `cache_control` (a message's or a tool call's) when it has one."""
    control = holder.get(CACHE)
    if isinstance(control, dict) and blocks:
        blocks[-1][CACHE] = control
    return blocks


def _append(messages: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one turn (Messages alternates user and assistant)."""
    if messages and messages[-1]["role"] == role:
        messages[-1]["content"].extend(blocks)
    else:  # (an empty user turn is kept here: a next user message fills it, else `anthropic_request` refuses it)
        messages.append({"role": role, "content": blocks})


def _blocks(content: Any, where: str, target: str, *, images: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):  # empty or whitespace-only text is refused by Messages: left out
        return [{"type": "text", "text": content}] if content.strip() else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of parts", param=f"{where}.content")
    blocks: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                blocks.append(_cached([{"type": "text", "text": part["text"]}], part)[0])
        elif kind == "image_url" and images:
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise InvalidRequest(f"`{where}.content.{position}.image_url.url` is missing",
                                     param=f"{where}.content")
            inline = data_url(url)
            if inline and inline[0] not in _IMAGE_TYPES:
                raise unsupported(f"{where}.content.{position}", target, f"an image of type `{inline[0]}` (Messages "
                                  "takes image/jpeg, image/png, image/gif and image/webp)")
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append(_cached([{"type": "image", "source": source}], part)[0])
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
    return _cached(_cached([out], function), tool)[0]


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
