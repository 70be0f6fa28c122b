"""Anthropic's Messages answer back to Chat Completions: complete (`chat_completion`) or streamed (`AnthropicEvents`).

Answer: text blocks become `content`, `tool_use` blocks `tool_calls`, thinking
and redacted_thinking blocks `reasoning_content` and `reasoning_blocks` (see
`thinking.py`: in a stream, `delta.reasoning_content` as the thinking comes and a
`delta.reasoning_blocks` entry, with its `index`, once each block is over), stop
reasons finish reasons (a matched stop sequence also as the choice's
`stop_reason`, as vLLM reports it), and usage OpenAI's shape (`prompt_tokens`
counts cache reads and writes, as OpenAI's does;
`prompt_tokens_details.cached_tokens` the reads,
`prompt_tokens_details.cache_write_tokens` the writes).

Stream: `AnthropicEvents` turns each Messages event into chunks as it arrives;
an event out of order (a delta before its block started, anything before
`message_start`) raises `StreamProtocolError`, which ends the client's stream
with an error event; so does an event whose message, block, delta or usage is
not an object (`_object`). The usage known so far is kept for a stream that ends
early (`usage_so_far`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import GatewayError
from ..schemas.events import DONE, StreamError, StreamEvent, UsageReport
from ..schemas.openai import PromptTokensDetails, Usage, is_count, unusable_usage
from .common import ChunkWriter, StreamProtocolError
from .thinking import BLOCKS, REASONING, Thinking

__all__ = ["FINISH_REASONS", "AnthropicEvents", "chat_completion", "chat_usage", "matched_stop"]

_decode = msgspec.json.Decoder(dict[str, Any]).decode
_encode = msgspec.json.Encoder().encode

_THINKING = frozenset({"thinking", "redacted_thinking"})
_COUNTS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens", "output_tokens")
FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop", "max_tokens": "length",
    "tool_use": "tool_calls", "refusal": "content_filter", "model_context_window_exceeded": "length",
}


def matched_stop(reason: Any, sequence: Any) -> str | None:
    """The stop sequence that ended the answer (None when none did), for the choice's `stop_reason`."""
    return sequence if reason == "stop_sequence" and isinstance(sequence, str) else None


def chat_usage(usage: dict[str, Any]) -> tuple[Usage, dict[str, Any]]:
    """Anthropic's usage as the gateway's `Usage` and as OpenAI's usage object, both with the cache reads and
    writes (what accounting prices apart, and what an answer replayed from the gateway's cache reports), and of
    the writes those to the 1-hour cache (`cache_write_1h_tokens`, when Anthropic split its writes by lifetime in
    `cache_creation`, as its current API does). A count that is there but no count (a string, a negative number)
    makes the usage unusable (`unusable_usage`): the answer is billed at the gateway's own count, as one without
    usage is, not at 0."""
    fresh = _int(usage.get("input_tokens"))
    read = _int(usage.get("cache_read_input_tokens"))
    written = _int(usage.get("cache_creation_input_tokens"))
    output = _int(usage.get("output_tokens"))
    prompt = fresh + read + written
    shown: dict[str, int] = {"cached_tokens": read, "cache_write_tokens": written}
    shape = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output,
             "prompt_tokens_details": shown}
    if not all(is_count(usage.get(name)) for name in _COUNTS):
        return unusable_usage(), shape
    if not (read or written):
        return Usage(prompt, output, prompt + output), shape
    breakdown = usage.get("cache_creation")
    hour = _hour_writes(breakdown, written)
    if isinstance(breakdown, dict):  # (0 too: a `/v1/messages` client gets the split back, `anthropic_answer`)
        shown["cache_write_1h_tokens"] = hour
    details = PromptTokensDetails(cached_tokens=read, cache_write_tokens=written, cache_write_1h_tokens=hour)
    return Usage(prompt, output, prompt + output, details), shape


def _hour_writes(breakdown: Any, written: int) -> int:
    """Of the cache writes, those to the 1-hour cache (`cache_creation.ephemeral_1h_input_tokens`, billed at twice
    the input price where a 5-minute write is 1.25 times it); at most the writes' total."""
    return min(_int(breakdown.get("ephemeral_1h_input_tokens")), written) if isinstance(breakdown, dict) else 0


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def chat_completion(answer: dict[str, Any]) -> tuple[dict[str, Any], Usage | None]:
    """A Messages answer as a `chat.completion`, and its usage."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking = Thinking()
    for block in answer.get("content") or ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _THINKING:
            thinking.add(block, len(calls))
        elif kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            arguments = _encode(block.get("input", {})).decode()
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": arguments}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None,
                               "refusal": None}
    if calls:
        message["tool_calls"] = calls
    thinking.put(message)
    usage, shape = chat_usage(answer["usage"]) if isinstance(answer.get("usage"), dict) else (None, None)
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": FINISH_REASONS.get(str(answer.get("stop_reason")), "stop")}
    sequence = matched_stop(answer.get("stop_reason"), answer.get("stop_sequence"))
    if sequence is not None:
        choice["stop_reason"] = sequence
    body: dict[str, Any] = {
        "id": str(answer.get("id") or "msg"), "object": "chat.completion", "created": int(time.time()),
        "model": answer.get("model"), "choices": [choice],
    }
    if shape is not None:
        body["usage"] = shape
    return body, usage


class AnthropicEvents:
    """Per stream: Messages events in, chat.completion.chunk events out, one by one as they come."""

    __slots__ = ("_blocks", "_entries", "_error", "_filled", "_finish", "_opened", "_started", "_thinking", "_tools",
                 "_usage", "_writer")

    def __init__(self, error: Callable[[dict[str, Any]], GatewayError]) -> None:
        self._writer: ChunkWriter | None = None
        self._error = error  # maps an in-stream `error` event's body to the client's error
        self._blocks: dict[int, int | None] = {}  # open block index -> tool call index (None: a text block)
        self._tools = 0
        self._filled: set[int] = set()  # tool calls whose input has come (`content_block_stop`)
        self._thinking: dict[int, dict[str, Any]] = {}  # open thinking block index -> its entry (`thinking.py`)
        self._entries = 0  # `reasoning_blocks` entries sent: the next one's `index`
        self._usage: dict[str, Any] = {}
        self._finish: str | None = None
        self._started = False
        self._opened = False

    def feed(self, payload: bytes) -> list[StreamEvent]:
        event = _decode(payload)
        kind = event.get("type")
        if kind == "ping":
            return []
        if kind == "error":
            detail = event.get("error")
            return [StreamError(self._error(detail if isinstance(detail, dict) else {}))]
        if kind == "message_start":
            if self._started:
                raise _order("a second message_start")
            message = _object(event.get("message"), "message")
            self._started = True
            self._usage.update(_object(message.get("usage"), "message.usage"))
            self._writer = ChunkWriter(str(message.get("id") or "msg"), message.get("model"))
            return []  # the role chunk waits for the first block: an `error` before it is a failed attempt
        writer = self._writer
        if writer is None:
            raise _order(f"`{_name(kind)}` before message_start")
        if kind == "content_block_start":
            index, block = event.get("index"), _object(event.get("content_block"), "content_block")
            if not isinstance(index, int) or index in self._blocks:
                raise _order("content_block_start for a block already started")
            events = self._role(writer)
            if block.get("type") == "tool_use":
                tool = self._tools
                self._tools += 1
                self._blocks[index] = tool
                events.append(writer.chunk({"tool_calls": [{"index": tool, "id": block.get("id"), "type": "function",
                                                            "function": {"name": block.get("name"),
                                                                         "arguments": ""}}]}))
                return events
            self._blocks[index] = None
            kind = block.get("type")
            if kind in _THINKING:
                return events + self._thinking_start(writer, index, block)
            text = block.get("text")
            if isinstance(text, str) and text:
                events.append(writer.chunk({"content": text}))
            return events
        if kind == "content_block_delta":
            index, delta = event.get("index"), event.get("delta")
            if type(delta) is not dict:  # (the stream's most frequent event: one check on its common path)
                delta = _object(delta, "delta")
            if index not in self._blocks:
                raise _order("content_block_delta for a block that was not started")
            dtype = delta.get("type")
            if dtype == "text_delta":
                return [writer.chunk({"content": delta.get("text", "")})]
            if dtype == "input_json_delta":
                position = self._blocks[index]
                if position is None:
                    raise _order("input_json_delta in a text block")
                piece = delta.get("partial_json", "")
                if piece:
                    self._filled.add(position)
                return [writer.chunk({"tool_calls": [{"index": position, "function": {"arguments": piece}}]})]
            entry = self._thinking.get(index)
            if dtype == "thinking_delta" and entry is not None:
                piece = delta.get("thinking")
                if not isinstance(piece, str) or not piece:
                    return []
                entry["length"] += len(piece)
                return [writer.chunk({REASONING: piece})]
            if dtype == "signature_delta" and entry is not None and isinstance(delta.get("signature"), str):
                entry["signature"] += delta["signature"]
                return []  # sent with the block's entry, once the block is over
            return []  # citation deltas (and deltas added later) have no Chat Completions form
        if kind == "content_block_stop":
            index = event.get("index")
            if index not in self._blocks:
                raise _order("content_block_stop for a block that was not started")
            position = self._blocks[index]
            entry = self._thinking.pop(index, None)
            if entry is not None:  # a thinking block's signature and length: its text came as `reasoning_content`
                return [self._entry(writer, entry)]
            if position is not None and position not in self._filled:  # a tool without input sends only `""`: its
                # arguments are `{}`, as the complete answer's (a client parsing `""` as JSON fails)
                return [writer.chunk({"tool_calls": [{"index": position, "function": {"arguments": "{}"}}]})]
            return []
        if kind == "message_delta":
            counts = _object(event.get("usage"), "usage")
            self._usage.update({k: v for k, v in counts.items() if v is not None})
            delta = _object(event.get("delta"), "delta")
            reason = delta.get("stop_reason")
            self._finish = FINISH_REASONS.get(str(reason), "stop")
            sequence = matched_stop(reason, delta.get("stop_sequence"))
            return [*self._role(writer), writer.chunk({}, self._finish, stop_reason=sequence)]
        if kind == "message_stop":
            if self._finish is None:
                raise _order("message_stop before message_delta")
            usage, shape = chat_usage(self._usage)
            return [UsageReport(usage, writer.usage_chunk(shape)), DONE]
        return []  # event types added later are skipped, as Anthropic's versioning policy asks

    def _thinking_start(self, writer: ChunkWriter, index: int, block: dict[str, Any]) -> list[StreamEvent]:
        """A thinking block begins (its text, if any, as `reasoning_content`; its entry when it stops); a redacted
        one is whole at its start: its entry now."""
        entry: dict[str, Any]
        if block.get("type") == "redacted_thinking":
            entry = {"type": "redacted_thinking", "data": str(block.get("data") or "")}
            if self._tools:
                entry["after_tool_calls"] = self._tools
            return [self._entry(writer, entry)]
        text = block.get("thinking")
        text = text if isinstance(text, str) else ""
        signature = block.get("signature")
        entry = {"type": "thinking", "signature": signature if isinstance(signature, str) else "",
                 "length": len(text)}
        if self._tools:
            entry["after_tool_calls"] = self._tools
        self._thinking[index] = entry
        return [writer.chunk({REASONING: text})] if text else []

    def _entry(self, writer: ChunkWriter, entry: dict[str, Any]) -> StreamEvent:
        """A block's `reasoning_blocks` entry, with its `index` (its place in the turn's list), as a tool call's
        delta has: the SDKs join a list of objects by it (the `openai` SDK's stream helper refuses an entry
        without one as soon as a second comes)."""
        index = self._entries
        self._entries += 1
        return writer.chunk({BLOCKS: [{"index": index, **entry}]})

    def _role(self, writer: ChunkWriter) -> list[StreamEvent]:
        """OpenAI's first chunk (the role), once, before the first content."""
        if self._opened:
            return []
        self._opened = True
        return [writer.chunk({"role": "assistant", "content": ""})]

    def end(self) -> list[StreamEvent]:
        raise _order("the end of the stream before message_stop")

    @property
    def usage_so_far(self) -> Usage | None:
        """The usage `message_start` reported (and a `message_delta`'s, if one came), for a stream that ends before
        `message_stop` (None before `message_start`): Anthropic bills the prompt as it counted it there, its cache
        reads and writes apart, whatever followed (`TranslatedStream.usage_so_far`)."""
        return chat_usage(self._usage)[0] if self._started else None


# The event types Anthropic's Messages stream sends: the only ones an error names. Any other `type` is upstream
# text (a provider's key, echoed as one, is an identifier too), which no error may carry to a client.
_EVENT_TYPES = frozenset({"message_start", "content_block_start", "content_block_delta", "content_block_stop",
                          "message_delta", "message_stop", "ping", "error"})


def _name(kind: Any) -> str:
    return kind if isinstance(kind, str) and kind in _EVENT_TYPES else "an unknown event"


def _object(value: Any, field: str) -> dict[str, Any]:
    """An event's object field (absent or null: empty); of another type the event is malformed, which ends the stream
    with an error event (the message names the field, never its value: upstream text)."""
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    raise StreamProtocolError(f"a malformed stream event (`{field}` is not an object)")


def _order(what: str) -> StreamProtocolError:
    return StreamProtocolError(f"an event out of order ({what})")
