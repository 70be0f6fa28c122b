"""A stored stream as the complete answer a non-streamed request gets, and what both conversions check.

The chunks' texts (`content`, `refusal`, `reasoning_content`, `reasoning`) are
joined per choice and function tool calls per index (else per place in the chunk's
list; another id at an index is not joined: `Unconvertible`), as the SDKs join them;
Anthropic's `reasoning_blocks` entries (`translate/thinking.py`: each whole, at the
next `index`, or without one in entries stored before they had it) are listed in
order, without their `index`, as the complete message has them; the
usage is the upstream's own object, from its usage-only chunk or the content
chunk it rode on. A conversion is exact or it is not made: anything the other
form would not carry as it is raises `Unconvertible` (see `replay`). A chunk of
the usual shape is read as a typed struct (`_Piece`: about twice as fast as a
dict, and a stream has a chunk per token or so); any other is read field by
field, and fails on the first field the complete answer would not carry.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..schemas.endpoints import Endpoint
from ..schemas.events import begins_another_call
from ..schemas.openai import Usage
from ..translate.thinking import BLOCKS
from .entry import Entry

__all__ = ["BLOCKS", "CALL", "CHAT_CHOICE", "MESSAGE", "TEXTS", "TEXT_CHOICE", "TOP", "Unconvertible", "assemble_body",
           "chunk_base", "encode", "function_call", "int_field", "json_list", "json_object", "only", "reported_usage",
           "text_field"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
encode = msgspec.json.Encoder().encode
_BASE_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
TEXTS = ("content", "refusal", "reasoning_content", "reasoning")  # joined piece by piece
_TEXT_NAMES = frozenset(TEXTS)
_BASE_SET = frozenset(_BASE_FIELDS)
_EMPTY: tuple[Any, ...] = (None, [], {})
TOP = frozenset({*_BASE_FIELDS, "object", "choices", "usage"})
_CHUNK_TOP = TOP | {"obfuscation"}  # OpenAI's random padding of stream chunks: not part of the answer
CHAT_CHOICE = frozenset({"index", "message", "logprobs", "finish_reason"})
TEXT_CHOICE = frozenset({"index", "text", "logprobs", "finish_reason"})
MESSAGE = frozenset({"role", *TEXTS, "tool_calls", BLOCKS})
CALL = frozenset({"id", "type", "function"})
_CALL_PIECE = CALL | {"index"}
_FUNCTION = frozenset({"name", "arguments"})


class _Delta(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None
    reasoning_blocks: list[Any] | None = None


class _Choice(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    index: int = 0
    delta: _Delta | None = None
    logprobs: Any = None
    finish_reason: str | None = None


class _Piece(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A chat chunk of the usual shape, every field one the complete answer carries (else: read as a dict)."""

    id: Any = None
    object: Any = None
    created: Any = None
    model: Any = None
    system_fingerprint: Any = None
    service_tier: Any = None
    obfuscation: Any = None
    choices: list[_Choice] | None = None
    usage: Any = None


_decode_piece = msgspec.json.Decoder(_Piece).decode


class Unconvertible(Exception):
    """The stored answer holds something the other form would not carry exactly: the hit is served as a miss."""


def json_object(payload: bytes) -> dict[str, Any]:
    try:
        return _decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        raise Unconvertible("not a JSON object") from None


def only(data: Any, known: frozenset[str]) -> dict[str, Any]:
    """`data`, a JSON object whose fields other than the `known` ones are all empty (null, [], {})."""
    if not isinstance(data, dict):
        raise Unconvertible("not an object")
    for name, value in data.items():
        if name not in known and value not in _EMPTY:
            raise Unconvertible(name)
    return data


def text_field(data: dict[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or isinstance(value, str):
        return value
    raise Unconvertible(name)


def int_field(data: dict[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if type(value) is not int:
        raise Unconvertible(name)
    return value


def json_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unconvertible("not a list")
    return value


def chunk_base(data: dict[str, Any], obj: str) -> dict[str, Any]:
    base = {name: data[name] for name in _BASE_FIELDS if data.get(name) is not None}
    return {"id": base.pop("id", "cached"), "object": obj, **base}


def function_call(call: Any, known: frozenset[str]) -> dict[str, Any]:
    """A function tool call (or a piece of one) whose name and arguments are strings."""
    only(call, known)
    text_field(call, "id")
    if call.get("type") not in (None, "function"):
        raise Unconvertible("type")
    function = call.get("function")
    if function is not None:
        only(function, _FUNCTION)
        text_field(function, "name")
        text_field(function, "arguments")
    return call  # type: ignore[no-any-return]


def assemble_body(entry: Entry, endpoint: Endpoint) -> bytes:
    """A stored stream as the complete answer a non-streamed request would have got. `Unconvertible` when the
    complete answer would not carry it exactly, or holds a value nested too deep to read or write here: the check
    of a stored answer (`entry.holds_answer`) ran on another stack, shallower or in a thread, and decoding and
    encoding nest as deep as the value."""
    try:
        return _assemble(entry, endpoint)
    except RecursionError:
        raise Unconvertible("nested too deep") from None


def _assemble(entry: Entry, endpoint: Endpoint) -> bytes:
    chat = endpoint is Endpoint.CHAT
    choices: dict[int, dict[str, Any]] = {}
    base: dict[str, Any] = {}
    usage: Any = None
    for payload in entry.chunks:
        if chat:
            try:
                piece = _decode_piece(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass  # not the usual shape: read field by field below
            else:
                for name in _BASE_FIELDS:
                    if name not in base and (value := getattr(piece, name)) is not None:
                        base[name] = value
                if piece.usage is not None:
                    usage = piece.usage
                for typed in piece.choices or ():
                    _merge_typed(choices, typed)
                continue
        for name, value in json_object(payload).items():  # each field read once: a stream has a chunk per token or so
            if name == "choices":
                for choice in json_list(value):
                    _merge(choices, choice, chat)
            elif value is None:
                continue
            elif name in _BASE_SET:
                if name not in base:
                    base[name] = value
            elif name == "usage":
                usage = value  # on a content chunk (some servers put it there)
            elif name not in _CHUNK_TOP and value not in _EMPTY:
                raise Unconvertible(name)
    if entry.usage_chunk is not None:
        usage = only(json_object(entry.usage_chunk), _CHUNK_TOP).get("usage", usage)
    if usage is not None and not isinstance(usage, dict):
        raise Unconvertible("usage")
    body: dict[str, Any] = {**chunk_base(base, "chat.completion" if chat else "text_completion"),
                            "choices": [_finish(choices[i], chat) for i in sorted(choices)]}
    if usage is None:  # no usage object among the chunks: the upstream's figures as the gateway read them, if any
        usage = reported_usage(entry)
    if usage is not None:
        body["usage"] = usage
    return encode(body)


def reported_usage(entry: Entry) -> Usage | None:
    """The usage the upstream reported (not the gateway's estimate for an upstream that sent none)."""
    return None if entry.usage_estimated else entry.usage


def _merge(choices: dict[int, dict[str, Any]], choice: Any, chat: bool) -> None:
    """One chunk's choice into its slot: each field read once (a stream has a chunk per token or so)."""
    if type(choice) is not dict:
        raise Unconvertible("choice")
    index = choice.get("index", 0)
    if type(index) is not int:
        raise Unconvertible("index")
    slot = choices.get(index)
    if slot is None:
        slot = choices[index] = _slot(index)
    texts: dict[str, list[str]] = slot["texts"]
    for name, value in choice.items():
        if value is None or name == "index":
            continue
        if name == "delta" and chat:
            if type(value) is not dict:
                raise Unconvertible("delta")
            for key, piece in value.items():  # `_merge_delta`, in line for the usual piece of text
                if type(piece) is str and key in _TEXT_NAMES:
                    found = texts.get(key)
                    if found is None:
                        texts[key] = [piece]
                    else:
                        found.append(piece)
                elif piece is not None:
                    _merge_delta(slot, key, piece)
        elif name == "text" and not chat:
            if type(value) is not str:
                raise Unconvertible("text")
            texts.setdefault("content", []).append(value)
        elif name == "finish_reason":
            if type(value) is not str:
                raise Unconvertible("finish_reason")
            slot["finish_reason"] = value
        elif name == "logprobs":  # each chunk's lists, joined in order (chat: `content`, `refusal`; completions:
            _merge_logprobs(slot, value)  # `tokens`, `token_logprobs`, `top_logprobs`...)
        elif value not in _EMPTY:
            raise Unconvertible(name)


def _merge_typed(choices: dict[int, dict[str, Any]], choice: _Choice) -> None:
    """`_merge` of a chat choice of the usual shape."""
    slot = choices.get(choice.index)
    if slot is None:
        slot = choices[choice.index] = _slot(choice.index)
    if choice.finish_reason is not None:
        slot["finish_reason"] = choice.finish_reason
    if choice.logprobs is not None:
        _merge_logprobs(slot, choice.logprobs)
    delta = choice.delta
    if delta is None:
        return
    texts: dict[str, list[str]] = slot["texts"]
    if delta.content is not None:
        found = texts.get("content")
        if found is None:
            texts["content"] = [delta.content]
        else:
            found.append(delta.content)
    if delta.role is not None:
        slot["role"] = delta.role
    for name in TEXTS[1:]:
        value = getattr(delta, name)
        if value is not None:
            texts.setdefault(name, []).append(value)
    for position, call in enumerate(delta.tool_calls or ()):
        _merge_call(slot["calls"], call, position)
    for entry in delta.reasoning_blocks or ():
        _merge_entry(slot["blocks"], entry)


def _slot(index: int) -> dict[str, Any]:
    return {"index": index, "role": "assistant", "texts": {}, "calls": {}, "blocks": [], "finish_reason": None,
            "logprobs": None}


def _merge_delta(slot: dict[str, Any], name: str, value: Any) -> None:
    """A delta's field other than a piece of text (and not null)."""
    if name == "role":
        if type(value) is not str:
            raise Unconvertible(name)
        slot["role"] = value
    elif name == "tool_calls":
        for position, call in enumerate(json_list(value)):
            _merge_call(slot["calls"], call, position)
    elif name == BLOCKS:
        for entry in json_list(value):
            _merge_entry(slot["blocks"], entry)
    elif name in _TEXT_NAMES or value not in _EMPTY:
        raise Unconvertible(name)  # content as a list of parts; a field no complete message carries as it is


def _merge_call(calls: dict[int, dict[str, Any]], call: Any, position: int) -> None:
    """A piece of the call at its `index`, else (older Ollama, Gemini's OpenAI-compatible API send none) at its
    place in the chunk's `tool_calls`. A piece that begins another call at its index (`begins_another_call`: Ollama
    0.20 gives each of its parallel calls `index: 0`) makes the answer unconvertible: joined, they would be one broken
    call. A later piece of the same call keeps the call's first id."""
    function_call(call, _CALL_PIECE)
    found = calls.setdefault(int_field(call, "index", position), {
        "id": None, "type": "function", "function": {"name": "", "arguments": ""}})
    if call.get("id") is not None:
        if found["id"] is None:
            found["id"] = call["id"]
        elif begins_another_call(call, found["id"]):
            raise Unconvertible("tool_calls")
    for name, value in (call.get("function") or {}).items():
        if value is not None:
            found["function"][name] += value


def _merge_entry(blocks: list[dict[str, Any]], entry: Any) -> None:
    """A `reasoning_blocks` entry, whole, at the next place of the list: at its `index` when it has one (the
    gateway's), else (stored before entries had it) after those before it. An object at another `index` (out of
    order, a repeat: the gateway never sends one) makes the answer unconvertible."""
    if type(entry) is not dict:
        raise Unconvertible(BLOCKS)
    index = entry.get("index")
    if index is not None and (type(index) is not int or index != len(blocks)):
        raise Unconvertible(BLOCKS)
    blocks.append({name: value for name, value in entry.items() if name != "index"})


def _merge_logprobs(slot: dict[str, Any], logprobs: Any) -> None:
    if type(logprobs) is not dict:
        raise Unconvertible("logprobs")
    joined = slot["logprobs"] = slot["logprobs"] or {}
    for name, values in logprobs.items():
        if isinstance(values, list):
            if isinstance(joined.get(name), list):
                joined[name].extend(values)
            else:
                joined[name] = list(values)
        elif values is None:
            joined.setdefault(name, None)
        else:
            raise Unconvertible("logprobs")


def _finish(slot: dict[str, Any], chat: bool) -> dict[str, Any]:
    texts: dict[str, list[str]] = slot["texts"]
    text = "".join(texts.get("content", ()))
    logprobs = slot["logprobs"]
    if not chat:
        return {"index": slot["index"], "text": text, "logprobs": logprobs, "finish_reason": slot["finish_reason"]}
    refusal = texts.get("refusal")
    # No text at all: null beside tool calls or a refusal, as the upstream's complete answer has it.
    content = text if text or not (slot["calls"] or refusal) else None
    message: dict[str, Any] = {"role": slot["role"], "content": content,
                               "refusal": "".join(refusal) if refusal else None}
    for name in TEXTS[2:]:
        if name in texts:
            message[name] = "".join(texts[name])
    if slot["calls"]:
        message["tool_calls"] = [slot["calls"][i] for i in sorted(slot["calls"])]
    if slot["blocks"]:
        message[BLOCKS] = slot["blocks"]
    return {"index": slot["index"], "message": message, "logprobs": logprobs, "finish_reason": slot["finish_reason"]}
