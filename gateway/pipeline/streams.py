"""A streamed reply: the provider's events, through the stream stages, to the edge.

Stages that act on a stream (telemetry now; accounting, output guards and cache
storing next) register with the reply's `ReplyStream` as `StreamStage`s. One loop
here drives them all, with no nested generators: per batch of events, each stage
that reads events may pass, rewrite, hold back or add events; at the end, every
stage's `on_end` runs exactly once, whether the stream finished, failed, was left
by the client, or was cut on shutdown, even before its first event. A stage that
fails mid-stream ends the stream with an error event (the client already has a
200), and its bug is logged as one.

When no stage reads events, or every one that does only looks (`looks_only`: the quality
signals' reader), batches pass straight from the provider to the edge; a source that can
`observe` (the OpenAI provider's) is then iterated by the edge itself, and shows each
batch to those stages' `look` and this module's bookkeeping before it yields it: on a slow
stream the task resumes through one coroutine fewer on every event (and through none of the
source's when the source can be polled: `reads()`). A looking stage that
fails there is logged as a bug and stops looking; the stream it only looked at goes on.

A stage that acts only once the answer grows past a length (`passes_up_to`: the budget's
cut-off, which may reserve more or end the stream) keeps a polled source polled: batches that
stay within every such stage's length are looked at and noted as on the direct path; one that
may cross it is held, and `wait()` runs every reader's `on_events` on it (as iterating would)
before `ready()` hands over what they made of it.

A stream's length (`ctx.chunks`: a budget's cut and the bill of a stream that ends without its usage follow it)
is its source's content events, counted as each batch arrives, before any stage holds, merges or adds one: every
`Chunk` of a chat or completions stream (`_chunks_in`, on every batch: a type test a chunk); of a Responses stream,
only those that carry generated content (`_content_in`: its `*.delta` events, `Chunk.content`), not the
lifecycle events beside them (`response.created`, `.output_item.added`, ...), which carry no tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import GatewayError, InternalError
from ..schemas.endpoints import Endpoint
from ..schemas.events import ChoicesReader, Chunk, EventSource, StreamDone, StreamError, StreamEvent, UsageReport
from ..schemas.openai import Usage

if TYPE_CHECKING:
    from .context import RequestContext

__all__ = ["ReplyStream", "StreamEnd", "StreamStage"]

log = logging.getLogger("gateway.pipeline")
Outcome = Literal["done", "error", "client_gone", "shutdown"]


class StreamEnd:
    """How a stream ended. `error` is set for "error" (what the client was told). `usage_so_far`: for a stream that
    ended without its usage, what the upstream reported before its last event, when its source kept it (a source's
    `usage_so_far`: Anthropic's `message_start`, Gemini's latest `usageMetadata`); the estimate of such a stream
    keeps its prompt figures (`telemetry.usage.estimate_stream_usage`)."""

    __slots__ = ("error", "outcome", "usage_so_far")

    def __init__(self, outcome: Outcome, error: GatewayError | None = None) -> None:
        self.outcome = outcome
        self.error = error
        self.usage_so_far: Usage | None = None


class StreamStage(Protocol):
    """A stage's part in a stream. Stateless stages register themselves; a stage with
    per-request state (a guard's held-back window) registers a small object of its own."""

    reads_events: bool  # False: only `on_end` is called (and the raw bytes pass untouched)
    # A stage may also set `looks_only = True` and offer `look(ctx, events) -> None`: it never changes a batch
    # (its `on_events` returns the events it was given), so the edge may show it batches directly.
    # A stage may instead offer `passes_up_to(ctx) -> int`: its `on_events` returns a batch untouched, and does
    # nothing else, while `ctx.chunks` (the source's content chunks so far, the batch's included: counted before any
    # stage reads it; see the module's docstring) stays at or under that number, so a polled source runs it only on a
    # batch that may cross it (asked again after each).

    async def on_events(self, ctx: RequestContext, events: list[StreamEvent]) -> list[StreamEvent]: ...

    async def on_end(self, ctx: RequestContext, end: StreamEnd) -> None: ...


class ReplyStream:
    """Iterate for batches of events; `aclose(outcome)` when the consumer stops early."""

    __slots__ = ("_count", "_ctx", "_end", "_held", "_iterator", "_limit", "_lookers", "_passed", "_readers",
                 "_source", "_source_ready", "_source_wait", "_stages", "_terminal", "_watchers")
    # A polled source behind watching stages: the chunks the stream may reach before a batch is held (`_held`)
    # for the readers, the batch they made of it (`_passed`) for the next `ready()`, and the source's own `ready`
    # and `wait`. Set by `reads()` and read only on that path: a stream without such stages never sets them.
    _limit: int
    _held: list[StreamEvent] | None
    _passed: list[StreamEvent] | None
    _source_ready: Callable[[], list[StreamEvent] | None]
    _source_wait: Callable[[], Awaitable[object]]

    def __init__(self, source: EventSource, ctx: RequestContext) -> None:
        self._source = source
        self._ctx = ctx
        # A batch's content chunks, for `ctx.chunks` (see the module's docstring): chosen once, so that a chat
        # stream's count is what it was, a type test a chunk.
        self._count = _content_in if ctx.endpoint is Endpoint.RESPONSES else _chunks_in
        self._iterator: Any = None
        self._stages: list[StreamStage] = []  # in the order added: innermost (closest to the upstream) first
        self._readers: tuple[StreamStage, ...] = ()
        self._lookers: tuple[StreamStage, ...] = ()  # the readers that only look (`looks_only`)
        self._watchers: tuple[StreamStage, ...] = ()  # the readers that pass batches up to a length (`passes_up_to`)
        self._terminal: StreamEnd | None = None
        self._end: StreamEnd | None = None  # set once the end hooks ran

    def add(self, stage: StreamStage) -> None:
        """`stage`, after those added so far (closer to the client)."""
        self._stages.append(stage)
        if stage.reads_events:
            self._readers = (*self._readers, stage)
            self._classify(stage)

    def add_at_source(self, stage: StreamStage) -> None:
        """`stage`, before the stages added so far that rewrite the source's events (`rewrites`: an output guard,
        which holds text back and releases it merged), after any other: for a stage that must read the upstream's
        own events (a budget's cut, which counts and cuts the upstream's chunks: `accounting.settling.StreamBill`).
        A method of its own, so that `add` (every other stage) looks for no such stage."""
        stages = self._stages
        at = next((i for i, added in enumerate(stages) if getattr(added, "rewrites", False)), len(stages))
        stages.insert(at, stage)
        if stage.reads_events:
            self._readers = tuple(added for added in stages if added.reads_events)
            self._classify(stage)

    def _classify(self, stage: StreamStage) -> None:
        if getattr(stage, "looks_only", False):
            self._lookers = (*self._lookers, stage)
        elif hasattr(stage, "passes_up_to"):
            self._watchers = (*self._watchers, stage)

    def read_choices(self, reader: ChoicesReader) -> bool:
        """Have the source hand `reader` each chunk's typed choices as it decodes them (a source with
        `read_choices(reader)`: the OpenAI provider's stream, or a routed replay of one), instead of `reader`
        looking at the events for them: True when it does. Only before the stream is read, and only while every
        stage added so far only looks at the events (none changes them: what the reader reads is then what the
        client gets). A reader so fed needs no `on_events` (`reads_events` False), only its `on_end`."""
        if self._iterator is not None or len(self._lookers) != len(self._readers):
            return False
        take = getattr(self._source, "read_choices", None)
        return take is not None and bool(take(reader))

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        """This stream, or the source's own iterator when no stage reads events and the source can show
        each batch to `_note` itself (`observe(callback)`; its batches then end with a terminal event).
        Either way, `finish()` after the last batch."""
        readers = self._readers
        # (`_note` counts every chunk on the direct path: a stream whose count is another's is iterated here)
        direct = self._iterator is None and len(self._lookers) == len(readers) and self._count is _chunks_in
        observe = getattr(self._source, "observe", None) if direct else None
        if observe is None:
            return self
        observe(self._look if readers else self._note)
        self._iterator = aiter(self._source)
        return self._iterator  # type: ignore[no-any-return]

    def reads(self, sink: Callable[[list[StreamEvent]], bool] | None = None,
              ) -> tuple[Callable[[], list[StreamEvent] | None], Callable[[], Awaitable[object]]] | None:
        """The source's own (`ready`, `wait`) when it offers them (`reads()`, as the OpenAI provider's stream)
        and it could be iterated directly (see `__aiter__`), else None: iterate this stream. `ready()` is the
        next batch, None until `wait()` is over, [] after the last; `finish()` after the last batch.

        Stages that watch the length (`passes_up_to`) may be behind it too: then `ready` and `wait` are this
        stream's (`_ready_watched`, `_wait_watched`), which run the readers on a batch that may cross a length.

        A task that polls the source resumes through no coroutine but its own on every event. With `sink` (and no
        watching stage), a source that offers `forward(sink)` hands each batch to `sink` from the connection's read
        while `wait()` is pending: the task then resumes only for a batch `sink` declines (returns False for)."""
        source_reads = getattr(self._source, "reads", None)
        if source_reads is None or self._iterator is not None or not hasattr(self._source, "observe"):
            return None
        if self._count is not _chunks_in:  # (as in `__aiter__`)
            return None
        readers = self._readers
        if len(self._lookers) + len(self._watchers) != len(readers):
            return None
        self._iterator = self._source  # read from now on: not to be iterated too
        if not self._watchers:
            self._source.observe(self._look if readers else self._note)
            polled = source_reads()
            forward = getattr(self._source, "forward", None) if sink is not None else None
            if forward is not None:
                forward(sink)
            return polled  # type: ignore[no-any-return]
        self._limit = self._watched_length()
        self._held = self._passed = None
        self._source.observe(self._watch)
        self._source_ready, self._source_wait = source_reads()
        return self._ready_watched, self._wait_watched

    async def __anext__(self) -> list[StreamEvent]:
        if self._terminal is not None:
            await self._finish(self._terminal)
            raise StopAsyncIteration
        if self._iterator is None:
            self._iterator = aiter(self._source)
        try:
            batch: list[StreamEvent] = await anext(self._iterator)
        except StopAsyncIteration:  # a source that ended without its last event
            batch = [StreamError(InternalError("the stream ended unexpectedly"))]
        except GatewayError as exc:
            batch = [StreamError(exc)]
        self._ctx.chunks += self._count(batch)  # the source's, before a stage holds, merges or adds any
        batch = await self._through_readers(batch)
        self._note(batch, counted=True)
        return batch

    async def _through_readers(self, batch: list[StreamEvent]) -> list[StreamEvent]:
        """A batch through every reader, innermost first; a reader that fails ends the stream with an error."""
        ctx = self._ctx
        for stage in self._readers:
            try:
                batch = await stage.on_events(ctx, batch)
            except GatewayError as exc:
                batch = [StreamError(exc)]
            except Exception:  # noqa: BLE001 -- a bug: `_stage_failed` logs it
                batch = _stage_failed(ctx)
        return batch

    def _look(self, batch: list[StreamEvent], counted: bool = False) -> None:
        """`_note`, after the stages that only look have seen the batch (the direct path)."""
        ctx = self._ctx
        for stage in self._lookers:
            try:
                stage.look(ctx, batch)  # type: ignore[attr-defined]
            except Exception:
                log.exception("stream stage failed", extra={"fields": {"request_id": ctx.request_id}})
                self._readers = tuple(reader for reader in self._readers if reader is not stage)
                self._lookers = tuple(looker for looker in self._lookers if looker is not stage)
        self._note(batch, counted)

    def _watched_length(self) -> int:
        """The least of the watching stages' lengths (a loop: `min` of a generator costs a frame more)."""
        ctx = self._ctx
        first, *others = self._watchers
        least: int = first.passes_up_to(ctx)  # type: ignore[attr-defined]
        for stage in others:
            length: int = stage.passes_up_to(ctx)  # type: ignore[attr-defined]
            if length < least:
                least = length
        return least

    def _watch(self, batch: list[StreamEvent]) -> None:
        """The source's observer behind watching stages: a batch within their length is looked at and noted as
        on the direct path; one that may cross it is held, for `_wait_watched` to run the readers on."""
        ctx = self._ctx
        ctx.chunks += self._count(batch)
        if ctx.chunks > self._limit:
            self._held = batch
        elif self._lookers:
            self._look(batch, True)
        else:
            self._note(batch, True)

    def _ready_watched(self) -> list[StreamEvent] | None:
        """`ready()` behind watching stages: what the readers made of a held batch; None while one is held (wait
        for them); [] once a batch ended the stream (a reader's end too: the source is not read after it)."""
        batch = self._passed
        if batch is not None:
            self._passed = None
            return batch or None  # all held back: wait for the source's next bytes
        if self._terminal is not None:
            return []
        batch = self._source_ready()
        if self._held is not None:
            return None
        if batch is not None and not batch:  # over, though no batch ended it (a reader held its end back): as
            self._held = [StreamError(InternalError("the stream ended unexpectedly"))]  # `__anext__` ends it
            return None
        return batch

    def _wait_watched(self) -> Awaitable[object]:
        """`wait()` behind watching stages: the readers on the held batch, if one is held, else the source's."""
        held = self._held
        if held is None:
            return self._source_wait()
        self._held = None
        return self._pass(held)

    async def _pass(self, batch: list[StreamEvent]) -> None:
        """A held batch through every reader, as `__anext__` takes it; noted, and kept for `_ready_watched`."""
        batch = await self._through_readers(batch)
        self._note(batch, counted=True)
        self._passed = batch
        self._limit = self._watched_length()

    def _note(self, batch: list[StreamEvent], counted: bool = False) -> None:
        """What the request keeps of a batch about to be sent: usage, the end, the first chunk's time; and, unless
        `counted` (before the readers, which may hold, merge or add chunks), its chunks (`ctx.chunks`: every one,
        as `_chunks_in` counts them; uncounted only on the direct path, which a Responses stream never takes)."""
        ctx = self._ctx
        for event in batch:
            if isinstance(event, Chunk):
                if not counted:
                    ctx.chunks += 1
            elif isinstance(event, UsageReport):
                ctx.usage = event.usage
            elif isinstance(event, StreamDone):
                self._terminal = StreamEnd("done")
            elif isinstance(event, StreamError):
                self._terminal = StreamEnd("error", event.error)
        if ctx.first_chunk_seconds is None:
            ctx.first_chunk_seconds = time.perf_counter() - ctx.started

    async def finish(self) -> None:
        """The iteration ended: the end hooks, before the end of the body (a no-op when `__anext__` ran them)."""
        await self._finish(self._terminal or StreamEnd("error", InternalError("the stream ended unexpectedly")))

    async def aclose(self, outcome: Outcome = "client_gone", error: GatewayError | None = None) -> None:
        """Stop early (the client left, or a cut); a no-op once the end hooks ran."""
        await self._finish(self._terminal or StreamEnd(outcome, error))

    async def _finish(self, end: StreamEnd) -> None:
        if self._end is not None:
            return
        self._end = end
        ctx = self._ctx
        ctx.lifecycle.protect()
        try:
            await self._source.aclose()
        finally:
            if ctx.upstream_started:
                ctx.upstream_seconds = time.perf_counter() - ctx.upstream_started
            if ctx.usage is None:  # (asked only of a stream that ended without its usage)
                end.usage_so_far = getattr(self._source, "usage_so_far", None)
            for stage in self._stages:
                try:
                    await stage.on_end(ctx, end)
                except Exception:
                    log.exception("stream end hook failed", extra={"fields": {"request_id": ctx.request_id}})


def _chunks_in(batch: list[StreamEvent]) -> int:
    """A chat or completions batch's content chunks: all of them."""
    count = 0
    for event in batch:
        if type(event) is Chunk:
            count += 1
    return count


def _content_in(batch: list[StreamEvent]) -> int:
    """A Responses batch's content chunks: its events of generated content (`Chunk.content`)."""
    count = 0
    for event in batch:
        if type(event) is Chunk and event.content:
            count += 1
    return count


def _stage_failed(ctx: RequestContext) -> list[StreamEvent]:
    """A stage failed mid-stream (a bug, logged): the batch that ends the stream (the client already has a 200)."""
    log.exception("stream stage failed", extra={"fields": {"request_id": ctx.request_id}})
    return [StreamError(InternalError("the gateway failed while streaming the answer"))]
