"""Output guards on a stream: the stream stage that drives the window (`window.py`) over one wire format.

`StreamGuard` is what the guard stage registers on a streamed reply. It hands
each chunk to the adapter of the endpoint's format, which feeds the lanes of
the shared window and rewrites the chunk with what may leave; at the upstream's
end it releases what is still held; on a block it ends the stream at once in the
format's own way, then `[DONE]`: held text is dropped, so nothing of the finding
is sent; the usage a client is shown comes with it (the upstream's if it came, else
the gateway's estimate: `StreamGuard._blocked`). A hard budget's cut (`StreamBill`,
which reads the upstream's chunks before this stage) releases what is held, checked,
before its error event: the client gets the text it is billed for. Chat Completions
and Completions chunks are adapted here (`ChatChunks`); the Responses API's events in
`responses.py`.

Chat and Completions: per choice, the content (or a completion's text), the
texts beside it (reasoning, refusal: `texts.BESIDE_CONTENT`), an audio answer's
transcript, each tool call's arguments (a custom tool's input) and a legacy
`function_call`'s arguments are lanes. A tool call's lane is keyed by its
`index`, else (older Ollama, Gemini's OpenAI-compatible API send none) by its
place in the chunk's `tool_calls`, written into it; a piece with another id than
the call held at its index begins another call there (Ollama 0.20 gives each of
its parallel calls `index: 0`). Chunks keep OpenAI's shape (ids, roles, tool call deltas, usage,
finish_reason; content sent as a list of parts becomes OpenAI's fields, a reasoning or refusal sent as a list its
parts' text); a tool call's name is checked whole as it comes. With an enforcing guard, what no guard reads is not
sent: `logprobs` are emptied, and only the fields the gateway knows pass (`answer_fields`: an allowlist, since an
upstream may write the answer's text, or an error quoting it, in any field it invents; the fields real servers add
that hold no answer text are on it), a text of another type dropped;
a chunk left with nothing to say is dropped; a block ends with `finish_reason: "content_filter"`. The usual chunk
(a string `delta.content`, no other field) is told apart with one set look-up per level (`_PLAIN_DELTA`).

The chunks are the upstream's JSON: a value of another type than the API's (a
choice that is `null`, an `index` that is a list) is read as absent or as 0,
never as the gateway's failure. One an adapter still cannot read ends the
stream with the upstream's error, as the providers' translators end theirs
(`providers.streaming`), logged with its traceback (it may be a bug of the
adapter's).

An upstream's error that ends the stream (`StreamError`) may quote the answer's text ("Failed to parse tool call
output: ..."), which no guard reads: with an enforcing output guard (`enforcing`), its message loses the upstream's
own words, the gateway's text for the error kept (`withhold`); a complete answer's error is the guard stage's. So
does an error written as a chunk without choices (`{"message": ...}`, `{"detail": ...}`, an `event: error`'s data,
which the provider passes as a chunk: `UpstreamFailed`), and a choice's own `error` (OpenRouter's) keeps only its
code (`withheld_error`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ..errors import BudgetExceeded, GatewayError, LimitsUnavailable, UpstreamError
from ..policy.guard_schema import StreamScanSpec
from ..schemas.endpoints import Endpoint
from ..schemas.events import DONE, Chunk, StreamDone, StreamError, StreamEvent, UsageReport, begins_another_call
from ..schemas.openai import Usage
from ..telemetry.usage import estimate_on_loop, pipeline_counter
from .answer_fields import (
    CHOICE_FIELDS,
    CHUNK_FIELDS,
    DELTA_FIELDS,
    drop_unknown,
    known_usage_chunk,
    shape_beside,
    shape_content,
    withheld_error,
)
from .base import WITHHELD, Guard, Where, enforcing
from .json_end import JsonEnd
from .responses import ResponsesChunks
from .session import GuardSession
from .texts import BESIDE_CONTENT, text_arguments
from .window import ANSWER, REASONING, TOOL, Blocked, Lane, Window, lane_index

if TYPE_CHECKING:
    from ..pipeline.context import RequestContext
    from ..pipeline.streams import StreamEnd
    from .runtime import GuardRuntime

__all__ = ["ChatChunks", "ChunkFormat", "StreamGuard", "UpstreamFailed", "enforcing", "withhold"]

log = logging.getLogger("gateway.guards")
# What a lookup on an upstream value of another type than the API's raises (as `providers.streaming` reads them);
# `RecursionError`: msgspec's, for a chunk nested too deep to decode here.
_MISSHAPEN = (AttributeError, TypeError, LookupError, RecursionError)
_BILL_CUTS = (BudgetExceeded, LimitsUnavailable)  # a stream the bill cut (`StreamBill`): what the guards hold leaves


def withhold(error: GatewayError) -> None:
    """`error` told without the upstream's own words (`GatewayError.bare`: its status, type, code and headers kept), in
    place: the words may quote the answer's text ("Failed to parse tool call output: ..."), which no output guard
    read. Withheld whole, not scanned: simpler, and nothing of the answer can leave in them. Nothing for an error
    whose message holds no upstream words."""
    if error.bare is not None:
        error.message = f"{error.bare} ({WITHHELD})"
        error.args = (error.message,)


# A tool call's lane kind -> where its text is in a call's delta: a function's arguments, a custom tool's input.
_CALL_FIELDS = {"tool": ("function", "arguments"), "custom": ("custom", "input")}

# A choice, a delta with no more than these (most chunks): nothing to drop or reshape (`ChatChunks._odd_choice`,
# `_odd_delta`), and (a delta) no tool call, audio or reasoning to look for. A chunk's fields that are no news (a
# chunk left with only these is dropped).
_PLAIN_CHOICE = {True: frozenset({"index", "delta", "finish_reason", "logprobs"}),
                 False: frozenset({"index", "text", "finish_reason", "logprobs"})}
_PLAIN_DELTA = frozenset({"role", "content"})
_CHUNK_META = frozenset({"id", "object", "created", "model", "system_fingerprint", "service_tier", "obfuscation"})
# What a chunk without choices that is an upstream's error has (`{"message": ...}`, `{"detail": ...}`, an `event:
# error`'s data, vLLM's `"object": "error"`): the upstream's words, withheld (`UpstreamFailed`).
_ERROR_FIELDS = ("error", "message", "detail")


class UpstreamFailed(Exception):
    """A chunk is an upstream's error (`_ERROR_FIELDS`) under an enforcing output guard: the stream ends with the
    gateway's error, the upstream's words withheld, what the lanes hold dropped (as for any error that ends it)."""


def _call_text(call: Any) -> tuple[dict[str, Any], str, str] | None:
    """Where a tool call delta's text is (container, field, lane kind), if it brings any."""
    if not isinstance(call, dict):
        return None
    for kind, (place, field) in _CALL_FIELDS.items():
        container = call.get(place)
        if isinstance(container, dict) and (text_arguments(container) if kind == "tool" else isinstance(
                container.get(field), str)) and container[field]:
            return container, field, kind
    return None


def _call_index(call: dict[str, Any], position: int) -> int:
    """A tool call delta's index: the upstream's, else (none, or not an int) its place in the chunk's `tool_calls`,
    written into it: what the window releases of the call later names it by its index."""
    found = call.get("index")
    if type(found) is int:
        return found
    call["index"] = position
    return position


class ChunkFormat(Protocol):
    """One wire format's view of a guarded stream. Any method may raise `Blocked`."""

    async def chunk(self, chunk: Chunk) -> list[Chunk]:
        """The chunks to send for one upstream chunk (none while its text is held back)."""

    async def finish(self) -> list[Chunk]:
        """The upstream ended (`[DONE]`): chunks that release what the lanes still hold."""

    def blocked(self, usage: Usage | None) -> Chunk:
        """The chunk that ends a blocked stream (`usage`: the request's, when the format carries it there)."""

    def shows_usage(self, ctx: RequestContext) -> bool:
        """Whether the client is shown the usage of a blocked stream (else it is left to the end hooks)."""

    def usage_report(self, usage: Usage) -> UsageReport:
        """The gateway's estimate as the usage event the edge writes (or not) after the blocked chunk."""


class StreamGuard:
    reads_events = True
    rewrites = True  # a budget's cut reads the upstream's chunks before this stage holds them (`add_at_source`)

    def __init__(self, runtime: GuardRuntime, guards: tuple[Guard, ...], session: GuardSession,
                 spec: StreamScanSpec, endpoint: Endpoint, model: str) -> None:
        self.window = Window(runtime, guards, session, spec, model)
        self.format: ChunkFormat
        if endpoint is Endpoint.RESPONSES:
            self.format = ResponsesChunks(self.window)
        else:
            self.format = ChatChunks(self.window, endpoint is Endpoint.CHAT, enforcing(guards))
        self.blocked = False
        self.withholds = enforcing(guards)  # an upstream's error loses its own words (`withhold`)
        # A chat usage chunk passes its known fields only (`known_usage_chunk`), as the format's chunks do.
        self.scrubs_usage = isinstance(self.format, ChatChunks) and self.format.scrub

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        last = max((i for i, event in enumerate(events) if isinstance(event, Chunk)), default=-1)
        try:
            for i, event in enumerate(events):
                if isinstance(event, Chunk):
                    self.window.more = i < last
                    out += await self.format.chunk(event)
                elif isinstance(event, StreamDone):
                    out += await self.format.finish()
                    out.append(event)
                else:
                    if type(event) is StreamError and type(event.error) in _BILL_CUTS:  # a budget's cut
                        out += await self.format.finish()  # (`StreamBill`, before this stage): what is held leaves
                    if type(event) is StreamError and self.withholds:  # (the last event, once: not per chunk)
                        withhold(event.error)
                    elif type(event) is UsageReport and self.scrubs_usage:  # (once a stream)
                        event = self._known(event)
                    out.append(event)
        except Blocked:  # what this batch released before the block was scanned like any earlier batch: sent
            self.blocked = True
            return [*(e for e in out if isinstance(e, Chunk)), *self._blocked(ctx, events), DONE]
        except UpstreamFailed:  # an error written as a chunk: the upstream's error, its words withheld
            usage = self._reports(events)
            name = ctx.provider.name if ctx is not None and ctx.provider is not None else "the upstream"
            error = UpstreamError(f"upstream `{name}` failed mid-stream ({WITHHELD})")
            return [*(e for e in out if isinstance(e, Chunk)), *usage, StreamError(error)]
        except _MISSHAPEN:  # an upstream event the adapter cannot read: the upstream's error, what it holds dropped
            log.warning("an output guard could not read an upstream stream event: the stream ends with an "
                        "upstream error", exc_info=True, extra={"fields": {"request_id": ctx.request_id}})
            usage = self._reports(events)
            name = ctx.provider.name if ctx.provider is not None else "the upstream"
            error = UpstreamError(f"upstream `{name}` sent a malformed stream event")
            return [*(e for e in out if isinstance(e, Chunk)), *usage, StreamError(error)]
        return out

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None:
        return None

    def _reports(self, events: list[StreamEvent]) -> list[UsageReport]:
        """The usage events of a batch that ends the stream early (a block, an error), as they are sent (`_known`)."""
        reports = [e for e in events if isinstance(e, UsageReport)]
        return [self._known(report) for report in reports] if self.scrubs_usage else reports

    def _known(self, report: UsageReport) -> UsageReport:
        """A usage event whose chunk passes only what the gateway knows (`known_usage_chunk`)."""
        if report.payload is None:
            return report
        return UsageReport(report.usage, known_usage_chunk(report.payload))

    def _blocked(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]:
        """The events that end a blocked stream: the format's last one, and the usage (tokens spent all the same:
        accounted). The upstream's, if it came in this batch; else, for a client that is shown usage (a chat
        client that asked for it, `include_usage`; a Responses client, in `response.incomplete`), the gateway's
        estimate, made now as a Messages stream's is (`telemetry.usage.estimate_on_loop`: kept as the request's
        usage, marked estimated, so that the bill and the access log read the figure the client got): the
        upstream's usage chunk, which often comes after the finish, is not waited for."""
        reports = self._reports(events)
        usage = reports[-1].usage if reports else None
        if usage is None and ctx is not None and self.format.shows_usage(ctx):  # (None: a unit test's driving)
            # a cache hit's own (its bill stays 0), or one that came before this batch (already sent), else estimated
            usage = ctx.shown_usage or ctx.usage
            if usage is None and ctx.provider is not None and (usage := _estimate(ctx)) is not None:
                reports = [self.format.usage_report(usage)]
        return [self.format.blocked(usage), *reports]


def _estimate(ctx: RequestContext) -> Usage | None:
    """The gateway's estimate of the request's usage, with its pipeline's counter (`pipeline_counter`), kept as
    `ctx.usage` and marked (`estimate_on_loop`)."""
    counter = pipeline_counter(ctx)
    return estimate_on_loop(counter, ctx) if counter is not None else None


class ChatChunks:
    """Chat Completions chunks (`delta.content`, `delta.tool_calls`) and Completions chunks (`text`)."""

    def __init__(self, window: Window, chat: bool, withholds: bool = False) -> None:
        self.window = window
        self.chat = chat
        self.key = "content" if chat else "text"
        self.meta: dict[str, Any] = {}
        # With an enforcing guard, what no guard reads is not sent: a choice's `logprobs` (`_odd_choice`), the fields
        # the gateway does not know (`CHUNK_FIELDS`, `CHOICE_FIELDS`, `DELTA_FIELDS`), a text of another type.
        self.scrub = any(guard.mode == "enforce" for guard in window.guards)
        self.withholds = withholds  # (`enforcing`) a choice's `error` loses the upstream's words (`withheld_error`)
        self.choice_fields = CHOICE_FIELDS[chat]
        self.plain_choice = _PLAIN_CHOICE[chat]
        self.besides = False  # a lane beside the content (reasoning, refusal) was opened (`_beside`)
        self.transcribing = False  # an audio answer's transcript lane was opened (`_transcript`)
        self.ids: dict[tuple[int, int], Any] = {}  # (choice, call index) -> the id of the call held there
        self.calling: dict[int, int] = {}  # per choice, the tool call whose arguments last came (`_next_call`)
        # (choice, call) -> whether its arguments so far are whole JSON (`_next_call`); not the arguments themselves
        self.arguments: dict[tuple[int, int], JsonEnd] = {}

    async def chunk(self, chunk: Chunk) -> list[Chunk]:
        data = chunk.data()
        choices = data.get("choices")
        if not choices or not isinstance(choices, list):  # (`"choices": 7`: no text a client reads either)
            return self._without_choices(chunk, data)
        if not self.meta:
            self.meta = {k: data[k] for k in ("id", "object", "created", "model", "system_fingerprint") if k in data}
        scrub = self.scrub
        if scrub and not CHUNK_FIELDS.issuperset(data):  # (`issuperset`: no view made, the fastest)
            drop_unknown(data, CHUNK_FIELDS)
        window = self.window
        keep = False
        for choice in choices:
            if not isinstance(choice, dict):  # (`null`: passed as it is, as without a guard)
                keep = True
                continue
            index = choice.get("index", 0)
            if type(index) is not int:  # (a lane's key: `[0]` would not hash; inline: the hot path's)
                index = lane_index(index)
            if scrub and (choice.get("logprobs") is not None or not self.plain_choice.issuperset(choice)):
                self._odd_choice(choice)
            holder = choice.get("delta") if self.chat else choice
            if not isinstance(holder, dict):
                keep = True
                continue
            final = choice.get("finish_reason") is not None
            text = holder.get(self.key)
            if type(text) is not str and text is not None:  # (rare: content as a list of parts, or another type)
                text = self._odd_text(holder)
            # (most chunks: a content, a role, and no other field: no tool call, audio or reasoning to look for)
            plain = not self.chat or _PLAIN_DELTA.issuperset(holder)
            calls = None
            if not plain:
                self._odd_delta(holder)
                calls = holder.get("tool_calls")
            if self.besides or (not plain and not holder.keys().isdisjoint(BESIDE_CONTENT)):
                await self._beside(index, holder, final, bool(calls) or (isinstance(text, str) and bool(text)))
            lane = window.lane((index, "text", 0), False)
            if isinstance(text, str) and text:
                window.feed(lane, text)
            if lane.pending or (isinstance(text, str) and text):
                if calls and not final and index not in self.calling:  # (rare: once per choice that calls)
                    await self._text_before_call(lane, holder)
                else:
                    holder[self.key] = await window.release(lane, final, ANSWER)
            if self.transcribing or (not plain and "audio" in holder):  # (most streams: no audio)
                await self._transcript(index, holder, final)
            if not plain:
                await self._calls(index, holder, calls, final)
            if final:
                await self._flush_tools(index, holder)
            keep = keep or final or bool(holder.get(self.key)) or any(
                v not in (None, "", []) for k, v in holder.items() if k not in (self.key, "logprobs", "finish_reason",
                                                                               "index", "text"))
        return [Chunk.of(data)] if keep else []

    async def _calls(self, index: int, holder: dict[str, Any], calls: Any, final: bool) -> None:
        """A delta's tool calls (`_tool_calls`) and a legacy `function_call` (its name, and its arguments: a lane)."""
        if isinstance(calls, list) and calls:
            await self._tool_calls(index, holder, list(calls))
        legacy = holder.get("function_call")
        if not isinstance(legacy, dict):
            return
        if "name" in legacy:
            await self._name(legacy)
        if text_arguments(legacy) and legacy["arguments"]:
            window = self.window
            tool = window.lane((index, "function_call", 0), True)
            window.feed(tool, legacy["arguments"])
            legacy["arguments"] = await window.release(tool, final, TOOL)

    def _without_choices(self, chunk: Chunk, data: dict[str, Any]) -> list[Chunk]:
        """A chunk with no choice to read (`"choices": []`: Azure's prompt filter results; none: an odd chunk, or an
        upstream's error written as one, which the provider passed: `{"message": ...}`, `{"detail": ...}`, an `event:
        error`'s data). Under an enforcing guard an error ends the stream, its words withheld (`UpstreamFailed`), and
        any other passes its known fields (`CHUNK_FIELDS`), dropped when they say nothing (`_CHUNK_META`)."""
        if not self.scrub:
            return [chunk]
        if self.withholds and (data.get("object") == "error" or not data.keys().isdisjoint(_ERROR_FIELDS)):
            raise UpstreamFailed
        if data.keys() <= CHUNK_FIELDS:
            return [chunk]
        drop_unknown(data, CHUNK_FIELDS)
        return [] if data.keys() <= _CHUNK_META else [Chunk.of(data)]

    def _odd_choice(self, choice: dict[str, Any]) -> None:
        """A choice under an enforcing guard with more than the usual fields. Its `logprobs` are emptied: their tokens
        are the upstream's text, which the window holds back and rewrites; left, they would carry a redacted value,
        or a blocked one, out. The fields the gateway does not know are dropped (`CHOICE_FIELDS`: a `message` beside
        the delta repeats the text unread, Perplexity's). Its `error` (OpenRouter's, with `finish_reason: "error"`)
        may quote the answer, as any upstream error's words may (`withhold`): kept, its words withheld."""
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None
        if not choice.keys() <= self.choice_fields:
            drop_unknown(choice, self.choice_fields)
        if self.withholds and "error" in choice:
            choice["error"] = withheld_error(choice["error"])

    def _odd_text(self, holder: dict[str, Any]) -> Any:
        """A content (a completion's text) of another type than a string: `shape_content`. The text as it is now."""
        shape_content(holder, self.key, self.chat, self.scrub)
        return holder.get(self.key)

    def _odd_delta(self, holder: dict[str, Any]) -> None:
        """A delta with more than the usual fields: the texts beside the content read (`shape_beside`), and under
        an enforcing guard the fields the gateway does not know dropped (`DELTA_FIELDS`; OpenRouter's
        `reasoning_details`, a structured copy of the reasoning, among them)."""
        shape_beside(holder, self.scrub)
        if self.scrub and not holder.keys() <= DELTA_FIELDS:
            drop_unknown(holder, DELTA_FIELDS)

    async def _name(self, container: dict[str, Any]) -> None:
        """A tool call's name (a function's, a custom tool's, a legacy `function_call`'s): a text the model wrote,
        checked whole as it comes (a call names its tool in one piece), redacted or blocking as its arguments would.
        A name of another type is dropped under an enforcing guard."""
        name = container["name"]
        if isinstance(name, str):
            if name:
                lane = Lane(False)
                lane.pending = name  # (not `Window.feed`: a name is no text the first-text delay measures)
                container["name"] = await self.window.release(lane, True, TOOL)
        elif self.scrub and name is not None:
            del container["name"]

    async def _beside(self, index: int, holder: dict[str, Any], final: bool, answering: bool) -> None:
        """The texts beside the content (`BESIDE_CONTENT`: reasoning, refusal), each a lane of its own: what of each
        may leave now, written back. A lane's text is over at the choice's end, once the answer begins
        (`answering`: content or tool calls), or once another of them brings text (the model moved on): what it
        holds then leaves whole, in this chunk (a client shows the reasoning before the answer; one that goes on
        later has a finding that reaches back into what left blocked: `Window`'s sealed lanes). A field the delta
        did not have is added only with text."""
        window = self.window
        texts = {field: text for field in BESIDE_CONTENT if isinstance(text := holder.get(field), str) and text}
        for field, where in BESIDE_CONTENT.items():
            lane = window.lanes.get((index, field, 0))
            if field in texts:
                self.besides = True
                lane = lane or window.lane((index, field, 0), False)
                window.feed(lane, texts[field])
            if lane is None or not lane.pending:
                continue
            over = final or answering or (bool(texts) and field not in texts)
            out = await self._release_beside(lane, over, where)
            if out or isinstance(holder.get(field), str):
                holder[field] = out

    async def _tool_calls(self, index: int, holder: dict[str, Any], entries: list[Any]) -> None:
        """A chunk's tool call deltas (`entries`, a copy of `holder`'s), each call's text fed to its lane and what
        of it may leave now written back. The call a delta belongs to: `_call_index`; one that begins another call
        releases what is held of the others first (`_next_call`)."""
        window = self.window
        for position, call in enumerate(entries):
            sub = _call_index(call, position) if isinstance(call, dict) else 0
            if isinstance(call, dict):
                for place in ("function", "custom"):
                    container = call.get(place)
                    if isinstance(container, dict) and "name" in container:  # (a call's first piece)
                        await self._name(container)
                named = call.get("id")  # (a conformant stream names a call on its first piece only, or repeats it)
                replaced = bool(named) and begins_another_call(call, self.ids.setdefault((index, sub), named))
                if replaced or sub != self.calling.setdefault(index, sub):
                    later = {_call_index(c, p) for p, c in enumerate(entries) if p > position and isinstance(c, dict)}
                    await self._next_call(index, holder, call, sub, later, replaced)
            found = _call_text(call)
            if found is not None:
                container, field, kind = found
                piece = container[field]
                if kind == "tool":
                    ends = self.arguments.get((index, sub))
                    if ends is None:
                        ends = self.arguments[(index, sub)] = JsonEnd()
                    ends.feed(piece)
                tool = window.lane((index, kind, sub), kind == "tool")
                window.feed(tool, piece)
                container[field] = await window.release(tool, False, TOOL)

    async def _transcript(self, index: int, holder: dict[str, Any], final: bool) -> None:
        """An audio answer's transcript (`delta.audio.transcript`), a lane of its own as the refusal is: held,
        scanned, rewritten, or blocking (a complete answer's is checked as its text). What the lane still holds
        leaves whole at the choice's end, in that chunk's `audio`. The audio itself no guard reads."""
        audio = holder.get("audio")
        piece = audio.get("transcript") if isinstance(audio, dict) else None
        lane = self.window.lanes.get((index, "transcript", 0))
        if isinstance(piece, str) and piece:
            self.transcribing = True
            lane = lane or self.window.lane((index, "transcript", 0), False)
            self.window.feed(lane, piece)
        if lane is None or not lane.pending:
            return
        out = await self.window.release(lane, final, ANSWER)
        if isinstance(audio, dict):
            audio["transcript"] = out
        elif out:
            holder["audio"] = {"transcript": out}

    async def _text_before_call(self, lane: Lane, holder: dict[str, Any]) -> None:
        """A choice's first tool call begins in this chunk: its text so far is over, and what the lane holds of it
        leaves whole, scanned as at the text's end, in this chunk ahead of the call. Held until the finish chunk,
        it would reach a client after the call (Anthropic's Messages stream: a text block after the tool_use)
        though the model wrote it before. Text that goes on after the call is scanned with what left as its left
        context; a finding reaching back into it blocks (`Window`'s sealed lanes)."""
        holder[self.key] = await self.window.release(lane, True, ANSWER)
        holder["tool_calls"] = holder.pop("tool_calls")  # after the text in the chunk's JSON too

    async def _close_beside(self, index: int, holder: dict[str, Any]) -> None:
        """Whatever the lanes beside the content hold of choice `index`, released whole into `holder`."""
        for field, where in BESIDE_CONTENT.items():
            lane = self.window.lanes.get((index, field, 0))
            if lane is not None and lane.pending:
                holder[field] = await self._release_beside(lane, True, where)

    async def _release_beside(self, lane: Lane, final: bool, where: Where) -> str:
        """A lane beside the content released; a reasoning's with its placeholders kept (`pseudonyms.py`: a signed
        thinking's text must stay what Anthropic signed, and no reasoning a client sends back is read on input)."""
        if where != REASONING:
            return await self.window.release(lane, final, where)
        with self.window.session.pseudonyms.keeping():
            return await self.window.release(lane, final, where)

    async def _next_call(self, index: int, holder: dict[str, Any], call: dict[str, Any], sub: int, later: set[int],
                         replaced: bool) -> None:
        """Another tool call of a choice begins (`call`, an entry of `holder`'s tool calls, at index `sub`): what is
        held of the others' arguments is released in this chunk, before it. A client (the SDK's stream helper) takes
        a call's arguments as complete once the next call starts: held until the finish chunk, they read as `""`
        there. Released whole only when they are complete JSON (the call is over); else as any chunk's (a stream may
        come back to a call: a value still being written stays held), and not at all for a call that goes on
        later in this chunk (`later`). `replaced`: `call` has another id than the call held at `sub`, which is over:
        its lanes are released whole, and the new call's begin empty."""
        self.calling[index] = sub
        if replaced:
            self.ids[(index, sub)] = call["id"]
        released: list[dict[str, Any]] = []
        for (i, kind, other), lane in list(self.window.lanes.items()):
            over = replaced and other == sub
            if i != index or kind not in _CALL_FIELDS or (not over and (other == sub or other in later)):
                continue
            if over:  # (also when it holds nothing: the next call's text must not join the earlier call's)
                del self.window.lanes[(i, kind, other)]
                self.arguments.pop((index, other), None)
            if not lane.pending:
                continue
            # whole: complete JSON arguments (the call is over), or a custom tool's input (a call never resumed)
            ends = self.arguments.get((index, other))
            whole = over or kind == "custom" or (ends is not None and ends.complete())
            text = await self.window.release(lane, whole, TOOL)
            if text:
                place, field = _CALL_FIELDS[kind]
                released.append({"index": other, place: {field: text}})
        if released:
            calls = holder["tool_calls"]
            at = next(i for i, entry in enumerate(calls) if entry is call)
            calls[at:at] = released

    async def _flush_tools(self, index: int, holder: dict[str, Any]) -> None:
        for (i, kind, sub), lane in self.window.lanes.items():
            if i != index or not lane.pending or (kind not in _CALL_FIELDS and kind != "function_call"):
                continue
            rest = await self.window.release(lane, True, TOOL)
            if kind == "function_call":  # a legacy call's arguments
                legacy = holder.get("function_call")
                if not isinstance(legacy, dict):
                    legacy = holder["function_call"] = {}
                legacy["arguments"] = (legacy.get("arguments") or "") + rest
                continue
            place, field = _CALL_FIELDS[kind]
            calls = holder.get("tool_calls")
            if not isinstance(calls, list):  # (none, or `true`: what is released is the calls')
                calls = holder["tool_calls"] = []
            # (the last: a call that another id replaced at `sub` in this chunk came before it)
            entry = next((c for c in reversed(calls) if isinstance(c, dict) and c.get("index") == sub), None)
            if entry is None:
                calls.append({"index": sub, place: {field: rest}})
            else:
                container = entry.setdefault(place, {})
                container[field] = (container.get(field) or "") + rest

    async def finish(self) -> list[Chunk]:
        """The upstream ended without a finish_reason for some lanes: release what they hold (a choice's text,
        and its tool calls' arguments, also when it has no text held)."""
        choices: list[dict[str, Any]] = []
        for index in sorted({i for (i, _, _), lane in self.window.lanes.items() if lane.pending}):
            delta: dict[str, Any] = {}
            if self.besides:
                await self._close_beside(index, delta)
            lane = self.window.lanes.get((index, "text", 0))
            if lane is not None and lane.pending:
                delta[self.key] = await self.window.release(lane, True, ANSWER)
            if self.transcribing:
                await self._transcript(index, delta, True)
            if self.chat:
                await self._flush_tools(index, delta)
            choices.append({"index": index, "delta": delta} if self.chat else {"index": index, **delta})
        return [Chunk.of({**self.meta, "choices": choices})] if choices else []

    def shows_usage(self, ctx: RequestContext) -> bool:
        """A client that asked for usage (`include_usage`) in OpenAI's format (a Messages client's framer writes
        its own estimate: `api.anthropic`)."""
        return ctx.wants_usage and ctx.dialect is None

    def usage_report(self, usage: Usage) -> UsageReport:
        """OpenAI's usage-only last chunk, as the upstream's would have been."""
        return UsageReport(usage, msgspec.json.encode({**self.meta, "choices": [], "usage": usage}))

    def blocked(self, usage: Usage | None = None) -> Chunk:
        indexes = sorted({index for index, _, _ in self.window.lanes}) or [0]
        choices: list[dict[str, Any]]
        if self.chat:
            choices = [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "content_filter"} for i in indexes]
        else:
            choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "content_filter"} for i in indexes]
        return Chunk.of({**self.meta, "choices": choices})
