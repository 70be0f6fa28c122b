"""Chat Completions to Gemini's `generateContent`: a pure function (the answer back: `gemini_to_chat`).

Request: system and developer messages become `systemInstruction`; user and
assistant turns `contents` with the roles `user` and `model`; text parts `text`,
a `data:` image `inlineData` and any other image URL `fileData`; an assistant's
tool calls `functionCall` parts and `tool` messages `functionResponse` parts
(named by the call they answer); tools `functionDeclarations`; `tool_choice`
`functionCallingConfig`; sampling fields, `stop`, `n`, `seed`, penalties and JSON
mode (`responseMimeType`, `responseSchema`) `generationConfig`. A field Gemini
has no equivalent for is a 400 naming it.

What Gemini refuses is not sent: an empty text (`content: ""`, a `{"type": "text",
"text": ""}` part) leaves the part's `data` unset ("required oneof field 'data' must
have one initialized field"), so it is left out, and so is a turn (or the
`systemInstruction`) left with no part; a request left with no turn at all (only
system messages) is `Unsupported`, so that routing tries the next target (Gemini
refuses `contents: []`; OpenAI answers it), never sent with invented text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import InvalidRequest
from .common import data_url, json_schema_of, parse_arguments, tool_calls_of, unsupported
from .gemini_to_chat import GeminiEvents, _finish, chat_completion  # noqa: F401 -- (`_finish`: read by tests)

__all__ = ["GeminiEvents", "chat_completion", "gemini_request"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_REFUSED: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v not in (None, False),
    "top_logprobs": lambda v: v is not None,
    "logit_bias": lambda v: bool(v),
    "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "prediction": lambda v: v is not None,
    "functions": lambda v: v is not None,
    "function_call": lambda v: v is not None,
    "parallel_tool_calls": lambda v: v is False,
}
_HANDLED = frozenset({
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "stream_options", "tools", "tool_choice", "parallel_tool_calls", "user", "metadata", "response_format",
    "store", "service_tier", "n", "seed", "presence_penalty", "frequency_penalty",
})
_NATIVE = frozenset({"safetySettings", "cachedContent", "top_k"})
_CONFIG = {"temperature": "temperature", "top_p": "topP", "n": "candidateCount", "seed": "seed",
           "presence_penalty": "presencePenalty", "frequency_penalty": "frequencyPenalty", "top_k": "topK"}


def gemini_request(body: dict[str, Any], target: str) -> dict[str, Any]:
    """The `generateContent` body for a Chat Completions request (the model goes in the URL)."""
    for field, refused in _REFUSED.items():
        if field in body and refused(body[field]):
            raise unsupported(field, target)
    for field in body:
        if field not in _HANDLED and field not in _NATIVE and field not in _REFUSED:
            raise unsupported(field, target)
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    calls: dict[str, tuple[str, int]] = {}  # tool call id -> its function's name and its place in its turn
    places: dict[int, int] = {}  # a result part (by identity) -> the place of the call it answers
    for index, message in enumerate(body["messages"]):
        _add_message(message, index, system, contents, calls, places, target)
    if not contents:  # Gemini refuses `contents: []` ("contents is not specified"), a 400 the client would get as
        # the upstream's: the next target (an OpenAI one answers a system prompt alone) is tried instead
        raise unsupported("messages", target, "a request with only system or developer messages, or only empty ones "
                                              "(Gemini needs a user or model turn)")
    _results_in_call_order(contents, places)
    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    for field, name in _CONFIG.items():
        if body.get(field) is not None:
            config[name] = body[field]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = json_schema_of(response_format)
        if response_format["type"] == "json_schema" and isinstance(schema, dict):
            config["responseJsonSchema"] = schema
    if config:
        out["generationConfig"] = config
    tools = body.get("tools")
    if tools:
        out["tools"] = [{"functionDeclarations": [_declaration(tool, i, target) for i, tool in enumerate(tools)]}]
    choice = body.get("tool_choice")
    if choice is not None:
        out["toolConfig"] = {"functionCallingConfig": _calling_config(choice)}
    if "safetySettings" in body:
        out["safetySettings"] = body["safetySettings"]
    if "cachedContent" in body:
        out["cachedContent"] = body["cachedContent"]
    return out


def _signature(call: dict[str, Any]) -> str | None:
    """The Gemini thought signature a client sent back on a tool call (`gemini_to_chat._signed`), if any."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _results_in_call_order(contents: list[dict[str, Any]], places: dict[int, int]) -> None:
    """Each turn of tool results in the order of the calls they answer (a client may send them in any): Gemini
    matches a result to its call by name and place, so two calls of one function got each other's results. The
    results lead their content; a user message after them joins it (it was then left unsorted)."""
    for content in contents:
        parts = content["parts"]
        if content["role"] == "user" and len(parts) > 1 and id(parts[0]) in places:
            count = next((n for n, part in enumerate(parts) if id(part) not in places), len(parts))
            parts[:count] = sorted(parts[:count], key=lambda part: places[id(part)])


def _add_message(message: Any, index: int, system: list[dict[str, Any]], contents: list[dict[str, Any]],
                 calls: dict[str, tuple[str, int]], places: dict[int, int], target: str) -> None:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise InvalidRequest(f"`{where}` must be an object", param=where)
    role = message.get("role")
    content = message.get("content")
    if role in ("system", "developer"):
        system.extend(_parts(content, where, target, images=False))
    elif role == "user":
        _append(contents, "user", _parts(content, where, target, images=True))
    elif role == "assistant":
        parts = _parts(content, where, target, images=False) if content else []
        for position, call in enumerate(tool_calls_of(message, where)):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"`{where}.tool_calls.{position}` needs a function name",
                                     param=f"{where}.tool_calls")
            # A later turn's call replaces an earlier one with its id, so that a result answers its own turn's call:
            # the gateway's ids were `call_0`, `call_1`... in every answer, and old histories repeat them.
            if isinstance(call.get("id"), str):
                calls[call["id"]] = (function["name"], position)
            part: dict[str, Any] = {"functionCall": {"name": function["name"], "args": parse_arguments(
                function.get("arguments"), f"{where}.tool_calls.{position}")}}
            signature = _signature(call)
            if signature is not None:
                part["thoughtSignature"] = signature
            parts.append(part)
        if parts:
            _append(contents, "model", parts)
    elif role == "tool":
        found = calls.get(str(message.get("tool_call_id")))
        if found is None:
            raise InvalidRequest(f"`{where}.tool_call_id` does not answer a tool call of an earlier assistant "
                                 "message (Gemini needs the function's name)", param=f"{where}.tool_call_id")
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in _parts(
            content, where, target, images=False))
        try:
            result = _decode(text)
        except (msgspec.DecodeError, RecursionError):  # (nested past ~1,000 levels: as text too)
            result = None
        response = result if isinstance(result, dict) else {"result": text}
        name, place = found
        answer = {"functionResponse": {"name": name, "response": response}}
        places[id(answer)] = place  # (read by `_results_in_call_order`, while `answer` lives)
        _append(contents, "user", [answer])
    else:
        raise unsupported(f"{where}.role", target, f"role `{role}`")


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    """Consecutive turns of one role become one turn; a turn with no part (all its text empty) is left out."""
    if not parts:  # (Gemini refuses a content without parts)
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _parts(content: Any, where: str, target: str, *, images: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):  # an empty text leaves the part's `data` unset, which Gemini refuses: left out
        return [{"text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                parts.append({"text": part["text"]})
        elif kind == "image_url" and images:
            url = part.get("image_url", {}).get("url") if isinstance(part.get("image_url"), dict) else None
            if not isinstance(url, str):
                raise InvalidRequest(f"`{where}.content.{position}.image_url.url` is missing",
                                     param=f"{where}.content")
            inline = data_url(url)
            parts.append({"inlineData": {"mimeType": inline[0], "data": inline[1]}} if inline
                         else {"fileData": {"mimeType": _mime_of(url), "fileUri": url}})
        else:
            raise unsupported(f"{where}.content.{position}", target, f"a `{kind}` content part here")
    return parts


def _mime_of(url: str) -> str:
    lowered = url.lower().split("?")[0]
    for suffix, mime in ((".png", "image/png"), (".gif", "image/gif"), (".webp", "image/webp")):
        if lowered.endswith(suffix):
            return mime
    return "image/jpeg"


def _declaration(tool: Any, index: int, target: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise unsupported(f"tools.{index}", target, "a tool other than a function with a name")
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("parameters"):
        out["parametersJsonSchema"] = function["parameters"]
    return out


def _calling_config(choice: Any) -> dict[str, Any]:
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "required":
        return {"mode": "ANY"}
    if choice == "none":
        return {"mode": "NONE"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"].get("name")]}
    raise InvalidRequest("`tool_choice` must be auto, required, none or a function", param="tool_choice")
