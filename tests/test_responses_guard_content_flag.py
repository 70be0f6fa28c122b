"""An output guard keeps which Responses stream events are content (`Chunk.content`) when it rewrites or adds them.

A Responses stream counts only its `*.delta` events as generated content (`ResponsesEvents.feed` marks the others,
`response.created`, `.output_item.done`, `.completed`, ..., `content=False`). The output guard rebuilds the events it
changes (the done events that repeat a text, renumbered events, the deltas it adds to release held text, the
`response.incomplete` of a block), and rebuilt them all as content: the budget's cut, which runs after the guard
and looks for the delta that crossed its step among a batch's content chunks, could then fall on a lifecycle event.

Why a unit test: the stream's length (`ctx.chunks`) is counted on the upstream's events, before the guard, so a
wrong flag moves the cut only within a batch of several events that crosses a step, and how the upstream's events
are batched follows the network's reads. Here the mock upstream's own reasoning stream (a reasoning item's summary
and text, then a message: lifecycle events between deltas) goes through the provider's event reader and a real
output guard, one event per batch and all in one batch, and every event that leaves is checked.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import msgspec
import pytest

from gateway.guards.runtime import GuardRuntime
from gateway.guards.session import GuardSession
from gateway.guards.stream import StreamGuard
from gateway.policy.guard_schema import GuardsSpec, StreamScanSpec
from gateway.providers.streaming import ResponsesEvents
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk, StreamEvent
from gateway.telemetry.metrics import Metrics
from tests.support import mock_reasoning

SPEC = StreamScanSpec(window_chars=8, step_chars=1, max_hold_chars=64)  # small: the guard holds and releases
TEXT = "the reasoning goes on for a while before it answers the user"


class _Host:
    """What `ResponsesEvents` asks of its provider (a name; its scrubbing, unused by these events)."""

    name = "oa"

    def release(self) -> None: ...

    def sanitize(self, message: object) -> str:
        return str(message)

    def unsecret(self, text: str) -> str:
        return text


@pytest.fixture(scope="module")
def runtime() -> Iterator[GuardRuntime]:
    spec = {"global": {"pii": {"kind": "pii", "places": ["output"], "entities": {"EMAIL_ADDRESS": {}}},
                       "deny": {"kind": "denylist", "terms": ["forbidden"], "places": ["output"]}}}
    built = GuardRuntime(msgspec.convert(spec, GuardsSpec), Metrics(), len)
    asyncio.run(built.start())
    yield built
    asyncio.run(built.aclose())


def _upstream(text: str) -> list[StreamEvent]:
    """The mock's streamed reasoning answer to `text`, as the provider reads it (lifecycle events not content)."""
    frames = mock_reasoning.responses("echo-reasoning", {"stream": True, "model": "m"}, text, 1)
    assert isinstance(frames, list)
    reader = ResponsesEvents(_Host())
    events: list[StreamEvent] = []
    for frame in frames:
        data = next(line for line in frame.split(b"\n") if line.startswith(b"data: "))
        events += reader.feed(data.removeprefix(b"data: "))
    return events


def _guarded(runtime: GuardRuntime, batches: list[list[StreamEvent]]) -> list[Chunk]:
    stage = StreamGuard(runtime, runtime.resolve("t", "a").output, GuardSession(runtime.metrics), SPEC,
                        Endpoint.RESPONSES, "m")

    async def run() -> list[Chunk]:
        out: list[Chunk] = []
        for batch in batches:
            out += [e for e in await stage.on_events(None, batch) if type(e) is Chunk]  # type: ignore[arg-type]
        return out

    return asyncio.run(run())


def _kinds(chunks: list[Chunk]) -> list[tuple[str, bool]]:
    return [(str(json.loads(chunk.payload)["type"]), chunk.content) for chunk in chunks]


def _wrong(chunks: list[Chunk]) -> list[tuple[str, bool]]:
    """The events whose flag is not that of their type: content if and only if a `*.delta` event."""
    return [(kind, content) for kind, content in _kinds(chunks) if content != kind.endswith(".delta")]


@pytest.mark.parametrize("together", [False, True], ids=["an-event-a-batch", "one-batch"])
def test_a_guarded_responses_stream_counts_only_its_deltas_as_content(runtime: GuardRuntime, together: bool) -> None:
    events = _upstream(f"{TEXT} jane.doe@mailbox.org")  # an address: the guard rewrites text (and the done events)
    assert not _wrong([e for e in events if type(e) is Chunk])  # the upstream's, as the provider marks them
    out = _guarded(runtime, [events] if together else [[e] for e in events])
    kinds = [kind for kind, _ in _kinds(out)]
    # Rewritten by the guard: the done events that repeat a text, and the final response.
    assert {"response.reasoning_summary_text.done", "response.output_item.done", "response.completed"} <= set(kinds)
    assert any(kind.endswith(".delta") for kind in kinds)
    assert _wrong(out) == []


def test_a_blocked_responses_stream_ends_with_an_event_that_is_not_content(runtime: GuardRuntime) -> None:
    out = _guarded(runtime, [[e] for e in _upstream(f"{TEXT} forbidden")])
    assert _kinds(out)[-1] == ("response.incomplete", False)
    assert _wrong(out) == []
