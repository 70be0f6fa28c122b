"""A mock of Google's Generative Language API (Gemini), with the OpenAI mock's fault injection.

It speaks the documented REST format: `POST /v1beta/models/{model}:generateContent`
and `:streamGenerateContent?alt=sse` (each SSE event a partial
`GenerateContentResponse`, the last with `finishReason` and `usageMetadata`,
events separated by CRLF pairs as Google sends them), the key in
`x-goog-api-key`, and errors as `{"error": {"code", "message", "status"}}`.

Faults come from the model in the URL (`fault-status-429`, `fault-stall-after-3`,
`fault-echo`, `fault-echo-tool`, ...), plus `fault-safety` (the answer stops
with `finishReason: SAFETY`), `fault-prompt-blocked` (`promptFeedback.blockReason`
and no candidates), `fault-out-of-order` (text after the finish reason) and
`fault-overloaded-midstream` (an `{"error": ...}` event, 429 RESOURCE_EXHAUSTED, after two chunks).
`fault-wrapped-<fault>` is `fault-<fault>` whose error answer to a stream (`alt=sse`) is wrapped in a one-element
array, `[{"error": {...}}]`, as Google sends a `streamGenerateContent` error (`fault-wrapped-status-429`,
`fault-wrapped-context-length`, `fault-wrapped-key-not-found`). The account's states Google answers with
(`ACCOUNT_FAULTS`): `fault-prepay-depleted` (402 RESOURCE_EXHAUSTED), `fault-location` and `fault-free-tier` (400
FAILED_PRECONDITION), `fault-key-not-found` (400 INVALID_ARGUMENT whose message names no key error, only its
`ErrorInfo.reason`, API_KEY_INVALID; the mock's answer to a wrong key carries that reason too).
`fault-thinking-reset-after-<n>` and `fault-thinking-slow-stream-<ms>`: a thinking model's stream whose events report
their usage so far, as Gemini 2.5 does (`candidatesTokenCount` `EVENT_TOKENS` more each event, `thoughtsTokenCount`
`THOUGHTS`), cut by a reset after <n> content events, or its events `<ms>` apart.
Gemini's own `fault-tool-use-prompt` (`TOOL_USE_MODEL`) answers as a well-behaved model, and its usage reports
`toolUsePromptTokenCount` (`TOOL_USE_PROMPT`, in every event's usage when streamed), as a built-in tool's use does.

As the real API, it refuses `contents: []`, a content without parts, and a part that sets no data (`{"text": ""}`:
"required oneof field 'data' must have one initialized field"), in `contents` and in `systemInstruction`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from .mock_upstream import (
    _RECORD,
    LEAKY_DETAIL,
    Fault,
    MockUpstream,
    SseAnswer,
    _deliver_json,
    _deliver_stream,
    _echo_words,
    _send,
    count_words,
    parse_fault,
)

__all__ = ["ACCOUNT_FAULTS", "CACHED", "EVENT_TOKENS", "THOUGHTS", "TOOL_USE_MODEL", "TOOL_USE_PROMPT", "MockGemini",
           "gemini_error"]

CACHED = 4  # cachedContentTokenCount on every answer
THOUGHTS = 6  # thoughtsTokenCount of `fault-cached-reasoning`
TOOL_USE_MODEL = "fault-tool-use-prompt"  # (no fault of `parse_fault`'s: a well-behaved answer but for its usage)
TOOL_USE_PROMPT = 9  # its toolUsePromptTokenCount
SIGNATURE = "c2lnbmF0dXJlLW9mLWEtdGhvdWdodA=="  # the thoughtSignature of the mock's function calls (Gemini 3's)
EVENT_TOKENS = 40  # candidatesTokenCount each event of `fault-thinking-...` adds (Gemini 2.5's: tens)
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 402: "RESOURCE_EXHAUSTED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
# A bad key's google.rpc.ErrorInfo, as Google sends it beside "API key not valid" and "API Key not found".
_KEY_INVALID = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                 "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}]
# Google's answers to an account it will not serve: (HTTP status, `status`, message, details), by fault name.
ACCOUNT_FAULTS: dict[str, tuple[int, str, str, list[dict[str, Any]] | None]] = {
    "fault-prepay-depleted": (402, "RESOURCE_EXHAUSTED", "Your prepayment credit balance is depleted. Please go to "
                              "AI Studio at https://ai.studio/projects to manage your project and billing.", None),
    "fault-location": (400, "FAILED_PRECONDITION", "User location is not supported for the API use.", None),
    "fault-free-tier": (400, "FAILED_PRECONDITION", "Gemini API free tier is not available in your country. Please "
                        "enable billing on your project in Google AI Studio.", None),
    "fault-key-not-found": (400, "INVALID_ARGUMENT", "API Key not found. Please pass a valid API key.", _KEY_INVALID),
}
_THINKING = re.compile(r"fault-thinking-(reset-after|slow-stream)-(\d+)")


def gemini_error(status: int, message: str, kind: str | None = None, details: list[dict[str, Any]] | None = None,
                 wrapped: bool = False) -> web.Response:
    """Google's error answer (`kind`: its `status`, by default the HTTP status's); `wrapped`: in a one-element array,
    as Google answers a stream's request (`streamGenerateContent?alt=sse`)."""
    error: dict[str, Any] = {"code": status, "message": message, "status": kind or _STATUS.get(status, "UNKNOWN")}
    if status == 429:  # Google sends no Retry-After: the wait is in the body's RetryInfo
        error["details"] = [{"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]
    if details is not None:
        error["details"] = details
    return web.json_response([{"error": error}] if wrapped else {"error": error}, status=status)


def _unsigned_call(body: dict[str, Any]) -> bool:
    """Whether the history holds one of the mock's own calls (`echo`) without the signature it was given."""
    return any(isinstance(part.get("functionCall"), dict) and part["functionCall"].get("name") == "echo"
               and part.get("thoughtSignature") != SIGNATURE
               for content in body.get("contents") or () if content.get("role") == "model"
               for part in content.get("parts") or ())


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def _user_text(body: dict[str, Any]) -> str:
    for content in reversed(body.get("contents") or []):
        if content.get("role") == "user":
            texts = [p["text"] for p in content.get("parts") or () if isinstance(p.get("text"), str)]
            if texts:
                return " ".join(texts)
    return ""


# A part's `data` oneof: a part must set one (an empty `text` sets none: proto3 reads "" as unset).
_DATA = ("inlineData", "fileData", "functionCall", "functionResponse", "executableCode", "codeExecutionResult")


def _empty_part(parts: Any, where: str) -> str | None:
    """Gemini's 400 for the first part with no data (e.g. `{"text": ""}`), None when every part has some."""
    for position, part in enumerate(parts if isinstance(parts, list) else ()):
        if isinstance(part, dict) and not part.get("text") and not any(key in part for key in _DATA):
            return (f"* GenerateContentRequest.{where}.parts[{position}].data: required oneof field 'data' must have "
                    "one initialized field")
    return None


def _check(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
        return "* GenerateContentRequest.contents: contents is not specified"
    system = body.get("systemInstruction")
    problem = _empty_part(system.get("parts"), "system_instruction") if isinstance(system, dict) else None
    if problem is not None:
        return problem
    for index, content in enumerate(body["contents"]):
        if content.get("role") not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{index}].role: must be user or model"
        if not content.get("parts"):
            return f"* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty."
        problem = _empty_part(content["parts"], f"contents[{index}]")
        if problem is not None:
            return problem
    return None


class MockGemini(MockUpstream):
    """The Gemini API on 127.0.0.1 (base URL `.../v1beta`), run in a background thread."""

    def __init__(self, api_key: str | None = "gemini-test-key", **kwargs: Any) -> None:
        super().__init__(api_key, **kwargs)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1beta"

    async def _serve(self) -> int:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 2**20)
        app.router.add_post("/v1beta/models/{call}", self._generate)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     handle_signals=False, shutdown_timeout=0.25)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return int(self._runner.addresses[0][1])

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            return gemini_error(400, "API key not valid. Please pass a valid API key.", details=_KEY_INVALID)
        return None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        record = request[_RECORD]
        model, _, method = request.match_info["call"].partition(":")
        record.model = model
        stream = method == "streamGenerateContent"
        if method not in ("generateContent", "streamGenerateContent") or (stream and request.query.get("alt") != "sse"):
            return await _send(request, gemini_error(404, f"unknown method {method}"))
        body = record.json
        problem = _check(body)
        if problem is not None:
            return await _send(request, gemini_error(400, problem))
        assert isinstance(body, dict)
        name = self.override or model
        wrapped = stream and name.startswith("fault-wrapped-")  # its error in an array, as Google answers a stream
        name = "fault-" + name.removeprefix("fault-wrapped-") if name.startswith("fault-wrapped-") else name
        if name in ACCOUNT_FAULTS:
            status, kind, message, details = ACCOUNT_FAULTS[name]
            return await _send(request, gemini_error(status, message, kind, details, wrapped))
        thinking = _THINKING.fullmatch(name)
        fault = Fault(thinking[1], int(thinking[2])) if thinking else parse_fault(name)
        if fault and fault.kind == "status":
            return await _send(request, gemini_error(fault.value, f"Mock failure: {LEAKY_DETAIL}", wrapped=wrapped))
        if fault and fault.kind == "context-length":
            return await _send(request, gemini_error(
                400, "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
                wrapped=wrapped))
        if fault and fault.kind == "echo-tool" and _unsigned_call(body):  # as Gemini 3 answers its own call sent back
            return await _send(request, gemini_error(     # without its thought signature
                400, "Function call is missing a thought_signature in functionCall parts."))
        words = list(self.REPLY_WORDS)
        if fault and fault.kind in ("echo", "echo-tool"):
            words = _echo_words({"messages": [{"role": "user", "content": _user_text(body)}]})
        prompt = sum(count_words(p.get("text")) for c in body["contents"] for p in c.get("parts") or ())
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": len(words),
                 "totalTokenCount": prompt + len(words), "cachedContentTokenCount": CACHED}
        if fault and fault.kind == "cached-reasoning":  # a thinking model: its thoughts beside the candidates
            usage.update(thoughtsTokenCount=THOUGHTS, totalTokenCount=prompt + len(words) + THOUGHTS)
        if thinking:  # (its answer's whole usage, as its events' add up to)
            usage = {**_thinking(prompt, len(words)), "cachedContentTokenCount": CACHED}
        so_far: dict[str, Any] = {"promptTokenCount": prompt, "totalTokenCount": prompt}  # a stream's before its end
        if name == TOOL_USE_MODEL:  # a built-in tool's results read: counted beside the prompt
            for metadata in (usage, so_far):
                metadata.update(toolUsePromptTokenCount=TOOL_USE_PROMPT,
                                totalTokenCount=metadata["totalTokenCount"] + TOOL_USE_PROMPT)
        base = {"modelVersion": model, "responseId": f"resp-mock-{next(self._serials)}"}
        if fault and fault.kind == "prompt-blocked":
            blocked = {**base, "promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage}
            if stream:
                return await _deliver_stream(request, SseAnswer([_sse(blocked)], 0), None)
            return await _send(request, web.json_response(blocked))
        finish = "SAFETY" if fault and fault.kind == "safety" else "STOP"
        tool = fault is not None and fault.kind == "echo-tool"
        if not stream:
            parts: list[dict[str, Any]] = ([{"functionCall": {"name": "echo", "args": {"text": " ".join(words)}},
                                             "thoughtSignature": SIGNATURE}] if tool else [{"text": " ".join(words)}])
            answer = {**base, "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish,
                                              "index": 0}], "usageMetadata": usage}
            return await _deliver_json(request, answer, fault)
        if tool:
            pieces = [[{"functionCall": {"name": "echo", "args": {"text": " ".join(words)}},
                        "thoughtSignature": SIGNATURE}]]
        else:
            pieces = [[{"text": w if i == 0 else " " + w}] for i, w in enumerate(words)]
        events = [_sse({**base, "candidates": [{"content": {"role": "model", "parts": part}, "index": 0}],
                        "usageMetadata": _thinking(prompt, count) if thinking else so_far})
                  for count, part in enumerate(pieces, 1)]
        events.append(_sse({**base, "candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                                                    "finishReason": finish, "index": 0}], "usageMetadata": usage}))
        if fault and fault.kind == "out-of-order":
            events.append(_sse({**base, "candidates": [{"content": {"role": "model", "parts": [{"text": "late"}]},
                                                        "index": 0}]}))
        if fault and fault.kind == "overloaded-midstream":  # Google's error object after some text
            error = {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": f"Quota exhausted: {LEAKY_DETAIL}"}
            events = [*events[:2], _sse({"error": error})]
        return await _deliver_stream(request, SseAnswer(events, 0), fault)


def _thinking(prompt: int, events: int) -> dict[str, Any]:
    """A thinking model's `usageMetadata` after `events` events, as Gemini 2.5 reports it on each: cumulative."""
    candidates = EVENT_TOKENS * events
    return {"promptTokenCount": prompt, "candidatesTokenCount": candidates, "thoughtsTokenCount": THOUGHTS,
            "totalTokenCount": prompt + candidates + THOUGHTS}
