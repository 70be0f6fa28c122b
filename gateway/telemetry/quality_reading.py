"""Reading answers for the quality signals: a complete answer's choices, and a stream's chunks as they pass
(`StreamQuality`), into an `Answer` that `quality.signals_for` then judges.

Only the fields the checks read are decoded (the rest is skipped by msgspec, much faster than a whole
dict); an answer whose fields have other types than OpenAI's is read the slow way, as a dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..pipeline.streams import StreamEnd
from ..schemas.endpoints import Endpoint
from ..schemas.events import Chunk, StreamEvent
from ..schemas.openai import ChoicePeek, ChoicesPeek
from .answers import Answer, Asked
from .refusals import NOT_INITIALS, REFUSAL_HEAD_CHARS, cannot_become_refusal

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from .quality import QualitySignals

__all__ = ["CALL_FINISHES", "JSON_KINDS", "NOTHING_ASKED", "PlainStreamQuality", "StreamQuality", "add_legacy_call",
           "read_choice", "read_payload", "read_typed"]

log = logging.getLogger("gateway.telemetry")
_decode = msgspec.json.Decoder().decode
_decode_choices = msgspec.json.Decoder(ChoicesPeek).decode
_decode_batch = msgspec.json.Decoder(list[ChoicesPeek]).decode
JSON_KINDS = ("json_object", "json_schema")  # asked for, the whole text is checked
_BATCH = 256  # stream chunks held before they are read
NOTHING_ASKED = Asked(None, None, {})  # what the common request asks of its answer's form: shared, never written to
_UNREAD = [""]  # a tool call past `max_text_bytes` (`add_call`): read as no function call; shared, never written to
# The finish reasons of an answer that calls: a tool (`tool_calls`), or a function in the legacy form (`function_call`).
CALL_FINISHES = frozenset({"tool_calls", "function_call"})
_LEGACY = b'"function_call"'  # in a chat answer's JSON, only a legacy call's key (or that finish reason): quotes
# inside a string value would be escaped
_LEGACY_INDEX = -1  # a legacy call's key in `Answer.tool_calls`, apart from any tool call's index


class _LegacyFunction(msgspec.Struct, gc=False):
    name: Any = None  # (read only when a string, as a tool call's: `read_choice`)
    arguments: Any = None


class _LegacyMessage(msgspec.Struct, gc=False):
    function_call: _LegacyFunction | None = None


class _LegacyChoice(msgspec.Struct, gc=False):
    index: Any = 0
    message: _LegacyMessage | None = None  # a complete answer's
    delta: _LegacyMessage | None = None  # a chunk's


class _LegacyChoices(msgspec.Struct, gc=False):
    choices: list[_LegacyChoice] | None = None


_decode_legacy = msgspec.json.Decoder(_LegacyChoices).decode


def read_choice(answer: Answer, choice: Any, delta_key: str, limit: int) -> None:
    if not isinstance(choice, dict):
        return
    reason = choice.get("finish_reason")
    if isinstance(reason, str):
        answer.finish_reasons.append(reason)
    if choice.get("index", 0) != 0:
        return
    if isinstance(choice.get("text"), str):  # completions
        answer.add_text(choice["text"], limit)
    message = choice.get(delta_key)
    if not isinstance(message, dict):
        return
    if isinstance(message.get("content"), str):
        answer.add_text(message["content"], limit)
    if message.get("refusal"):
        answer.refusal = True
    calls = message.get("tool_calls")
    for position, call in enumerate(calls if isinstance(calls, list) else ()):  # (`true`, `7`: no calls to read)
        if not isinstance(call, dict):
            continue
        index = call.get("index", position)
        function = call.get("function")
        name = arguments = None
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                name = function["name"]
            if isinstance(function.get("arguments"), str):
                arguments = function["arguments"]
        add_call(answer, index if isinstance(index, int) else position, name, arguments, limit)


def add_call(answer: Answer, index: int, name: str | None, arguments: str | None, limit: int) -> None:
    """A tool call's piece (its name, its arguments or a part of them) kept for the checks. Its arguments count
    toward the text's `limit` (`max_text_bytes`): past it (`Answer.overflow`, which the text may have reached
    first), a call's piece is not kept, and every call of the answer is forgotten as a function call (`_UNREAD`,
    `[""]`): the checks then judge its calls only by whether its request offered a tool
    (`quality._malformed_tool_call`), not by names and arguments they do not have whole."""
    calls = answer.tool_calls
    if answer.overflow:
        parts = calls.get(index)
        if parts is not _UNREAD:
            # (forgotten all at once, and a call that comes later is unread too: the first call tells)
            if next(iter(calls.values()), _UNREAD) is not _UNREAD or parts is not None:
                for other in calls:
                    calls[other] = _UNREAD
            calls[index] = _UNREAD
        return
    parts = calls.setdefault(index, [""])
    if name is not None:
        parts[0] += name
    if arguments is not None:
        answer.size += len(arguments)
        if answer.size > limit:
            answer.overflow = True
            for other in calls:
                calls[other] = _UNREAD
            return
        parts.append(arguments)


def add_legacy_call(answer: Answer, payload: bytes, limit: int) -> None:
    """A chat answer's (or chunk's) call in the legacy form, `message.function_call` (`delta.function_call`: a piece
    of it), of its first choice, kept as a tool call is (`add_call`): the typed views read only `tool_calls`. Read
    only from a payload that holds `"function_call"` (one byte search; a caller reads none but a legacy call's
    candidates, `quality.QualitySignals._read`), and skipped when its choices are not of OpenAI's types."""
    if _LEGACY not in payload:
        return
    try:
        choices = _decode_legacy(payload).choices
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return
    for choice in choices or ():
        message = choice.message if choice.message is not None else choice.delta
        if choice.index != 0 or message is None or message.function_call is None:
            continue
        name, arguments = message.function_call.name, message.function_call.arguments
        add_call(answer, _LEGACY_INDEX, name if isinstance(name, str) else None,
                 arguments if isinstance(arguments, str) else None, limit)


def read_typed(answer: Answer, choices: list[ChoicePeek] | None, chat: bool, limit: int) -> None:
    """`read_choice` for the typed view (the same rules, on msgspec structs)."""
    for choice in choices or ():
        if choice.finish_reason is not None:
            answer.finish_reasons.append(choice.finish_reason)
        if choice.index != 0:
            continue
        if choice.text is not None:
            answer.add_text(choice.text, limit)
        message = (choice.message if choice.message is not None else choice.delta) if chat else None
        if message is None:
            continue
        if message.content is not None:
            answer.add_text(message.content, limit)
        if message.refusal:
            answer.refusal = True
        for position, call in enumerate(message.tool_calls or ()):
            function = call.function
            add_call(answer, call.index if call.index is not None else position,
                     function.name if function is not None else None,
                     function.arguments if function is not None else None, limit)


def read_payload(answer: Answer, payload: bytes, chat: bool, delta_key: str, limit: int) -> None:
    """Read one body or chunk: only the fields the checks need, or, for unusual types, its whole dict (whose
    values of other types than OpenAI's are skipped: `"choices": 7` reads as none). Raises `msgspec.DecodeError`
    for a payload that is not JSON, or nested too deep to decode (msgspec's `RecursionError`)."""
    try:
        read_typed(answer, _decode_choices(payload).choices, chat, limit)
        return
    except msgspec.ValidationError:
        decoded = _decode(payload)  # the dict reader skips what it cannot use
    except RecursionError:  # (the typed decode meets the depth first)
        raise msgspec.DecodeError("the JSON is nested too deep") from None
    choices = decoded.get("choices") if isinstance(decoded, dict) else None
    for choice in choices if isinstance(choices, list) else ():
        read_choice(answer, choice, delta_key, limit)


class StreamQuality:
    """Reads a stream's chunks: the choices the provider decoded (`ctx.read_choices`), the common chunk (one
    choice, text only) in line; others' payloads kept (references, no copies) and read in batches: at most
    `_BATCH` held, all of a batch decoded in one call, the last ones at the end. Counts a finished stream.

    The provider's stream may take it as its `ChoicesReader` (`ReplyStream.read_choices`): it then hands over
    each chunk's choices as it decodes them (`take`), and, once settled, only the chunks that carry more than
    text, and this reader reads no events (`reads_events` False).

    Once later text cannot change a verdict (`settled`: no JSON asked, and the text's first word character
    opens no refusal, or its first 300 characters are in and not blank; or the text overflowed), the common
    chunk's text is no longer kept: what else a chunk carries (finish reasons, tool calls, refusals) still is.

    A stream whose request offered the legacy `functions` (`legacy`) is not handed to the provider: it reads the
    events, and each chunk's payload for a `delta.function_call` piece (`add_legacy_call`), which no typed view
    holds. To any other request, a streamed legacy call is judged by its finish reason (`function_call`) alone."""

    __slots__ = ("answer", "asked", "broken", "chat", "json", "legacy", "limit", "payloads", "plain", "reads_events",
                 "settled", "stage")
    looks_only = True  # never changes a batch: the edge may show it batches directly (`pipeline.streams`)

    def __init__(self, stage: QualitySignals, asked: Asked, chat: bool) -> None:
        self.stage = stage
        self.asked = asked
        self.chat = chat  # a chat stream (else completions: no `delta`, the text in `text`)
        self.limit = stage.limit
        self.json = asked.json_kind in JSON_KINDS  # the whole text is checked
        self.answer = Answer()
        self.payloads: list[bytes] = []
        self.settled = False
        self.plain = False  # settled on text that cannot be a refusal, no JSON asked (see `on_end`)
        self.reads_events = True  # False once the provider's stream took it (`ReplyStream.read_choices`)
        self.broken = False  # `take` failed (a bug, logged): the stream is not counted
        self.legacy = False  # its request offered `functions`: each chunk's payload is read for a legacy call too

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        self.look(ctx, events)
        return events

    def look(self, ctx: RequestContext, events: list[StreamEvent]) -> None:
        if self.legacy:  # (one look a batch: a legacy call's pieces are in no typed view, `add_legacy_call`)
            for event in events:
                if event.__class__ is Chunk:
                    add_legacy_call(self.answer, event.payload, self.limit)
        for event in events:
            if event.__class__ is not Chunk:
                continue
            choices = event.choices
            if choices is None:
                self.payloads.append(event.payload)
                continue
            if self.payloads:  # the provider read these choices for us (`ctx.read_choices`): what came before first
                self._read(ctx)
            self._choices(choices)
        if len(self.payloads) >= _BATCH:
            self._read(ctx)

    def take(self, choices: list[ChoicePeek]) -> bool:
        """One chunk's choices, as the provider's stream decoded them (`ChoicesReader`): whether it still wants
        every chunk's (not once settled)."""
        if self.broken:
            return False
        try:
            self._choices(choices)
        except Exception:  # a bug: logged; the stream is not counted, and its bytes go on
            log.exception("quality signals failed to read a stream chunk")
            self.broken = True
            return False
        return not self.settled

    def skim(self, last: Callable[[], list[ChoicePeek] | None]) -> bool:
        """Not a skimmer (`ChoicesReader`): a settled reader still reads what carries more than text."""
        return False

    def take_payload(self, payload: bytes) -> None:
        """A chunk whose choices do not fit the typed form, or that the source did not type (`ChoicesReader`):
        read as its JSON."""
        if self.broken:
            return
        try:
            read_payload(self.answer, payload, self.chat, "delta" if self.chat else "_", self.limit)
        except msgspec.DecodeError:
            pass
        except Exception:  # a bug: as in `take`
            log.exception("quality signals failed to read a stream chunk")
            self.broken = True

    def _choices(self, choices: list[ChoicePeek]) -> None:
        """One chunk's typed choices read; the common chunk (one choice, text only) in line."""
        if len(choices) == 1 and self.chat:
            choice = choices[0]
            delta = choice.delta
            if (delta is not None and choice.finish_reason is None and choice.index == 0 and choice.text is None
                    and delta.tool_calls is None and delta.refusal is None):
                if not self.settled:
                    text = delta.content
                    if text:  # an empty text (the first chunk's, often) changes no verdict
                        self.answer.add_text(text, self.limit)
                        self.settled = self._settles()
                return
        read_typed(self.answer, choices, self.chat, self.limit)

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        self.end(ctx, end)

    def end(self, ctx: RequestContext, end: StreamEnd) -> None:
        """The stream ended: counted when it ended well (`done`)."""
        if end.outcome == "done" and not self.broken:
            if self.payloads:
                self._read(ctx)
            answer = self.answer
            if self.plain and len(answer.finish_reasons) == 1 and not answer.tool_calls and not answer.refusal:
                # The common stream: only `truncated` can be found (as `QualitySignals.read`'s common answer; a
                # `tool_calls` or `function_call` finish counts as a call: `quality._malformed_tool_call`).
                reason = answer.finish_reasons[0]
                if reason == "stop" or reason not in CALL_FINISHES:
                    self.stage.count_finish(ctx, reason)
                    return
            self.stage.count(ctx, answer, self.asked)

    def _settles(self) -> bool:
        """Whether the text read so far is all the checks need of it."""
        answer = self.answer
        if answer.overflow:
            return True
        if self.json or not answer.text:
            return False
        text = "".join(answer.text)
        if cannot_become_refusal(text):
            self.plain = True
            return True
        return len(text) >= REFUSAL_HEAD_CHARS and not text[:REFUSAL_HEAD_CHARS].isspace()

    def _read(self, ctx: RequestContext) -> None:
        payloads, self.payloads = self.payloads, []
        if not payloads:
            return
        chat = ctx.endpoint is Endpoint.CHAT
        limit = self.stage.limit
        try:  # decoded whole before any is read: a failure leaves the answer as it was
            chunks = _decode_batch(b"[" + b",".join(payloads) + b"]")
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            chunks = None  # one odd chunk: read them one by one (a malformed one is skipped)
        if chunks is not None:
            for chunk in chunks:
                read_typed(self.answer, chunk.choices, chat, limit)
            return
        for payload in payloads:
            try:
                read_payload(self.answer, payload, chat, "delta" if chat else "_", limit)
            except msgspec.DecodeError:
                continue


class PlainStreamQuality:
    """The reader of a chat stream whose request asked for no JSON, offered no tools (nor `functions`) and asked for
    one answer, fed by the provider's stream (a `ChoicesReader`): it follows the common answer (one choice of text
    only, whose first text opens with a letter no refusal opens with, `NOT_INITIALS`, then one finish reason) in a
    few steps, and counts it by its finish reason (`QualitySignals.count_finish`), as `StreamQuality` does such an
    answer. Anything else (another choice, tool calls, a refusal, a first text that may open a refusal, a second
    finish reason, choices of odd types, no finish reason) hands what it saw to a `StreamQuality`, which reads on and
    judges.

    It skims (`skim`): once its first text settled the text checks, it reads no chunk as it passes, only the
    stream's last chunk with choices at the end, for its finish reason. Such a request gets nothing else between:
    no tool calls (it offered none), no other choice (it asked for one), no `refusal` field (OpenAI sets it for
    structured outputs: it asked for no JSON), and later text changes no verdict. An answer that calls a tool
    anyway ends with the finish reason `tool_calls`: that stream is handed over at its end, and the call, unread,
    is a `malformed_tool_call` all the same (its request offered no tool: `quality._malformed_tool_call`).

    No stream stage: it reads no events, and its owner (the telemetry stage's end hook) calls `end`."""

    __slots__ = ("first", "full", "last", "reason", "stage")

    def __init__(self, stage: QualitySignals) -> None:
        self.stage = stage
        self.first: str | None = None  # the first text, once read (it settled the text checks)
        self.reason: str | None = None  # the finish reason, once read
        self.full: StreamQuality | None = None  # the reader it handed over to
        self.last: Callable[[], list[ChoicePeek] | None] | None = None  # the source's last choices, once skimming

    def take(self, choices: list[ChoicePeek]) -> bool:
        if self.full is None and len(choices) == 1:
            choice = choices[0]
            delta = choice.delta
            if (delta is not None and choice.index == 0 and choice.text is None and delta.tool_calls is None
                    and delta.refusal is None):
                reason = choice.finish_reason
                if self.first is None:
                    if reason is None:
                        text = delta.content
                        if not text:  # (the first chunk's, with the role, often)
                            return True
                        if text[:1] in NOT_INITIALS:  # no later text changes a verdict now
                            self.first = text
                            return False
                elif reason is None or self.reason is None:  # more text (a replay's), or the finish
                    if reason is not None:
                        self.reason = reason
                    return False
        return self._hand_over().take(choices)

    def take_payload(self, payload: bytes) -> None:
        self._hand_over().take_payload(payload)

    def skim(self, last: Callable[[], list[ChoicePeek] | None]) -> bool:
        if self.full is not None:  # handed over: its reader reads on
            return False
        self.last = last
        return True

    def end(self, ctx: RequestContext, end: StreamEnd) -> None:
        """The stream ended: counted when it ended well (`done`); the finish reason from its last chunk when the
        source skimmed the chunks after the first text."""
        if self.full is None and self.reason is None and self.first is not None and self.last is not None:
            last = self.last()
            if last:
                self.take(last)
        reason = self.reason
        if self.full is None and reason is not None and (reason == "stop" or reason not in CALL_FINISHES):
            if end.outcome == "done":
                self.stage.count_finish(ctx, reason)
            return
        self._hand_over().end(ctx, end)

    def _hand_over(self) -> StreamQuality:
        """The `StreamQuality` that reads on, in the state it would be in after the same chunks."""
        full = self.full
        if full is None:
            full = self.full = StreamQuality(self.stage, NOTHING_ASKED, True)
            full.reads_events = False
            if self.first is not None:
                full.answer.add_text(self.first, full.limit)
                full.settled = full.plain = True
            if self.reason is not None:
                full.answer.finish_reasons.append(self.reason)
        return full
