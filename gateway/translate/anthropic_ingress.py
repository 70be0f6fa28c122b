"""Anthropic's Messages API as an ingress: a Messages request in, the internal chat request out, and back.

`/v1/messages` clients (the Anthropic SDK) get the same policy as Chat
Completions clients: the request is translated once, at ingress, into the
OpenAI-shaped chat request every stage reads (auth, guards, limits, cache,
routing), and the answer, complete or streamed, is translated back at the edge.
Errors use Anthropic's envelope and statuses (`anthropic_errors.py`), so the SDK
raises its matching exception class.

Request: `system` becomes a system message; text, image (base64 or URL) and
`tool_result` blocks become message parts and `tool` messages; `tool_use` blocks
an assistant's `tool_calls` (a Gemini thought signature carried in the id, `tool_id_signature`, back on the call's
`extra_content`); `thinking` and `redacted_thinking` blocks the
assistant's `reasoning_content` and `reasoning_blocks` (see `thinking.py`); tools,
`tool_choice`, `stop_sequences`, `metadata.user_id` (as `user`) and the sampling
fields map to theirs, their types checked as the body is decoded (`CountTokensRequest`):
a mistyped field is a 400 naming it, as Anthropic answers. `thinking` and `top_k` travel
as they are, for an Anthropic upstream only: named in `common.ANTHROPIC_ONLY` (with
the mark), every other provider removes them. No `stream_options` is set: each provider asks for a
stream's usage as it does for Chat Completions clients. Blocks with no
Chat Completions form (documents, search results, server tools) are a 400; so is
`thread` (server-side message threads), with the `details` that tell the Anthropic
SDK to go on without it (`ThreadUnsupported`).
`cache_control` is kept where LiteLLM's clients put it (see `cache_control.py`),
for an Anthropic upstream; every other provider removes it, and the thinking's
fields with it (the body is marked when it has either).

The answer, complete (`messages_response`) or streamed (`MessagesStream`), is
translated back in `anthropic_answer.py`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ..errors import InvalidRequest
from ..pipeline.stages import TOO_DEEP, check_containers, check_depth
from ..sanitize import printable, validation_error
from ..schemas.openai import ChatRequest
from .anthropic_errors import ThreadUnsupported, anthropic_error_body, error_type
from .cache_control import CACHE, CACHE_MARK
from .common import ANTHROPIC_ONLY
from .thinking import Thinking
from .tool_id_signature import unsigned

__all__ = ["anthropic_error_body", "chat_request", "count_tokens_request", "error_type"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
_PASSED = ("temperature", "top_p", "top_k", "thinking", "stream")
_ANTHROPIC_ONLY = ("top_k", "thinking")  # for an Anthropic upstream only (`common.ANTHROPIC_ONLY`)
_KNOWN = frozenset({"model", "messages", "max_tokens", "system", "stop_sequences", "tools", "tool_choice",
                    "metadata", "service_tier", *_PASSED})
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # and `tool`: the function named
_MIN_THINKING_BUDGET = 1024


class _Tool(msgspec.Struct, kw_only=True):
    """A tool's translated fields, typed (a server tool's `type` is refused while translating, `_tool`)."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None


class _ToolChoiceAuto(msgspec.Struct, kw_only=True, tag_field="type", tag="auto"):
    disable_parallel_tool_use: bool | None = None


class _ToolChoiceAny(msgspec.Struct, kw_only=True, tag_field="type", tag="any"):
    disable_parallel_tool_use: bool | None = None


class _ToolChoiceTool(msgspec.Struct, kw_only=True, tag_field="type", tag="tool"):
    name: str
    disable_parallel_tool_use: bool | None = None


class _ToolChoiceNone(msgspec.Struct, tag_field="type", tag="none"):
    pass


class _Metadata(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class _ThinkingConfig(msgspec.Struct, kw_only=True):
    """`enabled` with its budget, `disabled`, or a newer type (`adaptive`, `between_tools` in SDK 2.17): `thinking`
    goes as it is to an Anthropic upstream only (every other provider removes it), which judges a type the gateway
    does not know; refusing it here would refuse what newer SDKs send. A missing `type` passes as before."""

    type: str | None = None
    budget_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.type == "enabled" and (self.budget_tokens is None or self.budget_tokens < _MIN_THINKING_BUDGET):
            raise ValueError(f"`thinking.budget_tokens` must be an integer of at least {_MIN_THINKING_BUDGET} when "
                             "`thinking.type` is `enabled`")


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """What is checked of a `count_tokens` request as it is decoded: the types of the fields read (a message's blocks
    are checked while translating). A mistyped field is a 400 naming it, as Anthropic's own API answers, rather than
    a value dropped or made up on the way (a null tool name, a dropped `metadata.user_id`)."""

    model: str
    messages: list[dict[str, Any]]
    system: str | list[dict[str, Any]] | None = None
    tools: list[_Tool] | None = None
    stop_sequences: list[str] | None = None
    tool_choice: _ToolChoiceAuto | _ToolChoiceAny | _ToolChoiceTool | _ToolChoiceNone | None = None
    metadata: _Metadata | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    thinking: _ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    """What is checked of a Messages request as it is decoded (as `CountTokensRequest`), with Anthropic's own
    ranges: `temperature` and `top_p` from 0 to 1 (a Chat Completions target takes a temperature to 2, so 1.5
    would have passed to one), `max_tokens` at least 1 and above an enabled thinking budget."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1)]
    stream: bool | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None

    def __post_init__(self) -> None:
        thinking = self.thinking
        if thinking is not None and thinking.type == "enabled" and (thinking.budget_tokens or 0) >= self.max_tokens:
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")


def _checked(raw: bytes, shape: type[Any]) -> dict[str, Any]:
    if not raw:
        raise InvalidRequest("the request body is empty; expected a JSON object")
    check_containers(raw)
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
        message, where = validation_error(exc)  # msgspec quotes the bad value: bounded, printable
        param = where.replace("[", ".").replace("]", "").lstrip(".") or None  # `tools.0`, as elsewhere
        raise InvalidRequest(f"{message}" + (f" at `{param}`" if param else ""), param=param) from exc
    return body


def count_tokens_request(raw: bytes) -> dict[str, Any]:
    """A `count_tokens` body as a chat request (not sent anywhere: counted), with the thinking that Anthropic counts
    only: that of the current assistant turn (`_current_turn`); earlier turns' thinking blocks are checked, then
    left out, as Anthropic strips them from the input."""
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
        message, at = validation_error(exc)  # (of the translated request: no `param` of the client's)
        raise InvalidRequest(f"invalid request: {message}" + (f" at `{at}`" if at else "")) from exc
    return chat, typed


class _Cache:
    """Where a request's `cache_control` goes: kept (and counted) for a request sent upstream, else dropped."""

    __slots__ = ("count", "keep", "thinking")

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.count = 0
        self.thinking = False  # an assistant turn has thinking blocks (`reasoning_blocks`): marked as well

    def carry(self, block: dict[str, Any], into: dict[str, Any], where: str) -> dict[str, Any]:
        """`into`, with `block`'s `cache_control` when it has one (an object, as Anthropic wants)."""
        control = block.get(CACHE)
        if control is None or not self.keep:
            return into
        if not isinstance(control, dict):
            raise InvalidRequest(f"`{where}.cache_control` must be an object", param=f"{where}.cache_control")
        self.count += 1
        into[CACHE] = control
        return into


def _translate(body: dict[str, Any], *, count_only: bool) -> dict[str, Any]:
    for field in body:
        if field not in _KNOWN:
            if field == "thread":  # (the SDK's tool runner sends it by default, and goes on without when told so)
                raise ThreadUnsupported()
            field = printable(field)
            raise InvalidRequest(f"`{field}` is not supported by this gateway's /v1/messages", param=field)
    cache = _Cache(keep=not count_only)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system",
                         "content": system if isinstance(system, str) else _system(system, cache)})
    current = _current_turn(body["messages"]) if count_only else 0
    last = len(body["messages"]) - 1
    for index, message in enumerate(body["messages"]):
        messages.extend(_message(message, index, cache, index >= current, final=index == last))
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "max_tokens": body["max_tokens"]}
    for field in _PASSED:
        if body.get(field) is not None:
            chat[field] = body[field]
    # No `stream_options`: each provider asks for a stream's usage itself when its upstream takes the field
    # (`OpenAICompatProvider._asks_for_usage`); without it, the answer's usage is the gateway's own count.
    native = [field for field in _ANTHROPIC_ONLY if body.get(field) is not None] if not count_only else None
    if native:  # Anthropic's only: every other provider removes them (`cache_control.without_cache_control`)
        chat[ANTHROPIC_ONLY], chat[CACHE_MARK] = native, True
    if body.get("stop_sequences"):
        chat["stop"] = list(body["stop_sequences"])
    if body.get("tools"):
        chat["tools"] = [_tool(tool, i, cache) for i, tool in enumerate(body["tools"])]
    choice = body.get("tool_choice")  # typed: `CountTokensRequest`
    if choice is not None:
        chat["tool_choice"] = _TOOL_CHOICES.get(choice["type"]) or {"type": "function",
                                                                    "function": {"name": choice["name"]}}
        if choice.get("disable_parallel_tool_use") and not count_only:
            chat["parallel_tool_calls"] = False
    user = (body.get("metadata") or {}).get("user_id")
    if user is not None:
        chat["user"] = user
    if cache.count or cache.thinking:
        chat[CACHE_MARK] = True  # a provider other than Anthropic's removes them (and this mark) before sending
    return chat


def _system(blocks: Any, cache: _Cache) -> str | list[dict[str, Any]]:
    """The system blocks' text joined; as text parts when one of them carries `cache_control` (kept on its part)."""
    if not isinstance(blocks, list):
        raise InvalidRequest("`system` must be a string or a list of text blocks", param="system")
    parts: list[dict[str, Any]] = []
    for position, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest("`system` may hold only text blocks", param="system")
        parts.append(cache.carry(block, {"type": "text", "text": block["text"]}, f"system.{position}"))
    if any(CACHE in part for part in parts):
        return parts
    return "\n\n".join(part["text"] for part in parts)


def _current_turn(messages: list[Any]) -> int:
    """Where the current assistant turn begins: after the last user message without a `tool_result` block (one
    with results goes on the turn whose tool calls they answer, as in Anthropic's tool loop: taken generously, with
    any text beside its results). 0 when there is none."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if not isinstance(content, list) or not any(
                isinstance(block, dict) and block.get("type") == "tool_result" for block in content):
            return index + 1
    return 0


def _message(message: Any, index: int, cache: _Cache, thought: bool = True, *, final: bool = False,
             ) -> list[dict[str, Any]]:
    """A Messages message as chat messages; `thought`: with its thinking (else checked and left out). Empty content
    (`""`, `[]`) is a 400 naming it, as Anthropic answers, except on the final assistant message (Anthropic's empty
    prefill, the same as none): left out, a message would change the conversation (two turns of a role joined, the
    last user turn gone and the assistant's before it taken for a prefill, a conversation begun by the assistant)."""
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise InvalidRequest(f"`{where}.role` must be `user` or `assistant`", param=f"{where}.role")
    role, content = message["role"], message.get("content")
    if (content == "" or content == []) and not (final and role == "assistant"):
        raise InvalidRequest(f"`{where}.content`: all messages must have non-empty content except for the optional "
                             "final assistant message", param=f"{where}.content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of blocks", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    thinking = Thinking()
    for position, block in enumerate(content):
        at = f"{where}.content.{position}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(cache.carry(block, {"type": "text", "text": block["text"]}, at))
        elif kind == "image" and role == "user" and isinstance(block.get("source"), dict):
            url = _image_url(block["source"], at)
            parts.append(cache.carry(block, {"type": "image_url", "image_url": {"url": url}}, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append(cache.carry(block, _call(block, at), at))
        elif kind == "tool_result" and role == "user":
            inner = block.get("content")
            result = inner if isinstance(inner, str) else _result_content(inner or [], f"{at}.content", cache)
            if block.get("is_error"):
                result = _as_error(result)
            answered = unsigned(_string(block, "tool_use_id", at))[0]
            results.append(cache.carry(block, {"role": "tool", "tool_call_id": answered, "content": result}, at))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            if not thinking.add(block, len(calls)):  # kept for an Anthropic upstream, which checks the signatures
                field = "thinking` and `signature" if kind == "thinking" else "data"
                raise InvalidRequest(f"`{at}`: a `{kind}` block needs `{field}` as strings", param=at)
        else:
            kind = printable(str(kind))
            raise InvalidRequest(f"`{at}`: a `{kind}` block is not supported here by this gateway", param=at)
    out: list[dict[str, Any]] = list(results)
    if role == "assistant":
        reply: dict[str, Any] = {"role": "assistant", "content": _plain(parts) if all(CACHE not in p for p in parts)
                                 else parts}
        if calls:
            reply["tool_calls"] = calls
        if thought and thinking.put(reply):
            cache.thinking = True
        if parts or calls or (thought and thinking.entries):
            out.append(reply)
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _call(block: dict[str, Any], at: str) -> dict[str, Any]:
    """A `tool_use` block as a tool call. Its `id` and `name` are required, as Anthropic requires them (a missing
    one went on as the text "None" or a null name); a missing or null `input` is an empty object, as before. A
    Gemini thought signature in the id (`tool_id_signature.unsigned`) goes back where Gemini's translator reads it."""
    arguments = block.get("input")
    if arguments is not None and not isinstance(arguments, dict):
        raise InvalidRequest(f"`{at}.input` must be an object", param=f"{at}.input")
    id_, signature = unsigned(_string(block, "id", at))
    call = {"id": id_, "type": "function",
            "function": {"name": _string(block, "name", at), "arguments": _encode(arguments or {}).decode()}}
    if signature is not None:
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _string(block: dict[str, Any], field: str, at: str) -> str:
    """A block's required string field, or a 400 naming it."""
    value = block.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(f"`{at}.{field}` is required and must be a string", param=f"{at}.{field}")
    return value


def _result_content(blocks: Any, where: str, cache: _Cache) -> str | list[dict[str, Any]]:
    """A `tool_result`'s blocks as a `tool` message's content: their text joined, as every upstream takes it; with
    an image among them, text and `image_url` parts, which an Anthropic upstream gets back inside its
    `tool_result` (an OpenAI-compatible upstream gets them as they are: OpenAI's own API refuses them there);
    text parts too when one carries `cache_control`."""
    if not isinstance(blocks, list):
        raise InvalidRequest(f"`{where}` must be a string or a list of text and image blocks", param=where)
    parts: list[dict[str, Any]] = []
    for position, block in enumerate(blocks):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(cache.carry(block, {"type": "text", "text": block["text"]}, f"{where}.{position}"))
        elif kind == "image" and isinstance(block.get("source"), dict):
            url = _image_url(block["source"], f"{where}.{position}")
            parts.append(cache.carry(block, {"type": "image_url", "image_url": {"url": url}}, f"{where}.{position}"))
        else:
            raise InvalidRequest(f"`{where}` may hold only text and image blocks", param=where)
    if all(part["type"] == "text" and CACHE not in part for part in parts):
        return "\n\n".join(part["text"] for part in parts)
    return parts


def _as_error(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """An `is_error` result: Chat Completions has no flag for it, so its text says it."""
    if isinstance(content, str):
        return f"Error: {content}"
    if content and content[0]["type"] == "text":
        return [{**content[0], "text": f"Error: {content[0]['text']}"}, *content[1:]]
    return [{"type": "text", "text": "Error:"}, *content]


def _plain(parts: list[dict[str, Any]]) -> str | None:
    return "".join(p["text"] for p in parts) if parts else None


def _image_url(source: dict[str, Any], where: str) -> str:
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequest(f"`{where}.source` must be a base64 or url image source", param=f"{where}.source")


def _tool(tool: dict[str, Any], index: int, cache: _Cache) -> dict[str, Any]:
    """A custom tool (its fields typed: `_Tool`) as a function tool; a server tool (another `type`) is a 400."""
    if tool.get("type") not in (None, "custom"):
        raise InvalidRequest(f"`tools.{index}`: only custom tools (name, input_schema) are supported",
                             param=f"tools.{index}")
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    return cache.carry(tool, {"type": "function", "function": function}, f"tools.{index}")
