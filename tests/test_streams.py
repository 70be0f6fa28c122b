"""Unit tests of the stream driver: stages over typed events, end hooks exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.api.sse import frame
from gateway.errors import BudgetExceeded, GatewayError, UpstreamError
from gateway.pipeline.lifecycle import Lifecycle
from gateway.pipeline.streams import ReplyStream, StreamEnd
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk, StreamError, StreamEvent, UsageReport
from gateway.schemas.openai import Usage


class Source:
    """An event source that records whether it was closed."""

    def __init__(self, batches: list[list[StreamEvent]]) -> None:
        self.batches, self.closed = batches, 0

    def __aiter__(self) -> AsyncIterator[list[StreamEvent]]:
        return self._run()

    async def _run(self) -> AsyncIterator[list[StreamEvent]]:
        for batch in self.batches:
            yield batch

    async def aclose(self) -> None:
        self.closed += 1


class Recorder:
    def __init__(self, reads: bool = True, fail_on: int | None = None, fail_end: bool = False) -> None:
        self.reads_events = reads
        self.seen: list[int] = []
        self.ends: list[StreamEnd] = []
        self.fail_on, self.fail_end = fail_on, fail_end

    async def on_events(self, ctx: Any, events: list[StreamEvent]) -> list[StreamEvent]:
        self.seen.append(len(events))
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise RuntimeError("a bug in a stage")
        return events

    async def on_end(self, ctx: Any, end: StreamEnd) -> None:
        self.ends.append(end)
        if self.fail_end:
            raise RuntimeError("a bug in an end hook")


def context() -> Any:
    task = asyncio.current_task()
    assert task is not None
    return SimpleNamespace(request_id="r", endpoint=Endpoint.CHAT, chunks=0, usage=None, first_chunk_seconds=None,
                           started=0.0, upstream_started=0.0, upstream_seconds=0.0, lifecycle=Lifecycle(task))


def chunk(text: str) -> Chunk:
    return Chunk.of({"choices": [{"index": 0, "delta": {"content": text}}]})


async def drain(stream: ReplyStream) -> list[StreamEvent]:
    return [event async for batch in stream for event in batch]


async def test_a_finished_stream_ends_once_and_closes_its_source() -> None:
    usage = Usage(1, 2, 3)
    source = Source([[chunk("a")], [chunk("b"), UsageReport(usage, b"{}"), DONE]])
    ctx, stage, end_only = context(), Recorder(), Recorder(reads=False)
    stream = ReplyStream(source, ctx)
    stream.add(stage)
    stream.add(end_only)
    events = await drain(stream)
    await stream.aclose()
    assert len(events) == 4 and events[-1] is DONE
    assert stage.seen == [1, 3] and end_only.seen == []  # a stage that reads nothing is never called per batch
    assert [e.outcome for e in stage.ends] == ["done"] and [e.outcome for e in end_only.ends] == ["done"]
    assert source.closed >= 1 and ctx.usage is usage and ctx.chunks == 2


async def test_a_stream_closed_before_its_first_event_still_runs_every_end_hook() -> None:
    source = Source([[chunk("a")], [DONE]])
    stage = Recorder()
    stream = ReplyStream(source, context())
    stream.add(stage)
    await stream.aclose()
    await stream.aclose()
    assert [e.outcome for e in stage.ends] == ["client_gone"] and source.closed == 1 and stage.seen == []


async def test_an_upstream_error_event_ends_the_stream_as_an_error() -> None:
    error = UpstreamError("upstream failed mid-stream")
    stage = Recorder()
    stream = ReplyStream(Source([[chunk("a")], [StreamError(error)]]), context())
    stream.add(stage)
    events = await drain(stream)
    assert isinstance(events[-1], StreamError)
    assert stage.ends[0].outcome == "error" and stage.ends[0].error is error


async def test_a_stage_that_fails_mid_stream_ends_it_with_an_error_event_and_other_hooks_still_run() -> None:
    failing, after = Recorder(fail_on=2, fail_end=True), Recorder()
    stream = ReplyStream(Source([[chunk("a")], [chunk("b")], [DONE]]), context())
    stream.add(failing)
    stream.add(after)
    events = await drain(stream)
    assert isinstance(events[-1], StreamError)
    assert isinstance(events[-1].error, GatewayError) and events[-1].error.status == 500
    assert "bug" not in events[-1].error.message  # the client never sees internals
    assert after.ends[0].outcome == "error" and failing.ends[0].outcome == "error"


async def test_a_stage_may_hold_back_and_rewrite_events() -> None:
    class HoldBack:
        reads_events = True

        def __init__(self) -> None:
            self.held: list[StreamEvent] = []

        async def on_events(self, ctx: Any, events: list[StreamEvent]) -> list[StreamEvent]:
            out = []
            for event in events:
                if isinstance(event, Chunk):
                    self.held.append(chunk(event.data()["choices"][0]["delta"]["content"].upper()))
                else:
                    out.extend(self.held)
                    out.append(event)
            return out

        async def on_end(self, ctx: Any, end: StreamEnd) -> None:
            return None

    stream = ReplyStream(Source([[chunk("a")], [chunk("b")], [DONE]]), context())
    stream.add(HoldBack())
    batches = [batch async for batch in stream]
    assert [len(b) for b in batches] == [0, 0, 3]
    texts = [e.data()["choices"][0]["delta"]["content"] for e in batches[-1] if isinstance(e, Chunk)]
    assert texts == ["A", "B"]


def test_a_chunk_is_decoded_at_most_once() -> None:
    raw = Chunk(b'{"choices": []}')
    assert raw.data() is raw.data()


@pytest.mark.parametrize("outcome", ["client_gone", "shutdown"])
async def test_an_early_close_reports_why(outcome: Any) -> None:
    stage = Recorder()
    stream = ReplyStream(Source([[chunk("a")], [DONE]]), context())
    stream.add(stage)
    await anext(stream)
    await stream.aclose(outcome)
    assert [e.outcome for e in stage.ends] == [outcome]


class ObservedSource(Source):
    """A source that shows every batch to an observer before it yields it (as the OpenAI provider's)."""

    def __init__(self, batches: list[list[StreamEvent]]) -> None:
        super().__init__(batches)
        self.observer: Any = None

    def observe(self, observer: Any) -> None:
        self.observer = observer

    async def _run(self) -> AsyncIterator[list[StreamEvent]]:
        for batch in self.batches:
            if self.observer is not None:
                self.observer(batch)
            yield batch


@pytest.mark.parametrize("last", ["done", "error"])
async def test_a_source_that_observes_is_iterated_directly_and_kept_as_the_stream_keeps_it(last: str) -> None:
    """No stage reads events: the edge iterates the source itself; the counts, the usage, the end and its
    hooks (run by `finish()`, exactly once) are what iterating the `ReplyStream` gives."""
    usage = Usage(1, 2, 3)
    error = UpstreamError("upstream failed mid-stream")
    end: StreamEvent = DONE if last == "done" else StreamError(error)
    outcomes = []
    for observed in (False, True):
        batches: list[list[StreamEvent]] = [[chunk("a")], [chunk("b"), UsageReport(usage, b"{}"), end]]
        source = ObservedSource(batches) if observed else Source(batches)
        ctx, end_only = context(), Recorder(reads=False)
        stream = ReplyStream(source, ctx)
        stream.add(end_only)
        iterator = aiter(stream)
        assert (iterator is not stream) is observed
        events = [event async for batch in iterator for event in batch]
        await stream.finish()
        await stream.finish()
        await stream.aclose()
        assert source.closed == 1
        outcomes.append((len(events), ctx.chunks, ctx.usage, ctx.first_chunk_seconds is not None,
                         [(e.outcome, e.error) for e in end_only.ends]))
    assert outcomes[0] == outcomes[1] == (4, 2, usage, True, [("done", None)] if last == "done" else [("error", error)])


async def test_a_stage_that_reads_events_keeps_an_observing_source_behind_the_stream() -> None:
    source = ObservedSource([[chunk("a")], [DONE]])
    stage = Recorder()
    stream = ReplyStream(source, context())
    stream.add(stage)
    assert aiter(stream) is stream
    assert await drain(stream) and stage.seen == [1, 1] and source.observer is None


class Looker(Recorder):
    """A stage that only looks at events (`looks_only`), as the quality signals' reader."""

    looks_only = True

    def look(self, ctx: Any, events: list[StreamEvent]) -> None:
        self.seen.append(len(events))
        if self.fail_on is not None and len(self.seen) == self.fail_on:
            raise RuntimeError("a bug in a looking stage")


async def test_stages_that_only_look_see_every_batch_of_an_observing_source_iterated_directly() -> None:
    """The direct path shows each batch to the looking stages before the edge gets it; a looking stage that
    fails is logged and stops looking, the others go on, and so does the stream."""
    batches: list[list[StreamEvent]] = [[chunk("a")], [chunk("b")], [chunk("c"), DONE]]
    source = ObservedSource(batches)
    ctx, looker, failing = context(), Looker(), Looker(fail_on=2)
    stream = ReplyStream(source, ctx)
    stream.add(looker)
    stream.add(failing)
    iterator = aiter(stream)
    assert iterator is not stream and source.observer is not None
    events = [event async for batch in iterator for event in batch]
    await stream.finish()
    assert len(events) == 4 and ctx.chunks == 3
    assert looker.seen == [1, 1, 2] and failing.seen == [1, 1]  # dropped after its failure
    assert [e.outcome for e in looker.ends] == [e.outcome for e in failing.ends] == ["done"]


async def test_a_looking_stage_beside_one_that_rewrites_keeps_the_stream_in_between() -> None:
    source = ObservedSource([[chunk("a")], [DONE]])
    looker, reader = Looker(), Recorder()
    stream = ReplyStream(source, context())
    stream.add(looker)
    stream.add(reader)
    assert aiter(stream) is stream
    assert await drain(stream) and looker.seen == reader.seen == [1, 1] and source.observer is None


class PolledSource(ObservedSource):
    """An observing source that can also be polled (`reads()`: `ready()`, `wait()`), as the OpenAI provider's."""

    def __init__(self, batches: list[list[StreamEvent]]) -> None:
        super().__init__(batches)
        self.pending = list(batches)
        self.arrived = False  # each batch "arrives" after one wait

    def reads(self) -> tuple[Any, Any]:
        return self.ready, self.wait

    def ready(self) -> list[StreamEvent] | None:
        if not self.pending:
            return []
        if not self.arrived:
            return None
        self.arrived = False
        batch = self.pending.pop(0)
        self.observer(batch)
        return batch

    async def wait(self) -> None:
        await asyncio.sleep(0)
        self.arrived = True


async def _poll(ready: Any, wait: Any) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    while True:
        batch = ready()
        while batch is None:
            await wait()
            batch = ready()
        if not batch:
            return events
        events += batch


@pytest.mark.parametrize("last", ["done", "error"])
async def test_a_source_that_can_be_polled_is_read_directly_and_kept_as_the_stream_keeps_it(last: str) -> None:
    """`reads()`: the edge polls the source itself; the counts, the usage, the end and its hooks are what
    iterating the `ReplyStream` gives (a looking stage sees every batch)."""
    usage = Usage(1, 2, 3)
    error = UpstreamError("upstream failed mid-stream")
    end: StreamEvent = DONE if last == "done" else StreamError(error)
    outcomes = []
    for polled in (False, True):
        batches: list[list[StreamEvent]] = [[chunk("a")], [chunk("b"), UsageReport(usage, b"{}"), end]]
        source = PolledSource(batches) if polled else Source(batches)
        ctx, end_only, looker = context(), Recorder(reads=False), Looker()
        stream = ReplyStream(source, ctx)
        stream.add(end_only)
        stream.add(looker)
        reads = stream.reads()
        assert (reads is not None) is polled
        events = await _poll(*reads) if reads is not None else await drain(stream)
        await stream.finish()
        await stream.aclose()
        assert source.closed == 1
        outcomes.append((len(events), ctx.chunks, ctx.usage, ctx.first_chunk_seconds is not None, looker.seen,
                         [(e.outcome, e.error) for e in end_only.ends]))
    assert outcomes[0] == outcomes[1] == (4, 2, usage, True, [1, 3],
                                          [("done", None)] if last == "done" else [("error", error)])


async def test_a_stage_that_rewrites_keeps_a_polled_source_behind_the_stream() -> None:
    source = PolledSource([[chunk("a")], [DONE]])
    stage = Recorder()
    stream = ReplyStream(source, context())
    stream.add(stage)
    assert stream.reads() is None and aiter(stream) is stream
    assert await drain(stream) and stage.seen == [1, 1] and source.observer is None


# -- stages that watch the length (`passes_up_to`): the budget's cut-off ------------------------------


class Extends:
    """`Settling` as `StreamBill` uses it: `extend` adds `step` chunks to the cap `steps` times, then refuses."""

    def __init__(self, steps: int, step: int = 2) -> None:
        self.steps, self.step, self.asked, self.settled = steps, step, 0, 0
        self._in_line = None

    async def extend(self, ctx: Any, bill: Any) -> BudgetExceeded | None:
        self.asked += 1
        if self.steps == 0:
            return BudgetExceeded("the budget for this period ran out during the answer; it was cut off")
        self.steps -= 1
        bill.completion_cap += self.step
        return None

    def _price(self, ctx: Any) -> float:
        return 0.0

    async def _settle(self, ctx: Any, bill: Any) -> None:
        self.settled += 1


def budget_bill(cap: int) -> Any:
    from gateway.accounting.bill import Bill, Held
    bill = Bill()
    bill.completion_cap = cap
    bill.budgets.append(Held("budget:key", 1.0, 60.0, SimpleNamespace()))
    return bill


async def _edge(ready: Any, wait: Any) -> list[list[StreamEvent]]:
    """The batches the edge's polled loop (`api.proxy`) sends: ready(); after a batch that is not the last, wait()."""
    sent: list[list[StreamEvent]] = []
    while True:
        batch = ready()
        if batch:
            sent.append(list(batch))
            if isinstance(batch[-1], (StreamError, type(DONE))):
                continue
        elif batch is not None:
            return sent
        await wait()


def _batches() -> list[list[StreamEvent]]:
    return [[chunk("a")], [chunk("b"), chunk("c")], [chunk("d"), chunk("e")], [chunk("f")], [chunk("g")], [DONE]]


async def _through_bill(polled: bool, steps: int, looker: Looker | None = None) -> tuple[Any, ...]:
    from gateway.accounting.settling import StreamBill
    batches = _batches()
    source = PolledSource(batches) if polled else Source(batches)
    ctx = context()
    ctx.endpoint = SimpleNamespace(label="chat")
    ctx.body = {"messages": []}  # one choice (`n` absent): the bill reads no batch below its cap
    settling, bill = Extends(steps), budget_bill(3)
    stream = ReplyStream(source, ctx)
    billed = StreamBill(settling, bill)  # type: ignore[arg-type]
    assert billed.reads_events
    stream.add(billed)
    if looker is not None:
        stream.add(looker)
    reads = stream.reads()
    assert (reads is not None) is polled
    sent = await _edge(*reads) if reads is not None else [batch async for batch in stream]
    await stream.finish()
    await stream.aclose()
    unread = len(source.pending) if isinstance(source, PolledSource) else None
    last = sent[-1][-1]
    framed = [frame(batch, False) for batch in sent]  # the bytes the edge sends for them
    return (framed, ctx.chunks, source.closed, settling.asked, settling.settled, bill.completion_cap,
            type(last).__name__, last.error.message if isinstance(last, StreamError) else None, unread)


async def test_a_budget_stream_that_crosses_its_cap_with_the_budget_left_is_extended_on_the_polled_path() -> None:
    iterated, polled = await _through_bill(False, steps=5), await _through_bill(True, steps=5)
    sent, chunks, closed, asked, settled, cap, last, _, unread = polled
    assert polled[:-1] == iterated[:-1]  # the same batches (so the same bytes), counts and bill
    assert [b.count(b"data: ") for b in sent] == [1, 2, 2, 1, 1, 1] and last == "StreamDone"
    assert chunks == 7 and closed == 1 and settled == 1 and unread == 0
    assert asked == 2 and cap == 7  # past 3, then past 5: two steps of 2


async def test_a_budget_stream_is_cut_on_the_polled_path_as_when_iterated_and_its_source_is_not_read_after() -> None:
    iterated, polled = await _through_bill(False, steps=1), await _through_bill(True, steps=1)
    sent, chunks, closed, asked, settled, cap, last, message, unread = polled
    assert polled[:-1] == iterated[:-1]
    assert [b.count(b"data: ") for b in sent] == [1, 2, 2, 3] and last == "StreamError" and "budget" in str(message)
    assert b'"finish_reason":"length"' in sent[-1].split(b"\n\n")[1]
    # billed for the six chunks it sent: not the gateway's own "length" chunk (no token of the upstream's)
    assert chunks == 6 and closed == 1 and settled == 1 and asked == 2 and cap == 5
    assert unread == 2  # [g] and [DONE]: the source was closed, not read on


async def test_a_looking_stage_beside_the_budget_sees_every_batch_on_the_polled_path() -> None:
    for steps in (1, 5):
        iterated_looker, polled_looker = Looker(), Looker()
        iterated = await _through_bill(False, steps, iterated_looker)
        polled = await _through_bill(True, steps, polled_looker)
        assert polled[:-1] == iterated[:-1] and polled_looker.seen == iterated_looker.seen
        assert [e.outcome for e in polled_looker.ends] == [e.outcome for e in iterated_looker.ends]


async def test_a_budget_stream_beside_a_stage_that_rewrites_is_iterated() -> None:
    from gateway.accounting.settling import StreamBill
    stream = ReplyStream(PolledSource(_batches()), context())
    stream.add(StreamBill(Extends(5), budget_bill(3)))  # type: ignore[arg-type]
    stream.add(Recorder())
    assert stream.reads() is None and aiter(stream) is stream


class Watcher(Recorder):
    """A stage that passes batches untouched up to a length (`passes_up_to`), recording the batches it ran on."""

    def __init__(self, up_to: int) -> None:
        super().__init__()
        self.up_to = up_to

    def passes_up_to(self, ctx: Any) -> int:
        return self.up_to


async def test_a_polled_stream_holds_a_batch_for_its_readers_only_past_the_least_watched_length() -> None:
    source = PolledSource([[chunk("a")], [chunk("b")], [chunk("c")], [DONE]])
    ctx, near, far, looker = context(), Watcher(2), Watcher(10), Looker()
    stream = ReplyStream(source, ctx)
    for stage in (near, far, looker):
        stream.add(stage)
    reads = stream.reads()
    assert reads is not None
    sent = await _edge(*reads)
    await stream.finish()
    assert [len(batch) for batch in sent] == [1, 1, 1, 1] and ctx.chunks == 3 and source.closed == 1
    assert near.seen == far.seen == [1, 1]  # [c] (3 > 2) and [DONE] (3 + 1 > 2), through every reader
    assert looker.seen == [1, 1, 1, 1]  # looked at below the length, its `on_events` past it
    assert [e.outcome for e in near.ends] == [e.outcome for e in looker.ends] == ["done"]


async def test_a_polled_stream_whose_end_a_watching_stage_held_back_ends_as_when_iterated() -> None:
    class Swallower(Watcher):
        async def on_events(self, ctx: Any, events: list[StreamEvent]) -> list[StreamEvent]:
            await super().on_events(ctx, events)
            return [event for event in events if event is not DONE]

    outcomes = []
    for polled in (False, True):
        batches: list[list[StreamEvent]] = [[chunk("a")], [chunk("b"), DONE]]
        source = PolledSource(batches) if polled else Source(batches)
        ctx, stage = context(), Swallower(0)
        stream = ReplyStream(source, ctx)
        stream.add(stage)
        reads = stream.reads()
        assert (reads is not None) is polled
        sent = await _edge(*reads) if reads is not None else [batch async for batch in stream]
        await stream.finish()
        end = stage.ends[0]
        outcomes.append(([frame(batch, False) for batch in sent], ctx.chunks, end.outcome,
                         end.error.message if end.error else None, stage.seen))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][2:] == ("error", "the stream ended unexpectedly", [1, 2, 1])


async def test_a_budget_past_its_cap_with_no_chunk_to_cut_at_keeps_an_ended_answer_and_cuts_one_going_on() -> None:
    """Behind a stage that held every chunk (an output guard), a batch may hold none: past the cap with the budget
    refused, the stream ends with the budget's error, unless the batch ends the answer (nothing left to cut)."""
    from gateway.accounting.settling import StreamBill
    ctx = context()
    ctx.chunks = 9  # the upstream's chunks so far, this batch's included: past the cap of 3
    done = await StreamBill(Extends(0), budget_bill(3)).on_events(ctx, [DONE])  # type: ignore[arg-type]
    assert done == [DONE]
    cut = await StreamBill(Extends(0), budget_bill(3)).on_events(ctx, [])  # type: ignore[arg-type]
    assert [type(event).__name__ for event in cut] == ["StreamError"] and "budget" in cut[0].error.message
