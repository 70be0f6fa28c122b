"""Gemini's `generateContent` answer as Chat Completions: complete (`chat_completion`) or streamed (`GeminiEvents`).

Answer: candidates become choices; function calls tool calls with ids the
gateway makes (`call_<random>_<n>`, unique per answer: Gemini sends none);
`finishReason` a finish reason or an error, each of Gemini's values deliberately
(`_FINISHES`, `_FAILED`; the table is in docs/providers.md): a filter's or a
policy's `content_filter`, a failure of the model (`MALFORMED_FUNCTION_CALL`,
`UNEXPECTED_TOOL_CALL`, ...) a 502 `UnusableAnswer` (the answer is lost; a retry
or another target may succeed), a reason that says nothing of the answer
(`OTHER`, a value added after this list) `stop` unless the candidate is empty;
`usageMetadata` OpenAI's usage (cached content tokens as
`prompt_tokens_details.cached_tokens`, tool-use prompt tokens in
`prompt_tokens`); an answer refused as an error keeps
its usage on the error (`_billed`: Google generated it, and bills it; the
request's cost counts it, docs/accounting.md). A prompt Gemini blocks
(`promptFeedback.blockReason`) is a 400 `content_policy_violation`; an answer with no candidates and no
`blockReason` (Gemini sends some) an `UnusableAnswer`, as an empty candidate.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import ContentPolicyViolation, GatewayError, Unsupported, UnusableAnswer, UpstreamError
from ..schemas.events import DONE, StreamError, StreamEvent, UsageReport
from ..schemas.openai import CompletionTokensDetails, PromptTokensDetails, Usage, is_count, unusable_usage
from .common import ChunkWriter, StreamProtocolError

__all__ = ["GeminiEvents", "chat_completion"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode
# Gemini's `FinishReason`s (google-genai's `types.FinishReason`, 24 values in 2026), each placed on purpose.
# The reasons that end a usable answer: their finish reason (`stop` becomes `tool_calls` beside a call: `_finish`).
_FINISHES = {
    "STOP": "stop",
    "MAX_TOKENS": "length", "CONTINUATION": "length",  # (CONTINUATION: cut at a per-request limit, not complete)
    # A filter or a policy cut or withheld (part of) the answer: what OpenAI's `content_filter` says. LANGUAGE is
    # Gemini's flag on a language it does not serve; IMAGE_OTHER an image withheld for a reason it does not
    # name (in practice its output checks); ESCALATION an escalation rule's filter; MODEL_ARMOR Vertex AI's filter.
    **dict.fromkeys(("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "LANGUAGE", "IMAGE_SAFETY",
                     "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "ESCALATION", "MODEL_ARMOR"),
                    "content_filter"),
}
_AGAIN = "the same request may succeed if sent again"
# The model failed: what it failed at, and what may help. As `stop` each was an answer that looked whole (often an
# empty one) where the model did not do its task; each is an `UnusableAnswer` (`_unusable`).
_FAILED = {
    "MALFORMED_FUNCTION_CALL": ("could not produce a valid function call", _AGAIN),
    "UNEXPECTED_TOOL_CALL": ("called a function it was not given, or while function calling was off", _AGAIN),
    "TOO_MANY_TOOL_CALLS": ("made too many tool calls before a final answer", _AGAIN),
    "MALFORMED_RESPONSE": ("produced a malformed answer", _AGAIN),
    "NO_IMAGE": ("produced no image where one was expected", _AGAIN),
}
# The request's fault, not the model's: a Gemini tool call sent back without its `extra_content`, or a history from
# another model. The same request fails again on this target (a retry is spent in vain), another target may answer
# it: `Unsupported`, as a field the target lacks (the next target is tried; a 400 when none could).
_UNSIGNED = "MISSING_THOUGHT_SIGNATURE"
_DENIED = "PUP_LIMITED_DISABLED"  # the account behind the key, not the model: a failure of the target (`_unusable`)
_SHOWN = re.compile(r"[A-Z][A-Z_]{0,39}")  # an unknown reason that may be named in an error message
_COUNTS = ("promptTokenCount", "toolUsePromptTokenCount", "thoughtsTokenCount", "candidatesTokenCount",
           "totalTokenCount", "cachedContentTokenCount")  # `usageMetadata`'s counts (`_usage`)


def _usage(metadata: Any) -> tuple[Usage, dict[str, Any]] | None:
    if not isinstance(metadata, dict):
        return None
    # The results of built-in tools (URL context, code execution, ...) read back by the model: input tokens Google
    # counts apart from the prompt (and in `totalTokenCount`), and bills as input.
    prompt = _int(metadata.get("promptTokenCount")) + _int(metadata.get("toolUsePromptTokenCount"))
    thoughts = _int(metadata.get("thoughtsTokenCount"))
    completion = _int(metadata.get("candidatesTokenCount")) + thoughts
    total = _int(metadata.get("totalTokenCount")) or prompt + completion
    cached = _int(metadata.get("cachedContentTokenCount"))  # (pricing bounds it by the prompt)
    shape = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total,
             "prompt_tokens_details": {"cached_tokens": cached},
             "completion_tokens_details": {"reasoning_tokens": thoughts}}
    if not all(is_count(metadata.get(name)) for name in _COUNTS):
        # A count that is there but no count (a string, a negative number): billed at the gateway's own count, as
        # an answer without usage is, not at 0 (`unusable_usage`).
        return unusable_usage(), shape
    # The cached and thinking tokens priced apart (`cached_input_per_mtok`, `reasoning_per_mtok`), as OpenAI's are.
    return Usage(prompt, completion, total, PromptTokensDetails(cached_tokens=cached) if cached else None,
                 CompletionTokensDetails(reasoning_tokens=thoughts) if thoughts else None), shape


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def _finish(reason: Any, has_calls: bool) -> str:
    """The finish reason of a candidate `_unusable` let through: a reason that says nothing of the answer (`OTHER`,
    `FINISH_REASON_UNSPECIFIED`, one added after `_FINISHES`) is `stop`. A call cut by the token limit is a truncated
    answer (`length`), one cut by a filter a filtered one (`content_filter`): only `stop` becomes `tool_calls`."""
    finish = _FINISHES.get(reason, "stop") if type(reason) is str else "stop"
    return "tool_calls" if has_calls and finish == "stop" else finish


def _id_prefix() -> str:
    """What one answer's tool call ids start with (`call_<12 hex digits>_`, then its number). Numbered alone, every
    answer's were `call_0`, `call_1`...: a conversation's second tool turn repeated its first's ids, which clients
    that key results by id mix up, and an OpenAI-compatible fallback target may refuse."""
    return f"call_{os.urandom(6).hex()}_"


def _unusable(reason: Any, said: bool, name: str) -> GatewayError | None:
    """The error a candidate's finish `reason` (not one of `_FINISHES`) is instead of a finish reason, if any;
    `said`: whether the candidate has any content (text, a call).

    A failure of the model (`_FAILED`; `MALFORMED_FUNCTION_CALL`: a call that was not valid, often Python code, left
    out of the answer, which then holds nothing or its text before the call): as `stop` it was an answer a client
    took for the model's last word; as an `UnusableAnswer`, a 502, routing retries it or falls back (`retry_on:
    server_error`), its target's breaker is not blamed, and the client sees the failure. `PUP_LIMITED_DISABLED`
    says the key's account is limited: a plain 502, which the breaker counts (every request will fail so).
    `MISSING_THOUGHT_SIGNATURE` is the request's (`_UNSIGNED`): `Unsupported`, the next target tried. Any other
    reason (`OTHER`, a value Google adds later) says nothing of the answer: one with content is kept as `stop`
    (throwing text away on a guess is worse), an empty one is no answer (docs/providers.md)."""
    if reason == _UNSIGNED:
        return Unsupported(f"a conversation whose Gemini tool calls came back without their thought signatures "
                           f"(Gemini's finish reason {_UNSIGNED} from upstream `{name}`): each tool call of Gemini's "
                           "must come back with its `extra_content`", param="messages")
    failed = _FAILED.get(reason) if type(reason) is str else None
    if failed is not None:
        return UnusableAnswer(f"upstream `{name}` {failed[0]} (Gemini's finish reason {reason}); {failed[1]}")
    if reason == _DENIED:
        return UpstreamError(f"upstream `{name}` refused to answer: the account of its API key is limited or disabled "
                             f"under Google's Prohibited Use Policy (Gemini's finish reason {_DENIED})")
    if said:
        return None
    shown = reason if type(reason) is str and _SHOWN.fullmatch(reason) else "missing" if reason is None else "garbled"
    return UnusableAnswer(f"upstream `{name}` returned an empty answer (Gemini's finish reason {shown}); {_AGAIN}")


def _billed(error: GatewayError, usage: tuple[Usage, dict[str, Any]] | None) -> GatewayError:
    """`error`, for an answer `_unusable` refused, with the usage Gemini reported with it (`GatewayError.usage`):
    the answer was generated, and Google bills it whatever the gateway makes of it."""
    if usage is not None:
        error.usage = usage[0]
    return error


def _says(candidate: dict[str, Any]) -> bool:
    """Whether a candidate has text or a call (read only for a reason `_unusable` refuses when it is empty)."""
    for part in (candidate.get("content") or {}).get("parts") or ():
        text = part.get("text")
        if (isinstance(text, str) and text and not part.get("thought")) or isinstance(part.get("functionCall"), dict):
            return True
    return False


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


def _no_candidates(name: str) -> UnusableAnswer:
    """The error an answer with no candidates (`[]` or none, and no `blockReason`: `_blocked`) is, complete or
    streamed: no answer, as an empty candidate is (`_unusable`), retried, fallen back from, and billed. As a
    `chat.completion` with no choices it was a 200 that billed the prompt, was never fallen back from, and broke
    clients (`choices[0]`; an empty Anthropic message that ended its turn)."""
    return UnusableAnswer(f"upstream `{name}` returned no candidates (no answer, and no blockReason); {_AGAIN}")


def chat_completion(answer: dict[str, Any], name: str = "gemini") -> tuple[dict[str, Any], Usage | None]:
    """A `generateContent` answer as a `chat.completion`, and its usage (`name`: the provider's, for an error)."""
    blocked = _blocked(answer)
    if blocked is not None:
        raise blocked
    candidates = answer.get("candidates")
    if not candidates:
        raise _billed(_no_candidates(name), _usage(answer.get("usageMetadata")))
    ids = itertools.count()
    prefix = ""  # made at the first call without an id
    choices = []
    for position, candidate in enumerate(candidates):
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
        reason = candidate.get("finishReason")
        if type(reason) is not str or reason not in _FINISHES:
            error = _unusable(reason, bool(calls) or any(texts), name)
            if error is not None:
                raise _billed(error, _usage(answer.get("usageMetadata")))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                                   "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": candidate.get("index", position), "message": message, "logprobs": None,
                        "finish_reason": _finish(reason, bool(calls))})
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
            if reason and (type(reason) is not str or reason not in _FINISHES):
                # (this event's chunks are dropped: before any content, the stream can still fall back; an
                # earlier event of the candidate is taken to have held content)
                error = _unusable(reason, not first or self._calls[index] > 0 or _says(candidate), self._name)
                if error is not None:
                    return self._refused(error, answer, writer)
            if reason:
                self._finished.add(index)
                events.append(writer.chunk({}, _finish(reason, self._calls[index] > 0), index=index))
        usage = _usage(answer.get("usageMetadata"))
        if usage is not None:
            self._usage = usage
        return events

    def _refused(self, error: GatewayError, answer: dict[str, Any], writer: ChunkWriter) -> list[StreamEvent]:
        """The end of a stream whose answer `_unusable` refused: its usage (this event's, else the latest event's:
        each is the answer's so far) on the error, which routing counts when the stream can still fall back (before
        any content, `routing.attempts.peek`), and as a `UsageReport` before the error's event, which the bill reads
        when the client already has content. The error as the last event, as `TranslatedStream` makes a raised one."""
        usage = _usage(answer.get("usageMetadata")) or self._usage
        if usage is None:
            return [StreamError(error)]
        return [UsageReport(usage[0], writer.usage_chunk(usage[1])), StreamError(_billed(error, usage))]

    @property
    def usage_so_far(self) -> Usage | None:
        """The latest event's `usageMetadata` (each is the answer's so far), for a stream that ends before its last
        event: its prompt and cached figures are Google's (`TranslatedStream.usage_so_far`)."""
        return self._usage[0] if self._usage is not None else None

    def end(self) -> list[StreamEvent]:
        if self._writer is not None and not self._calls:  # events, none with a candidate: as a complete answer's
            return self._refused(_no_candidates(self._name), {}, self._writer)
        if not self._finished or self._writer is None or len(self._finished) < len(self._calls):
            raise StreamProtocolError("the end of the stream before a finish reason")
        if self._usage is None:
            return [DONE]
        return [UsageReport(self._usage[0], self._writer.usage_chunk(self._usage[1])), DONE]
