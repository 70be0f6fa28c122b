"""A started OpenAI SSE stream as batches of typed events (`OpenAIStream`), for `openai_compat`'s provider.

Each chunk is decoded just enough to account for it and to spot an in-band error (its choices too when a
stage reads the answer's text: on the events, or handed to the stage's reader as they are decoded, which
then gets only the chunks that carry more than text once it needs no more of it), and its bytes go on
untouched unless the gateway itself changed what the upstream sends (the `"usage": null` its usage request
adds: `strip_null_usage`). A `[DONE]` before any chunk with a choice or the usage is no answer: the stream fails
as one whose body ends before any event does (`_end`: a lone `[DONE]` then falls back), never an empty answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec

from ..errors import UpstreamError, with_detail
from ..schemas.events import DONE, ChoicesReader, Chunk, StreamError, StreamEvent, UsageReport
from ..schemas.openai import ChoicePeek, ChunkChoicesPeek, has_choices
from ..upstream.client import transport_error
from ..upstream.read_timer import ReadTimer
from ..upstream.sse import DONE as DONE_PAYLOAD
from ..upstream.sse import SSEDecoder
from .openai_chunks import (
    COMPACT_CUT,
    COMPACT_NULL_USAGE,
    EndPeek,
    decode_choices,
    flat_error,
    has_text,
    is_utf8,
    peek_chunk,
    peek_chunk_choices,
    peek_end,
    peek_or_none,
    peek_text_only,
    strip_null_usage,
)

if TYPE_CHECKING:
    from .openai_compat import OpenAICompatProvider

__all__ = ["OpenAIStream"]

def _unobserved(batch: list[StreamEvent]) -> None:
    """No one observes the stream's batches (see `OpenAIStream.observe`)."""


class OpenAIStream:
    """A started OpenAI SSE stream, as batches of typed events (see `EventSource`).

    Two ways to read it: iterate it (an async generator, for consumers that rewrite events), or,
    once observed, poll it (`reads()`: `ready()` hands over the next batch when the upstream's bytes
    are there, else None, and the reader awaits the body's `wait()` before asking again). The edge
    polls it when no stage rewrites events: on a slow stream the task then resumes through no
    generator frame on every event (about 1,500 instructions an event). A poller may also `forward` the
    batches to a sink that writes them from the upstream connection's read, its task left asleep."""

    __slots__ = ("_asked_for_usage", "_choices", "_closed", "_deadline", "_decoder", "_finished", "_held", "_idle_s",
                 "_last_choices", "_observer", "_peek", "_provider", "_read_choices", "_reader", "_response",
                 "_said", "_saw_usage", "_sink", "_skims", "_tail", "_timer")

    def __init__(
        self, provider: OpenAICompatProvider, response: aiohttp.ClientResponse, deadline: float,
        asked_for_usage: bool, idle_s: float, read_choices: bool = False, choices: int = 1,
    ) -> None:
        self._read_choices = read_choices
        self._choices = choices  # the answers asked for (`n`): each must finish (`_end`)
        self._peek: Any = peek_chunk_choices if read_choices else peek_chunk
        self._reader: ChoicesReader | None = None  # takes the choices as they are decoded (`read_choices`)
        self._skims = False  # the reader needs only the last chunk's choices once it has the text it needs
        self._last_choices: Any = None  # the last chunk's, typed or raw, while a reader may want them (`last_choices`)
        self._idle_s = idle_s
        self._provider = provider
        self._response = response
        self._deadline = deadline
        self._asked_for_usage = asked_for_usage
        self._closed = False
        self._finished = False  # the batch that ends the stream was handed over
        self._saw_usage = False
        self._said = False  # a chunk with a choice, or the usage, came (`_events`): a [DONE] ends an answer
        self._tail: list[bytes] | None = None  # the payloads of the last batch (see `_end`)
        self._timer: ReadTimer | None = None
        self._decoder = SSEDecoder()
        self._observer: Callable[[list[StreamEvent]], None] = _unobserved
        self._held: list[StreamEvent] | None = None  # a batch the sink declined: `ready()` hands it over first
        self._sink: Callable[[list[StreamEvent]], bool] | None = None

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._batches()

    def observe(self, observer: Callable[[list[StreamEvent]], None]) -> None:
        """Show `observer` every batch before it is handed over (`pipeline.streams.ReplyStream` then lets the
        edge read this stream directly). Every stream ends with a batch that ends with a `StreamDone` or a
        `StreamError`."""
        self._observer = observer

    def read_choices(self, reader: ChoicesReader, earlier: Sequence[Chunk] = ()) -> bool:
        """Hand `reader` the choices of `earlier` (this stream's chunks decoded before it came: typed up to the
        first text, after it as payloads) and the typed choices of every chunk decoded from now on, instead of
        putting them on the chunk events. False (not taken) when no stage asked for the choices
        (`Call.read_choices`).

        While `reader.take` says it wants them, every chunk's choices are decoded and handed over. After, a reader
        that skims (`ChoicesReader.skim`) gets nothing more as chunks pass (they are decoded as with no reader:
        a typed decode of the choices cost about 1,900 instructions a chunk), only the last chunk's choices at the
        end (`last_choices`); any other reader gets the chunks that carry more than text: each is decoded as
        `ChunkTextOnlyPeek`, and only one that fails to is decoded again with its choices and handed over."""
        if not self._read_choices:
            return False
        self._reader = reader
        wants = True
        for chunk in earlier:
            if chunk.choices is not None:
                wants = reader.take(chunk.choices)
                if not wants and reader.skim(self.last_choices):
                    self._skims = True
                    break
            else:
                reader.take_payload(chunk.payload)
        self._peek = peek_chunk_choices if wants else peek_chunk if self._skims else peek_text_only
        return True

    def last_choices(self) -> list[ChoicePeek] | None:
        """The typed choices of the last chunk read that had any (its usage chunk aside), for a reader that skims;
        None when there was none, or they do not fit the typed form."""
        last = self._last_choices
        if isinstance(last, msgspec.Raw):
            try:
                return decode_choices(last)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                return None
        return last  # type: ignore[no-any-return]

    def reads(self) -> tuple[Callable[[], list[StreamEvent] | None], Callable[[], Awaitable[object]]]:
        """(`ready`, `wait`) for reading this stream without iterating it: `ready()` is the next batch, None
        when the upstream's next bytes have not come yet (await `wait()`, then ask again), or [] once the
        batch that ends the stream was handed over. `aclose()` when done, as after iterating.

        `wait()` is `ReadTimer.wait`: it may fail with the upstream's failure, which the next `ready()` turns
        into the stream's last batch (a `StreamError`): a reader ignores the failure of the wait itself."""
        return self.ready, self._start().wait

    def forward(self, sink: Callable[[list[StreamEvent]], bool]) -> bool:
        """While the reader of `reads()` waits, hand each batch to `sink` as soon as its bytes arrive, from the
        connection's read itself (`ReadTimer.pump`): True from `sink` means it wrote the batch, and the reader
        waits on, its task not resumed; a batch `sink` declines (False, e.g. the last one) ends the wait, and
        `ready()` hands it over next. False: not on this connection (every batch goes through `ready()`)."""
        if self._timer is None or not self._timer.pump(self._pump):
            return False
        self._sink = sink
        return True

    def _pump(self) -> bool:
        """The connection read bytes while the reader waits: whether their events were all written by the sink."""
        if self._finished or self._held is not None or self._sink is None:
            return False
        batch = self.ready()
        if batch:
            self._held = batch
            if self._finished or not self._sink(batch):
                return False
            self._held = None
        elif batch is not None:
            return False
        self._timer.waits_on()  # type: ignore[union-attr]  # set by `forward`
        return True

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._sink = None
            self._observer = _unobserved  # it is usually the ReplyStream that holds this stream: no cycle left
            self._reader = None  # nor with a reader that holds `last_choices` (`ChoicesReader.skim`)
            if self._timer is not None:
                self._timer.stop()
            self._response.close()
            self._provider.release()

    def _start(self) -> ReadTimer:
        timer = self._timer
        if timer is None:
            timer = self._timer = ReadTimer(self._response.content, self._deadline, self._idle_s)
        return timer

    async def _batches(self) -> AsyncIterator[list[StreamEvent]]:
        wait = self._start().wait
        try:
            while True:
                batch = self.ready()
                while batch is None:
                    waiting = wait()
                    try:
                        await waiting
                    except Exception:  # noqa: BLE001 -- the read failed: `ready()` ends the stream with it
                        pass
                    batch = self.ready()
                if not batch:
                    return
                yield batch
                del batch  # nothing of this read is kept while the next one waits
        finally:
            await self.aclose()

    def ready(self) -> list[StreamEvent] | None:
        """The next batch of events (shown to the observer first), None when there is none yet, [] after the
        last. Never raises for the upstream's failures: they end the stream with a `StreamError` batch."""
        held = self._held
        if held is not None:
            self._held = None
            return held
        if self._finished:
            return []
        timer = self._timer
        assert timer is not None, "reads() or iterating starts the stream"
        while True:
            try:  # not `read()` nor `readany()`: no coroutine frames between the task and the wait
                data = timer.ready()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return self._last([StreamError(transport_error(exc, self._provider.name, "mid-stream",
                                                               self._response.status))])  # (its head came: `at_work`)
            if data is None:
                return None
            try:
                payloads = self._decoder.feed(data) if data else self._decoder.flush()
            except ValueError as exc:
                return self._last([self._fail(f"sent an invalid stream: {exc}")])
            events, finished = self._events(payloads)
            if not data and not finished:  # the upstream's body ended without [DONE]
                events.append(self._end(payloads or self._tail))
                finished = True
            if finished:
                if self._asked_for_usage and not self._saw_usage and events[-1] is DONE:
                    # it ignores include_usage (a stream that finished cleanly without it; not one that failed, which
                    # may have been cut before its usage chunk): from now on, count ourselves
                    self._provider.stream_usage_expected = False
                return self._last(events)
            if events:
                self._tail = payloads  # for `_end`: the list, not its last item (every event's path: one store)
                self._observer(events)
                return events
            # bytes without a whole event: read on (None when nothing more has come)

    def _end(self, tail: list[bytes] | None) -> StreamEvent:
        """The event for a body that ended without [DONE], `tail` its last payloads (None: it had none).

        A cut connection can end a body as cleanly as a server that is done, so only a finished answer counts
        as one: the last chunk gave a finish reason, or it was the usage chunk (sent after every choice
        finished). Some OpenAI-compatible servers end so without [DONE] (llama.cpp's server until September
        2024, text-generation-inference's until mid-2024, ik_llama.cpp's without `--send-done`): their answers
        stay whole. Anything else is a failure, before the first chunk as well (so that it falls back), never an
        empty answer."""
        if tail:
            try:
                peek = peek_end(tail[-1])
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                peek = None
            if peek is not None and ((peek.usage is not None and not peek.choices)
                                     or self._all_finished(tail, peek)):
                return DONE
            return self._fail("ended the stream before the answer was complete")
        return self._fail("ended the stream without sending anything")

    def _all_finished(self, tail: list[bytes], last: EndPeek) -> bool:
        """Whether the last payloads finish every answer asked for: the last chunk's finish reason, and with
        `n` > 1 one for each of the `n` choices among the last read's chunks (a body cut after one choice's finish
        chunk left the others unfinished, and was stored whole by the cache)."""
        if not any(choice.finish_reason for choice in last.choices or ()):
            return False
        if self._choices <= 1:
            return True
        finished: set[Any] = set()
        for payload in tail:
            try:
                peek = peek_end(payload)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
                continue
            # (an index that is no number is no choice asked for: a list or an object would not even hash)
            finished.update(choice.index for choice in peek.choices or ()
                            if choice.finish_reason and type(choice.index) is int)
        return len(finished) >= self._choices

    def _last(self, events: list[StreamEvent]) -> list[StreamEvent]:
        """The batch that ends the stream: shown to the observer, and the last one handed over."""
        self._finished = True
        self._observer(events)
        return events

    def _events(self, payloads: list[bytes]) -> tuple[list[StreamEvent], bool]:
        """The events for these SSE payloads, and whether the stream is over."""
        events: list[StreamEvent] = []
        hide = self._asked_for_usage
        reader = self._reader
        peek_typed = self._peek is peek_chunk_choices
        # No reader yet: the chunk events carry their typed choices, up to the first text (a reader that comes later
        # gets the later ones as payloads: `read_choices`).
        read = reader is None and peek_typed
        reading = reader is not None and peek_typed  # the reader takes every chunk's
        keep = (reader is None and self._read_choices) or self._skims  # the last chunk's choices (`last_choices`)
        said = self._said
        for payload in payloads:
            if payload == DONE_PAYLOAD:
                if not said:  # [DONE] with no choice nor usage before it: no answer (`_end`)
                    return [self._fail("ended the stream without sending anything")], True
                events.append(DONE)
                return events, True
            if not payload.isascii() and not is_utf8(payload):  # (~30 ns for an ASCII event: C, no copy)
                events.append(self._fail("sent invalid UTF-8"))  # it would reach the client as charset=utf-8
                return events, True
            typed = read
            try:  # every event is checked: a malformed one ends the stream cleanly (~0.5 us)
                peek = self._peek(payload)
                riding = peek.usage is not None and has_choices(peek.choices)  # usage on a content chunk
            except (msgspec.DecodeError, msgspec.ValidationError):
                # choices a reader cannot type (`"content": 5`) pass as they do when no stage reads them
                try:
                    peek, riding = self._peek_odd(payload)
                except RecursionError:  # (the typed peek refused it before its depth: too deep for any peek)
                    peek, riding = None, False
                if peek is None:
                    events.append(self._fail("sent a malformed stream event"))
                    return events, True
                typed = False
            except RecursionError:  # msgspec's, for JSON nested past the recursion limit: no peek reads it
                events.append(self._fail("sent a malformed stream event"))
                return events, True
            else:
                if reading and peek.choices and not reader.take(peek.choices):  # type: ignore[union-attr]
                    reading = False  # it has the text it needs: from the next chunk on, only what carries more
                    keep = self._skims = reader.skim(self.last_choices)  # type: ignore[union-attr]
                    self._peek = peek_chunk if keep else peek_text_only
                elif read and has_text(peek.choices):
                    read = False  # its first text: the chunks after it are decoded as with no reader
                    self._peek = peek_chunk
            if peek.error is not None:
                events.append(self._fail("failed mid-stream", self._provider.sanitize(peek.error.message)))
                return events, True
            if peek.usage is not None:
                self._saw_usage = said = True
                if riding:
                    if keep:
                        self._last_choices = peek.choices
                    events.append(Chunk(payload, None, peek.choices) if typed else Chunk(payload))
                    events.append(UsageReport(peek.usage))
                else:
                    events.append(UsageReport(peek.usage, payload))
                continue
            if not peek.choices:  # (no choices, no usage: an odd chunk, or an error written flat)
                failed, message = flat_error(payload)
                if failed:
                    events.append(self._fail("failed mid-stream", self._provider.sanitize(message)))
                    return events, True
            if hide:
                if payload[COMPACT_CUT:] == COMPACT_NULL_USAGE:  # the common case, without a call (strip_null_usage;
                    # a slice compared, not `endswith`: see upstream/sse.py)
                    payload = payload[:COMPACT_CUT] + b"}"
                elif payload.find(b'"usage"') >= 0:  # not `in`: see upstream/sse.py
                    payload = strip_null_usage(payload)
            if keep:
                self._last_choices = peek.choices
            if not said:  # (until the first chunk with a choice: `"choices": []` is none)
                try:
                    said = has_choices(peek.choices)
                except msgspec.ValidationError:  # `"choices": {}`: no answer's chunk (a complete answer's: 502)
                    events.append(self._fail("sent a malformed stream event"))
                    return events, True
            events.append(Chunk(payload, None, peek.choices) if typed else Chunk(payload))
        self._said = said
        return events, False

    def _peek_odd(self, payload: bytes) -> tuple[Any, bool]:
        """A chunk that failed to decode as `_peek` reads it: `peek_or_none`'s when a stage reads the choices (else
        it is malformed). With a reader: one that needs no more text gets a chunk that carries more than text
        with its choices (when they fit the typed form), and any reader a chunk whose choices do not, as JSON."""
        reader = self._reader
        if reader is None:
            return peek_or_none(payload) if self._read_choices else (None, False)
        if self._peek is peek_text_only:
            try:
                peek: ChunkChoicesPeek = peek_chunk_choices(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                pass
            else:
                if peek.choices:
                    reader.take(peek.choices)
                return peek, peek.usage is not None and has_choices(peek.choices)
        found = peek_or_none(payload)
        if found[0] is not None:
            reader.take_payload(payload)
        return found

    def _fail(self, what: str, detail: str = "") -> StreamError:
        """The stream's end with an error: the upstream `what`, then its own words (`detail`, sanitized), if any."""
        return StreamError(with_detail(UpstreamError, f"upstream `{self._provider.name}` {what}", detail))
