"""Chat Completions to Gemini's `generateContent` and back: pure functions and a per-stream translator.

Request: system and developer messages become `systemInstruction`; user and
assistant turns `contents` with the roles `user` and `model`; text parts `text`,
a `data:` image `inlineData` and any other image URL `fileData`; an assistant's
tool calls `functionCall` parts and `tool` messages `functionResponse` parts
(named by the call they answer); tools `functionDeclarations`; `tool_choice`
`functionCallingConfig`; sampling fields, `stop`, `n`, `seed`, penalties and JSON
mode (`responseMimeType`, `responseSchema`) `generationConfig`. A field Gemini
has no equivalent for is a 400 naming it.

Answer: candidates become choices; function calls tool calls with ids the
gateway makes (`call_<n>`: Gemini sends none); `finishReason` a finish reason,
the safety reasons (`SAFETY`, `RECITATION`, `BLOCKLIST`, `PROHIBITED_CONTENT`,
`SPII`, `IMAGE_SAFETY`) `content_filter`; `usageMetadata` OpenAI's usage (cached
content tokens as `prompt_tokens_details.cached_tokens`). A prompt Gemini blocks
(`promptFeedback.blockReason`) is a 400 `content_policy_violation`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import ContentPolicyViolation, GatewayError, InvalidRequest
from ..schemas.events import DONE, StreamEvent, UsageReport
from ..schemas.openai import CompletionTokensDetails, PromptTokensDetails, Usage
from .common import ChunkWriter, StreamProtocolError, data_url, parse_arguments, unsupported

__all__ = ["GeminiEvents", "chat_completion", "gemini_request"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
_SAFETY = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "MALFORMED_FUNCTION_CALL": "stop", "OTHER": "stop",
           "FINISH_REASON_UNSPECIFIED": "stop"}
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
        schema = (response_format.get("json_schema") or {}).get("schema")
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
    """The Gemini thought signature a client sent back on a tool call (`_signed`), if any."""
    extra = call.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    signature = google.get("thought_signature") if isinstance(google, dict) else None
    return signature if isinstance(signature, str) and signature else None


def _results_in_call_order(contents: list[dict[str, Any]], places: dict[int, int]) -> None:
    """Each turn of tool results in the order of the calls they answer (a client may send them in any): Gemini
    matches a result to its call by name and place, so two calls of one function got each other's results."""
    for content in contents:
        parts = content["parts"]
        if content["role"] == "user" and len(parts) > 1 and all(id(part) in places for part in parts):
            parts.sort(key=lambda part: places[id(part)])


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
        for position, call in enumerate(message.get("tool_calls") or ()):
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"`{where}.tool_calls.{position}` needs a function name",
                                     param=f"{where}.tool_calls")
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
        except msgspec.DecodeError:
            result = None
        response = result if isinstance(result, dict) else {"result": text}
        name, place = found
        answer = {"functionResponse": {"name": name, "response": response}}
        places[id(answer)] = place  # (read by `_results_in_call_order`, while `answer` lives)
        _append(contents, "user", [answer])
    else:
        raise unsupported(f"{where}.role", target, f"role `{role}`")


def _append(contents: list[dict[str, Any]], role: str, parts: list[dict[str, Any]]) -> None:
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _parts(content: Any, where: str, target: str, *, images: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}]
    if content is None:
        return []
    if not isinstance(content, list):
        raise InvalidRequest(f"`{where}.content` must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
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


# -- the answer ---------------------------------------------------------------------------------------


def _usage(metadata: Any) -> tuple[Usage, dict[str, Any]] | None:
    if not isinstance(metadata, dict):
        return None
    prompt = _int(metadata.get("promptTokenCount"))
    thoughts = _int(metadata.get("thoughtsTokenCount"))
    completion = _int(metadata.get("candidatesTokenCount")) + thoughts
    total = _int(metadata.get("totalTokenCount")) or prompt + completion
    cached = _int(metadata.get("cachedContentTokenCount"))  # (pricing bounds it by the prompt)
    shape = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total,
             "prompt_tokens_details": {"cached_tokens": cached},
             "completion_tokens_details": {"reasoning_tokens": thoughts}}
    # The cached and thinking tokens priced apart (`cached_input_per_mtok`, `reasoning_per_mtok`), as OpenAI's are.
    return Usage(prompt, completion, total, PromptTokensDetails(cached_tokens=cached) if cached else None,
                 CompletionTokensDetails(reasoning_tokens=thoughts) if thoughts else None), shape


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _finish(reason: Any, has_calls: bool) -> str:
    if reason in _SAFETY:
        return "content_filter"
    if has_calls and reason != "MAX_TOKENS":  # (a call cut by the token limit is a truncated answer: `length`)
        return "tool_calls"
    return _FINISH.get(str(reason), "stop")


def _signed(call: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """A tool call with its part's `thoughtSignature` (Gemini 3's thinking), where Google's own OpenAI-compatible
    API puts it (`extra_content.google.thought_signature`): a client sends it back with the call, and Gemini
    refuses a function call of its own that comes back without it."""
    signature = part.get("thoughtSignature")
    if isinstance(signature, str) and signature:
        call["extra_content"] = {"google": {"thought_signature": signature}}
    return call


def _blocked(answer: dict[str, Any]) -> ContentPolicyViolation | None:
    feedback = answer.get("promptFeedback")
    reason = feedback.get("blockReason") if isinstance(feedback, dict) else None
    if reason and not answer.get("candidates"):
        shown = reason if isinstance(reason, str) and reason.isupper() and len(reason) < 40 else "a safety reason"
        return ContentPolicyViolation(f"the upstream's safety filter blocked the prompt ({shown})")
    return None


def chat_completion(answer: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
    """A `generateContent` answer as a `chat.completion`, and its usage."""
    blocked = _blocked(answer)
    if blocked is not None:
        raise blocked
    ids = itertools.count()
    choices = []
    for position, candidate in enumerate(answer.get("candidates") or ()):
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in (candidate.get("content") or {}).get("parts") or ():
            if isinstance(part.get("text"), str) and not part.get("thought"):
                texts.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                call = part["functionCall"]
                calls.append(_signed({"id": call.get("id") or f"call_{next(ids)}", "type": "function", "function": {
                    "name": call.get("name"), "arguments": _encode(call.get("args") or {}).decode()}}, part))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": candidate.get("index", position), "message": message, "logprobs": None,
                        "finish_reason": _finish(candidate.get("finishReason"), bool(calls))})
    usage = _usage(answer.get("usageMetadata"))
    body: dict[str, Any] = {"id": str(answer.get("responseId") or "gemini"), "object": "chat.completion",
                            "created": int(time.time()), "model": answer.get("modelVersion"), "choices": choices}
    if usage is not None:
        body["usage"] = usage[1]
    return body, usage[0] if usage is not None else None


class GeminiEvents:
    """Per stream: each `streamGenerateContent` SSE event (a partial answer) as chunks, as it arrives."""

    __slots__ = ("_calls", "_error", "_finished", "_usage", "_writer")

    def __init__(self, error: Callable[[dict[str, Any]], GatewayError] | None = None) -> None:
        # An `{"error": {...}}` event mid-stream (quota exhausted, overloaded after the 200): the error the client
        # is told, as the provider maps and scrubs it (`GeminiProvider._event_error`).
        self._error = error
        self._writer: ChunkWriter | None = None
        self._calls: dict[int, int] = {}  # candidate -> tool calls so far
        self._finished: set[int] = set()
        self._usage: tuple[Usage, dict[str, Any]] | None = None

    def feed(self, payload: bytes) -> list[StreamEvent]:
        answer = _decode(payload)
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict) and self._error is not None:
            raise self._error(error)
        blocked = _blocked(answer)
        if blocked is not None:
            raise blocked
        events: list[StreamEvent] = []
        writer = self._writer
        if writer is None:
            writer = self._writer = ChunkWriter(str(answer.get("responseId") or "gemini"), answer.get("modelVersion"))
        for position, candidate in enumerate(answer.get("candidates") or ()):
            index = candidate.get("index", position)
            if not isinstance(index, int) or index in self._finished:
                raise StreamProtocolError("an event out of order (content after the candidate finished)")
            first = index not in self._calls
            if first:
                self._calls[index] = 0
                events.append(writer.chunk({"role": "assistant", "content": ""}, index=index))
            for part in (candidate.get("content") or {}).get("parts") or ():
                if isinstance(part.get("text"), str) and not part.get("thought"):
                    events.append(writer.chunk({"content": part["text"]}, index=index))
                elif isinstance(part.get("functionCall"), dict):
                    call = part["functionCall"]
                    number = self._calls[index]
                    self._calls[index] = number + 1
                    events.append(writer.chunk({"tool_calls": [_signed({
                        "index": number, "id": call.get("id") or f"call_{number}", "type": "function",
                        "function": {"name": call.get("name"), "arguments": _encode(call.get("args") or {}).decode()},
                    }, part)]}, index=index))
            reason = candidate.get("finishReason")
            if reason:
                self._finished.add(index)
                events.append(writer.chunk({}, _finish(reason, self._calls[index] > 0), index=index))
        usage = _usage(answer.get("usageMetadata"))
        if usage is not None:
            self._usage = usage
        return events

    def end(self) -> list[StreamEvent]:
        if not self._finished or self._writer is None or len(self._finished) < len(self._calls):
            raise StreamProtocolError("the end of the stream before a finish reason")
        if self._usage is None:
            return [DONE]
        return [UsageReport(self._usage[0], self._writer.usage_chunk(self._usage[1])), DONE]
