"""Gemini's `generateContent` answer as Chat Completions: complete (`chat_completion`) or streamed (`GeminiEvents`).

Answer: candidates become choices; function calls tool calls with ids the
gateway makes (`call_<random>_<n>`, unique per answer: Gemini sends none);
`finishReason` a finish reason, the safety reasons (`SAFETY`, `RECITATION`,
`BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII`, `IMAGE_SAFETY`) `content_filter`,
`MALFORMED_FUNCTION_CALL` a 502 (the answer is lost; a retry may succeed);
`usageMetadata` OpenAI's usage (cached content tokens as
`prompt_tokens_details.cached_tokens`). A prompt Gemini blocks
(`promptFeedback.blockReason`) is a 400 `content_policy_violation`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import ContentPolicyViolation, GatewayError, UnusableAnswer
from ..schemas.events import DONE, StreamEvent, UsageReport
from ..schemas.openai import CompletionTokensDetails, PromptTokensDetails, Usage
from .common import ChunkWriter, StreamProtocolError

__all__ = ["GeminiEvents", "chat_completion"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
_SAFETY = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"})
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "OTHER": "stop", "FINISH_REASON_UNSPECIFIED": "stop"}
_MALFORMED = "MALFORMED_FUNCTION_CALL"  # an error, not a finish reason (`_malformed`)


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


def _id_prefix() -> str:
    """What one answer's tool call ids start with (`call_<12 hex digits>_`, then its number). Numbered alone, every
    answer's were `call_0`, `call_1`...: a conversation's second tool turn repeated its first's ids, which clients
    that key results by id mix up, and an OpenAI-compatible fallback target may refuse."""
    return f"call_{os.urandom(6).hex()}_"


def _malformed(name: str) -> UnusableAnswer:
    """`MALFORMED_FUNCTION_CALL`: the model's call was not valid (often Python code instead of a call) and is not in
    the answer, which then holds nothing or its text before the call. As `stop` it was an empty answer a client took
    for the model's last word; as a 502, routing retries it or falls back (`retry_on: server_error`), and a client
    sees the failure (docs/providers.md)."""
    return UnusableAnswer(f"upstream `{name}` could not produce a valid function call (Gemini's finish reason "
                          f"{_MALFORMED}); the same request may succeed if sent again")


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


def chat_completion(answer: dict[str, Any], name: str = "gemini") -> tuple[dict[str, Any], Usage | None]:
    """A `generateContent` answer as a `chat.completion`, and its usage (`name`: the provider's, for an error)."""
    blocked = _blocked(answer)
    if blocked is not None:
        raise blocked
    ids = itertools.count()
    prefix = ""  # made at the first call without an id
    choices = []
    for position, candidate in enumerate(answer.get("candidates") or ()):
        if candidate.get("finishReason") == _MALFORMED:
            raise _malformed(name)
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for part in (candidate.get("content") or {}).get("parts") or ():
            if isinstance(part.get("text"), str) and not part.get("thought"):
                texts.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                call = part["functionCall"]
                prefix = prefix or _id_prefix()
                calls.append(_signed({"id": call.get("id") or f"{prefix}{next(ids)}", "type": "function", "function": {
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

    __slots__ = ("_calls", "_error", "_finished", "_ids", "_name", "_serial", "_usage", "_writer")

    def __init__(self, error: Callable[[dict[str, Any]], GatewayError] | None = None, name: str = "gemini") -> None:
        # An `{"error": {...}}` event mid-stream (quota exhausted, overloaded after the 200): the error the client
        # is told, as the provider maps and scrubs it (`GeminiProvider._event_error`).
        self._error = error
        self._name = name
        self._writer: ChunkWriter | None = None
        self._calls: dict[int, int] = {}  # candidate -> tool calls so far
        self._ids = ""  # the stream's tool call ids' prefix (`_id_prefix`), made at its first call
        self._serial = 0  # tool calls so far, all candidates: each id's number
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
                    self._ids = self._ids or _id_prefix()
                    serial = self._serial
                    self._serial = serial + 1
                    events.append(writer.chunk({"tool_calls": [_signed({
                        "index": number, "id": call.get("id") or f"{self._ids}{serial}", "type": "function",
                        "function": {"name": call.get("name"), "arguments": _encode(call.get("args") or {}).decode()},
                    }, part)]}, index=index))
            reason = candidate.get("finishReason")
            if reason == _MALFORMED:  # (the events of this one are dropped: before any content, it can fall back)
                raise _malformed(self._name)
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
