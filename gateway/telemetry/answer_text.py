"""The text an answer generated, as the usage estimate counts it when its upstream reports no usage (`usage`).

It is read where the guards read it (`guards.texts.answer_refs`, `guards.responses_answer.ITEM_TEXTS`), in every
shape an upstream sends: a chat message's (or a streamed delta's) reasoning, content, refusal, tool call arguments
(sent as a JSON object too: counted as its JSON, the string the guards make of it), a custom tool's input and a
legacy `function_call`'s arguments; its content as a list of parts (text, refusal and thinking parts, as
`guards.texts.spread_parts` reads them); a completion's text; a Responses answer's output items. A value of
another type than the API's holds no text here. A chunk's usual delta (its `content` a string) is read first; the
rare shapes after, at the cost of a look-up each.

(Nothing is imported from the guards: they import the routing rules, which import the usage stage.)
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["OWN_TEXT_FIELDS", "REASONING_FIELDS", "answer_text", "chunk_text"]

# A chat message's (or delta's) texts beside `content` (those the guards read there: `guards.texts.BESIDE_CONTENT`):
# its reasoning, under the first of its names that holds a text (vLLM writes each piece under both, DeepSeek under
# `reasoning_content`, OpenRouter, Groq and Ollama under `reasoning`), and its refusal.
REASONING_FIELDS = ("reasoning_content", "reasoning")
OWN_TEXT_FIELDS = ("refusal",)

_encode = msgspec.json.Encoder().encode


def chunk_text(chunk: dict[str, Any], parts: list[str]) -> None:
    """A stream chunk's texts, added to `parts`: each choice's delta's, or a completion's text."""
    for choice in _listed(chunk.get("choices")):
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            _text_of_message(delta, parts)
        elif isinstance(choice.get("text"), str) and choice["text"]:  # a completion's
            parts.append(choice["text"])


def answer_text(body: bytes) -> str:
    """The text of a complete answer: its choices' (a message's reasoning, content, refusal, tool calls' and a
    legacy function call's arguments, custom tools' input; a completion's text), or its output items'
    (`_text_of_item`). A body that is not JSON holds none."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):  # (an upstream's JSON nested past the recursion limit)
        return ""
    parts: list[str] = []
    for choice in _listed(data.get("choices")) if isinstance(data, dict) else ():
        if isinstance(choice, dict):
            if isinstance(choice.get("message"), dict):
                _text_of_message(choice["message"], parts)
            elif isinstance(choice.get("text"), str):
                parts.append(choice["text"])
    for item in _listed(data.get("output")) if isinstance(data, dict) else ():  # a Responses answer
        if isinstance(item, dict):
            _text_of_item(item, parts)
    return "".join(parts)


def _listed(value: Any) -> list[Any]:
    """An upstream's list, or none (a value of another type than the API's holds no text here)."""
    return value if isinstance(value, list) else []


def _text_of_message(message: dict[str, Any], parts: list[str]) -> None:
    """A chat message's (or a streamed delta's) generated text, in the order a model writes it: its reasoning
    (counted once, `REASONING_FIELDS`), content, refusal, tool calls' texts, a legacy function call's arguments.
    Empty strings are left out (so a chunk of none, such as a stream's role chunk, adds no part:
    `usage.StreamText.tokens`)."""
    for field in REASONING_FIELDS:
        reasoning = message.get(field)
        if isinstance(reasoning, str) and reasoning:
            parts.append(reasoning)
            break
    content = message.get("content")
    if isinstance(content, str):
        if content:
            parts.append(content)
    elif isinstance(content, list):  # (rare) content as a list of parts
        _text_of_parts(content, parts)
    for field in OWN_TEXT_FIELDS:
        text = message.get(field)
        if isinstance(text, str) and text:
            parts.append(text)
    calls = message.get("tool_calls")
    if calls:
        for call in _listed(calls):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                if arguments:
                    parts.append(arguments)
            elif isinstance(call, dict):  # (rare) arguments as a JSON object, a custom tool's input
                _text_of_call(call, arguments, parts)
    legacy = message.get("function_call")
    if isinstance(legacy, dict):  # (rare) the legacy function calling's one call
        _arguments(legacy, parts)


def _text_of_call(call: dict[str, Any], arguments: Any, parts: list[str]) -> None:
    """A tool call's text beside a function's arguments as a string: its `arguments` sent as a JSON object or
    array, or a custom tool's input (`{"custom": {"name", "input"}}`)."""
    _json_arguments(arguments, parts)
    custom = call.get("custom")
    text = custom.get("input") if isinstance(custom, dict) else None
    if isinstance(text, str) and text:
        parts.append(text)


def _arguments(function: dict[str, Any], parts: list[str]) -> None:
    """A function call's arguments: the JSON string, or the JSON of what some servers send instead."""
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        if arguments:
            parts.append(arguments)
    else:
        _json_arguments(arguments, parts)


def _json_arguments(arguments: Any, parts: list[str]) -> None:
    """Arguments sent as a JSON object or array (some servers do), as the JSON string the guards make of them
    (`guards.texts.text_arguments`: as compact) and a client reads."""
    if isinstance(arguments, dict | list):
        parts.append(_encode(arguments).decode())


def _text_of_parts(content: list[Any], parts: list[str]) -> None:
    """A content list's texts, in its order: a text part's text, a refusal part's refusal, a thinking part's
    thinking (Mistral's: a string, or a list of text parts); what `guards.texts.spread_parts` makes fields of.
    Other parts (an image) hold no text."""
    for part in content:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" or kind == "refusal":
            text = part.get(kind)
        elif kind == "thinking":
            text = part.get("thinking")
            if isinstance(text, list):
                text = "".join(inner["text"] for inner in text if isinstance(inner, dict)
                               and inner.get("type") == "text" and isinstance(inner.get("text"), str))
        else:
            continue
        if isinstance(text, str) and text:
            parts.append(text)


# A complete Responses answer's texts, as its stream carries them in `*.delta` events (`usage.ResponsesText`; the
# guards read them there too: `guards.responses_answer.ITEM_TEXTS`): its output items' parts (a message's text and
# refusal parts, a reasoning item's summary and content), and their own text fields: a tool call's arguments (a
# hosted tool's too), a custom tool's input.
_ITEM_PARTS = ("summary", "content")
# An item's own text fields, and the item type each is read of (None: any).
_ITEM_FIELDS: dict[str, str | None] = {"arguments": None, "input": "custom_tool_call"}


def _text_of_item(item: dict[str, Any], parts: list[str]) -> None:
    """An output item's texts: its own fields' (`_ITEM_FIELDS`), then its summary's and its content's, a part's `text`
    (a refusal part's `refusal`)."""
    kind = item.get("type")
    for field, of in _ITEM_FIELDS.items():
        text = item.get(field)
        if isinstance(text, str) and (of is None or kind == of):
            parts.append(text)
    for field in _ITEM_PARTS:
        content = item.get(field)
        if isinstance(content, str):  # (a message's content as a string, as a chat message has it)
            parts.append(content)
        for part in _listed(content):
            if isinstance(part, dict):
                text = part.get("refusal" if part.get("type") == "refusal" else "text")
                if isinstance(text, str):
                    parts.append(text)
