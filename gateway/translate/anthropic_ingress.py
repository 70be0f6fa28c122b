"""Anthropic's Messages API as an ingress: a Messages request in, the internal chat request out, and back.

`/v1/messages` clients (the Anthropic SDK) get the same policy as Chat
Completions clients: the request is translated once, at ingress, into the
OpenAI-shaped chat request every stage reads (auth, guards, limits, cache,
routing), and the answer, complete or streamed, is translated back at the edge.
Errors use Anthropic's envelope and statuses, so the SDK raises its matching
exception class.

Request: `system` becomes a system message; text, image (base64 or URL) and
`tool_result` blocks become message parts and `tool` messages; `tool_use` blocks
an assistant's `tool_calls`; tools, `tool_choice`, `stop_sequences`,
`metadata.user_id` (as `user`) and the sampling fields map to theirs. `thinking`
and `top_k` travel as they are (an Anthropic upstream uses them). Blocks with no
Chat Completions form (documents, search results, server tools) are a 400.

Stream: `MessagesStream` writes Anthropic's event sequence (message_start,
content_block_start / delta / stop, message_delta with the usage, message_stop)
from the chat chunks as they come, one block per text run or tool call.
"""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from ..errors import GatewayError, InvalidRequest
from ..pipeline.stages import TOO_DEEP, check_depth
from ..schemas.events import Chunk, StreamError, StreamEvent, UsageReport
from ..schemas.openai import ChatRequest, Usage
from .common import parse_arguments

__all__ = ["MessagesStream", "anthropic_error_body", "chat_request", "error_type", "messages_response"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                504: "timeout_error"}
_PASSED = ("temperature", "top_p", "top_k", "thinking", "stream")
_KNOWN = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "tools", "tool_choice",
                    "metadata", "service_tier", *_PASSED})


class MessagesRequest(msgspec.Struct, kw_only=True):
    """What is checked of a Messages request before translation (the rest is checked while translating)."""

    model: str
    max_tokens: int
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None


def error_type(error: GatewayError) -> str:
    return _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")


def anthropic_error_body(error: GatewayError) -> bytes:
    return _encode({"type": "error", "error": {"type": error_type(error), "message": error.message}})


def _checked(raw: bytes, shape: type[Any]) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    try:
        body = _decode(raw)
    except RecursionError as exc:
        raise InvalidRequest(TOO_DEEP) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_depth(raw, body)
    try:
        msgspec.convert(body, shape, str_keys=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `$")
        param = where.rstrip("`").lstrip(".") or None
        raise InvalidRequest(f"{message}" + (f" at `{param}`" if param else ""), param=param) from exc
    return body


def count_tokens_request(raw: bytes) -> dict[str, Any]:
    """A `count_tokens` body as a chat request (not sent anywhere: counted)."""
    body = _checked(raw, CountTokensRequest)
    return _translate({**body, "max_tokens": 1}, count_only=True)


def chat_request(raw: bytes) -> tuple[dict[str, Any], msgspec.Struct]:
    """A Messages request body as the internal chat request (dict and typed struct), or a 400."""
    body = _checked(raw, MessagesRequest)
    if body["max_tokens"] < 1:
        raise InvalidRequest("`max_tokens` must be at least 1", param="max_tokens")
    chat = _translate(body, count_only=False)
    try:
        typed = msgspec.convert(chat, ChatRequest, str_keys=True)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from exc
    return chat, typed


def _translate(body: dict[str, Any], *, count_only: bool) -> dict[str, Any]:
    for field in body:
        if field not in _KNOWN:
            raise InvalidRequest(f"`{field}` is not supported by this gateway's /v1/messages", param=field)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": system if isinstance(system, str) else _texts(system, "system")})
    for index, message in enumerate(body["messages"]):
        messages.extend(_message(message, index))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    for field in _PASSED:
        if body.get(field) is not None:
            chat[field] = body[field]
    if body.get("stream"):
        chat["stream_options"] = {"include_usage": True}
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        chat["tools"] = [_tool(tool, i) for i, tool in enumerate(body["tools"])]
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
        chat["tool_choice"] = mapped or {"type": "function", "function": {"name": choice.get("name")}}
        if kind == "tool" and not isinstance(choice.get("name"), str):
            raise InvalidRequest("`tool_choice.name` is required for type `tool`", param="tool_choice.name")
        if choice.get("disable_parallel_tool_use") and not count_only:
            chat["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    return chat


def _texts(blocks: Any, where: str) -> str:
    if not isinstance(blocks, list):
        raise InvalidRequest(f"`{where}` must be a string or a list of text blocks", param=where)
    parts = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(f"`{where}` may hold only text blocks", param=where)
        parts.append(block["text"])
    return "\n\n".join(parts)


def _message(message: Any, index: int) -> list[dict[str, Any]]:
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise InvalidRequest(f"`{where}.role` must be `user` or `assistant`", param=f"{where}.role")
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of blocks", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for position, block in enumerate(content):
        at = f"{where}.content.{position}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user" and isinstance(block.get("source"), dict):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block["source"], at)}})
        elif kind == "tool_use" and role == "assistant":
            calls.append({"id": str(block.get("id")), "type": "function", "function": {
                "name": block.get("name"), "arguments": _encode(block.get("input") or {}).decode()}})
        elif kind == "tool_result" and role == "user":
            inner = block.get("content")
            text = inner if isinstance(inner, str) else _texts(inner or [], f"{at}.content")
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")), "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # the model's own reasoning: Chat Completions has no place for it in the history
        else:
            raise InvalidRequest(f"`{at}`: a `{kind}` block is not supported here by this gateway", param=at)
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        reply: dict[str, Any] = {"role": "assistant", "content": _plain(parts)}
        if calls:
            reply["tool_calls"] = calls
        if parts or calls:
            out.append(reply)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _plain(parts: list[dict[str, Any]]) -> str | None:
    return "".join(p["text"] for p in parts) if parts else None


def _image_url(source: dict[str, Any], where: str) -> str:
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequest(f"`{where}.source` must be a base64 or url image source", param=f"{where}.source")


def _tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or tool.get("type") not in (None, "custom"):
        raise InvalidRequest(f"`tools.{index}`: only custom tools (name, input_schema) are supported",
                             param=f"tools.{index}")
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


# -- the answer ---------------------------------------------------------------------------------------


def _anthropic_usage(usage: Any) -> dict[str, Any]:
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    found = usage.get("prompt_tokens_details")
    details: dict[str, Any] = found if isinstance(found, dict) else {}
    read = details.get("cached_tokens") or 0
    written = details.get("cache_write_tokens") or 0
    prompt = usage.get("prompt_tokens") or 0
    out = {"input_tokens": max(0, prompt - read - written), "output_tokens": usage.get("completion_tokens") or 0}
    if read or written:
        out["cache_read_input_tokens"] = read
        out["cache_creation_input_tokens"] = written
    return out


def _usage_shape(usage: Usage | None) -> dict[str, Any]:
    if usage is None:
        return {"input_tokens": 0, "output_tokens": 0}
    return {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}


def _message_id(chat_id: Any) -> str:
    text = str(chat_id) if isinstance(chat_id, str) else ""
    return text if text.startswith("msg_") else "msg_" + (text.removeprefix("chatcmpl-") or secrets.token_hex(12))


def messages_response(body: bytes, alias: str) -> bytes:
    """A `chat.completion` as Anthropic's `message` (the model named as the client asked for it)."""
    data = _decode(body)
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": _tool_input(function.get("arguments"))})
    return _encode({
        "id": _message_id(data.get("id")), "type": "message", "role": "assistant", "model": alias,
        "content": content, "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None, "usage": _anthropic_usage(data.get("usage")),
    })


def _tool_input(arguments: Any) -> Any:
    try:
        value = parse_arguments(arguments, "tool_calls")
    except InvalidRequest:
        return {"_raw_arguments": arguments}  # the model wrote invalid JSON: kept, visibly, rather than lost
    return value if isinstance(value, dict) else {"value": value}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode({"type": kind, **data}) + b"\n\n"


class MessagesStream:
    """Per stream: chat chunks in, Anthropic's SSE event sequence out (framed, ready to send)."""

    __slots__ = ("_alias", "_block", "_finish", "_index", "_started", "_stopped", "_tools", "_usage")

    def __init__(self, alias: str) -> None:
        self._alias = alias
        self._started = False
        self._stopped = False
        self._index = -1  # the open content block (-1: none)
        self._block: str | None = None  # "text", or "tool:<n>" for the chat tool call n
        self._tools: set[int] = set()
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None

    def frame(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if isinstance(event, Chunk):
                self._chunk(event.data(), out)
            elif isinstance(event, UsageReport):
                self._usage = _anthropic_usage(_decode(event.payload).get("usage")) if event.payload else \
                    _usage_shape(event.usage)
            elif isinstance(event, StreamError):
                out.append(_event("error", {"error": {"type": error_type(event.error),
                                                      "message": event.error.message}}))
                self._stopped = True
            elif not self._stopped:
                self._start(out, None)
                self._close(out)
                usage = self._usage or {"input_tokens": 0, "output_tokens": 0}
                out.append(_event("message_delta", {
                    "delta": {"stop_reason": STOP_REASONS.get(str(self._finish), "end_turn"), "stop_sequence": None},
                    "usage": usage}))
                out.append(_event("message_stop", {}))
                self._stopped = True
        return b"".join(out)

    def _start(self, out: list[bytes], chat_id: Any) -> None:
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"message": {
                "id": _message_id(chat_id), "type": "message", "role": "assistant", "model": self._alias,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))

    def _close(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(_event("content_block_stop", {"index": self._index}))
            self._block = None

    def _open(self, out: list[bytes], block: str, content: dict[str, Any]) -> None:
        self._close(out)
        self._index += 1
        self._block = block
        out.append(_event("content_block_start", {"index": self._index, "content_block": content}))

    def _chunk(self, data: dict[str, Any], out: list[bytes]) -> None:
        self._start(out, data.get("id"))
        for choice in data.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block != "text":
                    self._open(out, "text", {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {"index": self._index,
                                                          "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or ():
                position = call.get("index", 0)
                function = call.get("function") or {}
                if position not in self._tools:
                    self._tools.add(position)
                    self._open(out, f"tool:{position}", {"type": "tool_use", "id": call.get("id"),
                                                         "name": function.get("name"), "input": {}})
                elif self._block != f"tool:{position}":
                    continue  # a piece of a tool call whose block is closed: Messages cannot reopen it
                arguments = function.get("arguments")
                if isinstance(arguments, str) and arguments:
                    out.append(_event("content_block_delta", {
                        "index": self._index, "delta": {"type": "input_json_delta", "partial_json": arguments}}))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        if isinstance(data.get("usage"), dict):
            self._usage = _anthropic_usage(data["usage"])
