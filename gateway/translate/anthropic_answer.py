"""The answer to a Messages request: a chat answer translated back to Anthropic's `message`, complete or streamed.

Stream: `MessagesStream` writes Anthropic's event sequence (message_start,
content_block_start / delta / stop, message_delta with the usage, message_stop)
from the chat chunks, one block per text run, thinking block or tool call: text and
thinking (`thinking_stream.py`) as they come, up to the first tool call; the tool
calls (and anything after them) whole, at the end, since a chat stream may
interleave the pieces of its tool calls (the calls not at all when the stream ends
blocked). A complete answer's thinking blocks come before its text and tool calls
(`thinking.ordered`).

A tool call's Gemini thought signature (`extra_content.google.thought_signature`) has no field of its own in
Messages: it rides in the tool_use id, after `SIGNED` (`tool_id_signature.signed_id`), which the client sends back
unchanged with the call and its result; the ingress takes it out again (`tool_id_signature.unsigned`).
Every chat tool call is a tool_use block (`anthropic_tool_use`): a legacy `function_call` too (with an id made for
it, as for any call without one), and a custom tool's call, its free text as `{"input": text}` (Messages' input is
an object).

A stop sequence that ended the answer is `stop_reason: "stop_sequence"` with its
`stop_sequence` when the chat answer's choice names it in `stop_reason` (as an
Anthropic upstream's translated answer and vLLM do); else `end_turn`, or `tool_use` when the answer holds a tool
call: OpenAI's API ends a call it was made to make (a named `tool_choice`, Messages' `{"type": "tool"}`) with
`finish_reason: "stop"`, and vLLM, SGLang and Ollama any call, where the Anthropic SDK's tool runner takes
`end_turn` for the end of the loop and runs no tool (Gemini's translator does the same: `gemini_to_chat._finish`).

An answer that is none is no `message` either (`_failure`), where a Chat Completions client reads the failure in the
answer itself: a choice that failed (`finish_reason: "error"`, with OpenRouter's choice `error`), one without a
finish reason (the upstream stopped before its end, its stream reached `[DONE]` all the same) and an answer without
a choice (`"choices": []`; a stream of only its usage). Written as Messages has them, each would be a clean
`end_turn`, the text so far taken for the model's last word. A complete answer is then an `UpstreamError` (as a
malformed one, below); a stream ends with its `error` event instead of `message_delta` and `message_stop`. The
choice's own error words go with it (sanitized, and withheld under an enforcing output guard: from a complete
answer's error by the guard stage, `GatewayError.bare`; from a stream's choice before it reaches the framer,
`answer_fields.withheld_error`).

An upstream answer (or chunk) whose choices, message, delta, tool calls or function are of another type than
OpenAI's (`"delta": "oops"`, `"choices": [null]`), or with a tool call without a name, is malformed: an
`UpstreamError`. A complete answer is translated within its attempt (`messages_answer`), which then fails as one
that is not JSON does (retried, fallen back from, a 502 at the end); a stream's ends with its `error` event
(`api.proxy` sends it; for a nameless call, in place of the answer's end).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import UnusableAnswer, UpstreamError, with_detail
from ..sanitize import sanitize_upstream_message
from ..schemas.events import Chunk, StreamError, StreamEvent, UsageReport, begins_another_call
from ..schemas.openai import Usage
from .anthropic_ingress import STOP_REASONS, error_type
from .anthropic_tool_use import CALL_PART, CALL_TEXT, tool_input, tool_name, tool_use, tool_use_id
from .common import malformed, upstream_array, upstream_object
from .thinking import BLOCKS, REASONING, messages_blocks, ordered
from .thinking_stream import HeldThinking, ThinkingStream
from .tool_id_signature import signature_of

__all__ = ["HELD_CALL_CHARS", "HELD_CHARS", "MessagesStream", "messages_answer", "messages_body", "messages_response"]

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
_NO_USAGE = {"input_tokens": 0, "output_tokens": 0}
_LEGACY = -1  # a streamed legacy `delta.function_call`'s place among the tool calls (theirs count from 0)
_PING_EVERY = 64  # held pieces in a row without a byte written: then a `ping`, so that no proxy finds the stream idle
# What a stream holds from its first tool call on (characters; `MessagesStream`): past either, the stream ends with an
# `error` event. A call's arguments: the 8 MiB an upstream stream's event may carry; all held blocks together (every
# string they hold, `_BLOCK_CHARS` for each block and `_PIECE_CHARS` for each piece) the 64 MiB of a complete answer
# (`max_response_bytes`' default).
HELD_CALL_CHARS = 8 * 1024 * 1024
HELD_CHARS = 64 * 1024 * 1024
_BLOCK_CHARS = 256  # what a held block (a call, a text run, a thinking run or entry) counts beyond its strings: about
# the memory its objects take, so that many empty blocks (an event of 100,000 calls without arguments) count too
_PIECE_CHARS = 64  # what a held piece (of text, thinking or a call's arguments) counts beyond its characters: its
# string's object (49 bytes for ASCII, 74 and more else) and its list slot (8), so that a stream of 1-character
# pieces counts about the memory it takes (64 Mi characters in pieces of one or two could take GiBs)
_ENTRY_FIELDS = (("data", str), ("signature", str), ("length", int), ("after_tool_calls", int))  # (`messages_blocks`)


def _usage_split(prompt: int, completion: int, read: int, written: int) -> dict[str, Any]:
    """Anthropic's usage: `input_tokens` leaves out the prompt tokens read from and written to the prompt cache,
    which have fields of their own (OpenAI's `prompt_tokens` counts them)."""
    out = {"input_tokens": max(0, prompt - read - written), "output_tokens": completion}
    if read or written:
        out["cache_read_input_tokens"] = read
        out["cache_creation_input_tokens"] = written
    return out


def _anthropic_usage(usage: Any) -> dict[str, Any] | None:
    """OpenAI's usage object (JSON) as Anthropic's; None when there is none. The cache writes split by lifetime
    (`cache_creation`) when the usage gives the 1-hour ones (`cache_write_1h_tokens`: an Anthropic upstream's, which
    `anthropic_to_chat.chat_usage` shows whenever Anthropic split them, 0 too)."""
    if not isinstance(usage, dict):
        return None
    found = usage.get("prompt_tokens_details")
    details: dict[str, Any] = found if isinstance(found, dict) else {}
    written = details.get("cache_write_tokens") or 0
    out = _usage_split(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0,
                       details.get("cached_tokens") or 0, written)
    hour = details.get("cache_write_1h_tokens")
    if type(hour) is int and type(written) is int and "cache_creation_input_tokens" in out:
        hour = min(max(hour, 0), written)
        out["cache_creation"] = {"ephemeral_5m_input_tokens": written - hour, "ephemeral_1h_input_tokens": hour}
    return out


def _usage_shape(usage: Usage | None) -> dict[str, Any] | None:
    """The gateway's `Usage` (an upstream's, or its own estimate) as Anthropic's, cache details included."""
    if usage is None:
        return None
    return _usage_split(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.cache_write_tokens)


def _stop(finish: Any, matched: Any, called: bool) -> tuple[str, str | None]:
    """Anthropic's `stop_reason` and `stop_sequence` for a chat finish reason and the choice's `stop_reason`;
    `called`: the answer holds a tool call (`tool_use`, where the reason would be `end_turn`)."""
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    reason = STOP_REASONS.get(str(finish), "end_turn")
    return "tool_use" if called and reason == "end_turn" else reason, None


def _failure(answered: bool, finish: Any, error: Any) -> UpstreamError | None:
    """The error an answer is instead of a `message`, if it is none: no choice (`answered`: an `UnusableAnswer`, as
    Gemini's answer without a candidate is, `gemini_to_chat`), a choice that failed (`finish_reason: "error"`, with
    its `error`: the upstream's words, sanitized, as the error's detail) or one without a finish reason. None for a
    finished answer."""
    if not answered:
        return UnusableAnswer("the upstream's answer holds no choice: there is no message to write")
    if finish == "error":
        words = error.get("message") if isinstance(error, dict) else error
        return with_detail(UpstreamError, "the upstream's answer failed (its finish reason is `error`)",
                           sanitize_upstream_message(words) if isinstance(words, str) else "")
    if not finish:
        return UpstreamError("the upstream's answer ended without a finish reason: it may be cut short, and is not "
                             "written as a whole message")
    return None


def _message_id(chat_id: Any) -> str:
    text = str(chat_id) if isinstance(chat_id, str) else ""
    return text if text.startswith("msg_") else "msg_" + (text.removeprefix("chatcmpl-") or secrets.token_hex(12))


def _text_of(content: Any) -> str:
    """A message's or a delta's text: a string, or the text parts some OpenAI-compatible servers send instead."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content
                       if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
    return ""


def messages_response(body: bytes, alias: str, estimate: Usage | None = None) -> bytes:
    """`messages_answer` and `messages_body` in one (a cache hit's answer, one a stage rewrote)."""
    return messages_body(messages_answer(body), alias, estimate)


def messages_answer(body: bytes) -> dict[str, Any]:
    """A `chat.completion` as Anthropic's `message`, its model and (when the upstream sent none) its usage left to
    `messages_body`: the translation that may refuse the answer, made within the attempt (`routing.exchange`)."""
    data = upstream_object(_decode(body), "the answer")
    choices = upstream_array(data.get("choices") or [], "`choices`")
    choice = upstream_object(choices[0], "`choices[0]`") if choices else {}
    failure = _failure(bool(choices), choice.get("finish_reason"), choice.get("error"))
    if failure is not None:
        raise failure
    message = upstream_object(choice.get("message") or {}, "`choices[0].message`")
    text = _text_of(message.get("content"))
    refusal = message.get("refusal")
    refused = not text and isinstance(refusal, str) and bool(refusal)  # OpenAI's refusal: its text, and its reason
    if refused:
        text = str(refusal)
    texts = [{"type": "text", "text": text}] if text else []
    tools = [tool_use(upstream_object(found, "a tool call"))
             for found in upstream_array(message.get("tool_calls") or [], "`message.tool_calls`")]
    if message.get("function_call") is not None:  # the legacy form: one call, without an id
        tools.append(tool_use({"function": upstream_object(message["function_call"], "`message.function_call`")}))
    content = texts + tools
    if message.get(REASONING) or message.get(BLOCKS):
        content = ordered(messages_blocks(message.get(REASONING), message.get(BLOCKS), signed_only=False), texts,
                          tools)
    reason, sequence = _stop(choice.get("finish_reason"), choice.get("stop_reason"), bool(tools))
    if refused and reason == "end_turn":
        reason = "refusal"
    return {"id": _message_id(data.get("id")), "type": "message", "role": "assistant", "model": None,
            "content": content, "stop_reason": reason, "stop_sequence": sequence,
            "usage": _anthropic_usage(data.get("usage"))}


def messages_body(answer: dict[str, Any], alias: str, estimate: Usage | None = None) -> bytes:
    """The `message` of `messages_answer`, named for `alias`, with the upstream's usage, else the gateway's
    `estimate` (Messages always has one)."""
    answer["model"] = alias
    if answer["usage"] is None:
        answer["usage"] = _usage_shape(estimate) or dict(_NO_USAGE)
    return _encode(answer)


def _chars(value: Any) -> int:
    """What a value held from an upstream's chunk counts toward `HELD_CHARS`: a string its characters; anything else
    (a name or an id of another type than OpenAI's, refused or replaced when written) its JSON's."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    return len(_encode(value))


def _held_entry(entry: Any) -> dict[str, Any] | None:
    """A thinking entry held after the first tool call (`thinking.messages_blocks`): only the fields written, of the
    types written; None for one that writes no block (not an object, of another type)."""
    if not isinstance(entry, dict) or entry.get("type") not in ("thinking", "redacted_thinking"):
        return None
    held = {"type": entry["type"]}
    for field, kind in _ENTRY_FIELDS:
        value = entry.get(field)
        if type(value) is kind:
            held[field] = value
    return held


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _encode({"type": kind, **data}) + b"\n\n"


class _HeldCall:
    """A streamed tool call, held until the answer ends: its pieces may come between another call's."""

    __slots__ = ("arguments", "custom", "id", "name", "signature", "size")

    def __init__(self, id_: Any, name: Any) -> None:
        self.id = id_
        self.name = name
        self.custom = False  # a custom tool's call: `arguments` hold its free text input (`tool_input`)
        self.arguments: list[str] = []
        self.signature: str | None = None  # its Gemini thought signature (`signed_id`)
        self.size = 0  # the characters of `arguments`, at most `HELD_CALL_CHARS`


class MessagesStream:
    """Per stream: chat chunks in, Anthropic's SSE event sequence out (framed, ready to send).

    Text is written as it comes, up to the first tool call. From there on the blocks are held and written at
    the end, whole, in the order they began: Messages writes one block after the other and cannot reopen one,
    while a chat stream may interleave its tool calls' pieces (call 0, then 1, then 0 again); and a tool call's
    input is checked as a complete answer's is (`tool_input`: invalid JSON under `_raw_arguments`, any other
    value than an object under `value`) only once all of it came. `estimate`, called at the end when the upstream
    sent no usage, is the gateway's own count (the usage of `message_start` is 0: nothing is known yet). A stream
    that ends blocked (`content_filter`: an output guard's block, or the upstream's filter) writes none of its held
    tool calls: their arguments stop where the stream was cut, and a client would get a call to run (a `tool_use`
    block, its input `_raw_arguments`) with the refusal; a complete answer blocked has no tool calls either.

    What is held is bounded: a call's arguments (or input) by `HELD_CALL_CHARS`, all the held blocks together by
    `HELD_CHARS` (their text, arguments, names, ids, signatures and thinking entries' data, `_BLOCK_CHARS` for
    each block and entry, and `_PIECE_CHARS` for each piece of text, thinking or arguments: memory, not only
    characters); past either, an `UpstreamError` (`_hold`), and `api.proxy` ends the stream with its `error` event,
    none of the held blocks written (the answer cannot be carried whole). So does a stream that reaches its end
    without a finished answer (`_failure`: no choice, a choice that failed, no finish reason): `_end` raises its
    `UpstreamError`, and the events of the batch framed before it are written before the `error` event (`_unsent`).
    """

    __slots__ = ("_alias", "_answered", "_calls", "_error", "_estimate", "_finish", "_held", "_held_chars", "_index",
                 "_matched", "_quiet", "_refused", "_started", "_stopped", "_text_open", "_thinking", "_unsent",
                 "_usage")

    def __init__(self, alias: str, estimate: Callable[[], Usage | None] | None = None) -> None:
        self._alias = alias
        self._estimate = estimate
        self._started = False
        self._stopped = False
        self._index = -1  # the last content block started (-1: none)
        self._text_open = False  # a text block written as it comes is open (at `_index`)
        self._calls: dict[int, _HeldCall] = {}  # the chat tool call index -> its held call
        self._held: list[_HeldCall | list[str] | HeldThinking] = []  # the blocks from the first tool call on
        self._held_chars = 0  # the characters they hold (`_hold`)
        self._thinking = ThinkingStream(_event, self._next_index)  # the thinking before it, as it comes
        self._quiet = 0  # pieces held since the last byte written
        self._finish: str | None = None
        self._matched: str | None = None  # the stop sequence that ended the answer, when the upstream named it
        self._usage: dict[str, Any] | None = None
        self._refused = False  # OpenAI's `refusal` text came (written as text): the stop reason is `refusal`
        self._answered = False  # a chunk had the choice (index 0): else the stream held no answer (`_failure`)
        self._error: Any = None  # the choice's `error`, when it failed (`finish_reason: "error"`)
        self._unsent: list[bytes] = []  # the events a batch framed before an `UpstreamError` (`frame`)

    def frame(self, events: list[StreamEvent]) -> bytes:
        out: list[bytes] = []
        try:
            for event in events:
                if isinstance(event, Chunk):
                    self._chunk(event.data(), out)
                elif isinstance(event, UsageReport):
                    self._usage = (_anthropic_usage(_decode(event.payload).get("usage")) if event.payload
                                   else None) or _usage_shape(event.usage)
                elif isinstance(event, StreamError):
                    out = [*self._unsent, *out]  # (the events framed before the error that `api.proxy` sends here)
                    self._unsent = []
                    out.append(_event("error", {"error": {"type": error_type(event.error),
                                                          "message": event.error.message}}))
                    self._stopped = True
                elif not self._stopped:
                    self._end(out)
        except UpstreamError:  # `api.proxy` ends the stream with it (a `StreamError`): what came before it goes first
            self._unsent = out
            raise
        if out:
            self._quiet = 0
        elif self._quiet >= _PING_EVERY:
            self._quiet = 0
            out.append(_event("ping", {}))
        return b"".join(out)

    def _start(self, out: list[bytes], chat_id: Any) -> None:
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"message": {
                "id": _message_id(chat_id), "type": "message", "role": "assistant", "model": self._alias,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": dict(_NO_USAGE)}}))

    def _end(self, out: list[bytes]) -> None:
        """The held blocks, then the stop reason and the usage (the upstream's, else the gateway's estimate); an
        `UpstreamError` instead for a stream that ended without a finished answer (`_failure`)."""
        failure = _failure(self._answered, self._finish, self._error)
        if failure is not None:
            raise failure
        blocked = self._finish == "content_filter"
        for block in () if blocked else self._held:
            if isinstance(block, _HeldCall):
                block.name = tool_name(block.name)  # (before any event: a call that cannot be carried ends in an error)
        self._start(out, None)
        self._thinking.flush(out)
        self._close_text(out)
        for block in self._held:
            if not (blocked and isinstance(block, _HeldCall)):
                self._write_held(block, out)
        usage = self._usage or (_usage_shape(self._estimate()) if self._estimate is not None else None)
        reason, sequence = _stop(self._finish, self._matched, bool(self._calls))
        if self._refused and reason == "end_turn":
            reason = "refusal"
        out.append(_event("message_delta", {
            "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage or dict(_NO_USAGE)}))
        out.append(_event("message_stop", {}))
        self._stopped = True

    def _close_text(self, out: list[bytes]) -> None:
        if self._text_open:
            out.append(_event("content_block_stop", {"index": self._index}))
            self._text_open = False

    def _chunk(self, data: dict[str, Any], out: list[bytes]) -> None:
        """One chunk's events; an `UpstreamError` (`common.malformed`) for a chunk whose choices, delta, tool calls or
        function are of another type than OpenAI's: `api.proxy` ends the stream with its `error` event."""
        self._start(out, data.get("id"))
        choices = data.get("choices") or []
        if type(choices) is not list:
            raise malformed("a chunk's `choices`", "an array")
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # (a choice that is not an object is skipped, as before: it holds nothing to write)
            self._answered = True
            delta = choice.get("delta") or {}
            if type(delta) is not dict:
                raise malformed("a chunk's `delta`", "an object")
            if REASONING in delta or BLOCKS in delta:
                self._reasoning(delta.get(REASONING), delta.get(BLOCKS), out)
            text = _text_of(delta.get("content"))
            if text:
                self._text(text, out)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._refused = True
                self._text(refusal, out)
            calls = delta.get("tool_calls")
            for position, call in enumerate(upstream_array(calls, "a chunk's `tool_calls`") if calls else ()):
                if isinstance(call, dict):  # (no `index`: older Ollama, Gemini's OpenAI API; its place in the list)
                    found = call.get("index", position)
                    self._tool_piece(call, found if type(found) is int else position, out)
            if delta.get("function_call") is not None:  # the legacy form: one call, without an id
                self._tool_piece({"function": upstream_object(delta["function_call"], "a chunk's `function_call`")},
                                 _LEGACY, out)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                matched = choice.get("stop_reason")
                self._matched = matched if isinstance(matched, str) else None
                self._error = choice.get("error")
        if isinstance(data.get("usage"), dict):
            self._usage = _anthropic_usage(data["usage"])

    def _text(self, text: str, out: list[bytes]) -> None:
        """Text before any tool call is written as it comes; after one, it is held with the blocks before it."""
        if self._held:
            last = self._held[-1]
            if isinstance(last, list):
                self._hold(_PIECE_CHARS + len(text))
                last.append(text)
            else:
                self._hold(_BLOCK_CHARS + _PIECE_CHARS + len(text))
                self._held.append([text])
            self._quiet += 1
            return
        if self._thinking.busy:
            self._thinking.flush(out)
        if not self._text_open:
            self._index += 1
            self._text_open = True
            out.append(_event("content_block_start", {"index": self._index,
                                                      "content_block": {"type": "text", "text": ""}}))
        out.append(_event("content_block_delta", {"index": self._index, "delta": {"type": "text_delta", "text": text}}))

    def _tool_piece(self, call: dict[str, Any], position: int, out: list[bytes]) -> None:
        """A piece of the call at `position`: a function's (arguments as a string, or a whole JSON object as some
        servers send them) or a custom tool's (its input text). A piece with an id other than the held call's
        begins another call at that position: Ollama 0.20 streams each of its parallel calls whole, all at
        `index: 0`, each with its own id (joined, the client got one call, its input both calls' arguments)."""
        custom = call.get("custom") is not None
        part = upstream_object(call["custom"] if custom else call.get("function") or {}, CALL_PART[custom])
        held = self._calls.get(position)
        named = call.get("id")  # (a conformant stream names a call on its first piece only, or repeats its id)
        if held is None or begins_another_call(call, held.id):
            self._hold(_BLOCK_CHARS)
            held = self._calls[position] = _HeldCall(None, None)
            self._held.append(held)
            self._thinking.flush(out)  # the thinking and the text before the first tool call are complete
            self._close_text(out)
        if not held.id and named:  # (a server that names the call in a later piece)
            self._hold(_chars(named))
            held.id = named
        name = part.get("name")
        if not held.name and name:
            self._hold(_chars(name))
            held.name = name
        held.custom = held.custom or custom
        if held.signature is None:
            signature = signature_of(call)
            if signature is not None:
                self._hold(len(signature))
                held.signature = signature
        text = part.get(CALL_TEXT[custom])
        if isinstance(text, dict) and not custom:
            text = _encode(text).decode()
        if isinstance(text, str) and text:
            held.size += len(text)
            if held.size > HELD_CALL_CHARS:
                raise UpstreamError(f"the upstream streamed a tool call of more than {HELD_CALL_CHARS >> 20} MiB of "
                                    "arguments, more than /v1/messages holds of a call to write it whole")
            self._hold(_PIECE_CHARS + len(text))
            held.arguments.append(text)
        self._quiet += 1

    def _hold(self, size: int) -> None:
        """`size` more characters held: an `UpstreamError` past `HELD_CHARS`."""
        self._held_chars += size
        if self._held_chars > HELD_CHARS:
            raise UpstreamError(f"the upstream streamed more than {HELD_CHARS >> 20} MiB after its first tool call, "
                                "more than /v1/messages holds to write it whole")

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _reasoning(self, text: Any, entries: Any, out: list[bytes]) -> None:
        """Thinking (`thinking.py`): written as it comes before the first tool call; held after it. A delta with
        both (a stored answer replayed as one chunk, `cache/replay.py`) gives its entries first: the text then
        fills each block up to its entry's length, where taken first it would all go into one block."""
        text = text if isinstance(text, str) else ""
        entries = entries if isinstance(entries, list) else []
        if not text and not entries:
            return
        if not self._held:
            self._close_text(out)  # a block once stopped cannot take more: later text is a block of its own
            self._thinking.entries(entries, out)
            if text:
                self._thinking.text(text, out)
            return
        held = [entry for entry in map(_held_entry, entries) if entry is not None]
        self._hold((_PIECE_CHARS + len(text) if text else 0)
                   + sum(_BLOCK_CHARS + len(entry.get("data", "")) + len(entry.get("signature", "")) for entry in held))
        last = self._held[-1]
        if not isinstance(last, HeldThinking):
            self._hold(_BLOCK_CHARS)
            last = HeldThinking()
            self._held.append(last)
        if text:
            last.texts.append(text)
        last.entries.extend(held)
        self._quiet += 1

    def _write_held(self, block: _HeldCall | list[str] | HeldThinking, out: list[bytes]) -> None:
        if isinstance(block, HeldThinking):
            block.write(_event, self._next_index, out)
            return
        self._index += 1
        index = self._index
        if isinstance(block, list):
            start: dict[str, Any] = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": "".join(block)}
        else:
            start = {"type": "tool_use", "id": tool_use_id(block.id, block.signature), "name": block.name, "input": {}}
            delta = {"type": "input_json_delta",
                     "partial_json": _encode(tool_input("".join(block.arguments), block.custom)).decode()}
        out.append(_event("content_block_start", {"index": index, "content_block": start}))
        out.append(_event("content_block_delta", {"index": index, "delta": delta}))
        out.append(_event("content_block_stop", {"index": index}))
