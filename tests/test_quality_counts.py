"""The quality signals' counts for a stream, as the stream reader makes them at its end (the common stream counted
by its finish reason alone: `StreamQuality.on_end`), against counting the answer read from every chunk."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from gateway.pipeline.context import Reply
from gateway.pipeline.streams import ReplyStream, StreamEnd
from gateway.providers.openai_chunks import peek_chunk
from gateway.providers.openai_stream import OpenAIStream
from gateway.routing.attempts import Replay
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk
from gateway.schemas.openai import ChunkChoicesPeek
from gateway.telemetry.answers import Answer
from gateway.telemetry.labels import MetricLabels
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.quality import QualitySignals, chat_asked
from gateway.telemetry.quality_reading import PlainStreamQuality, StreamQuality, read_payload

_LABELS = MetricLabels(frozenset({"a"}), frozenset({"t"}))
_TOOLS = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}


def _chunk(delta: dict[str, Any], finish: str | None = None, index: int = 0) -> bytes:
    return msgspec.json.encode({"id": "x", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


_STREAMS: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    "plain": ({}, [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}), _chunk({}, "stop")]),
    "truncated": ({}, [_chunk({"content": "Hello"}), _chunk({"content": " there"}), _chunk({}, "length")]),
    "an odd finish reason": ({}, [_chunk({"content": "Hello"}), _chunk({}, "eos")]),
    "no finish reason": ({}, [_chunk({"content": "Hello"})]),
    "two finish reasons": ({}, [_chunk({"content": "Hello"}), _chunk({}, "stop"),
                                _chunk({"content": "x"}, "length", 1)]),
    "a refusal": ({}, [_chunk({"content": "I'm sorry, but I can't help with that."}), _chunk({}, "stop")]),
    "a refusal after 300 characters": ({}, [_chunk({"content": "I " + "x" * 400}), _chunk({}, "stop")]),
    "a refusal field late": ({}, [_chunk({"content": "Well"}), _chunk({"refusal": "I will not"}), _chunk({}, "stop")]),
    "tool calls nobody asked for": ({}, [_chunk({"content": "Calling"}),
                                         _chunk({"tool_calls": [{"index": 0, "function": {"name": "g"}}]}),
                                         _chunk({}, "tool_calls")]),
    "a malformed tool call": (_TOOLS, [_chunk({"content": "Sure"}), _chunk(
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]}), _chunk({}, "tool_calls")]),
    "JSON asked, invalid": ({"response_format": {"type": "json_object"}}, [_chunk({"content": "Not JSON"}),
                                                                           _chunk({}, "stop")]),
    "empty": ({}, [_chunk({"content": ""}), _chunk({"content": "  "}), _chunk({}, "stop")]),
    "a first text that may open a refusal": ({}, [_chunk({"content": "I think"}), _chunk({"content": " so"}),
                                                  _chunk({}, "stop")]),
    "text and finish in one chunk": ({}, [_chunk({"content": "Hello"}, "stop")]),
    "a finish before any text": ({}, [_chunk({}, "stop")]),
    "text after the finish": ({}, [_chunk({"content": "Hello"}), _chunk({}, "stop"), _chunk({"content": "!"})]),
    "odd types, early": ({}, [_chunk({"content": 5}), _chunk({"content": "Hello"}), _chunk({}, "stop")]),
    "odd types, late": ({}, [_chunk({"content": "Hello"}), _chunk({"content": 5}), _chunk({}, "stop")]),
    "an odd refusal late": ({}, [_chunk({"content": "Hello"}), _chunk({"refusal": 5}), _chunk({}, "stop")]),
    "a second choice": ({}, [_chunk({"content": "Hello"}), _chunk({"content": "Bye"}, None, 1),
                             _chunk({}, "stop"), _chunk({}, "stop", 1)]),
    "a completions-style text": ({}, [_chunk({"content": "Hello"}), msgspec.json.encode(
        {"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]})]),
}


# Streams that a request asking for no JSON, offering no tools and one answer does not get from OpenAI (a second
# choice, a refusal field, text after the finish): the common stream's reader, which skims the chunks between its
# first text and the last chunk (`PlainStreamQuality`), counts them as the first text and the last chunk read alone.
_OUTSIDE_PLAIN = frozenset({"two finish reasons", "a refusal field late", "text after the finish",
                            "an odd refusal late", "a second choice"})


def _skimmed(payloads: list[bytes]) -> list[bytes]:
    """The chunks a skimming reader reads: up to the first with text, and the last."""
    for position, payload in enumerate(payloads):
        if b'"content":"' in payload and b'"content":""' not in payload:
            return payloads[:position + 1] + payloads[-1:] if position + 1 < len(payloads) else payloads
    return payloads


def _counts(metrics: Metrics) -> dict[str, float]:
    return {f"{s.name}{sorted(s.labels.items())}": s.value for m in metrics.registry.collect()
            if m.name.startswith("gateway_quality") for s in m.samples if not s.name.endswith("_created")}


@pytest.mark.parametrize("name", list(_STREAMS))
@pytest.mark.parametrize("typed", [True, False])
def test_a_streams_counts_are_those_of_the_answer_read_from_every_chunk(name: str, typed: bool) -> None:
    asked, payloads = _STREAMS[name]
    ctx: Any = SimpleNamespace(endpoint=Endpoint.CHAT, body=asked, route=SimpleNamespace(alias="a"),
                               target=SimpleNamespace(name="t"),
                               runtime=SimpleNamespace(policy=SimpleNamespace(labels=_LABELS)))
    streamed = Metrics()
    reader = StreamQuality(QualitySignals(streamed, 1 << 20), chat_asked(asked), True)

    def event(payload: bytes) -> Chunk:
        if typed:
            try:
                return Chunk(payload, None, msgspec.json.decode(payload, type=ChunkChoicesPeek).choices)
            except msgspec.ValidationError:  # odd types: as the provider hands them over, undecoded
                pass
        return Chunk(payload)

    async def stream() -> None:
        for payload in payloads:
            await reader.on_events(ctx, [event(payload)])
        await reader.on_end(ctx, StreamEnd("done"))

    asyncio.run(stream())
    whole = Answer()
    for payload in payloads:
        read_payload(whole, payload, True, "delta", 1 << 20)
    read = Metrics()
    QualitySignals(read, 1 << 20).count(ctx, whole, chat_asked(asked))
    assert _counts(streamed) == _counts(read)
    assert any(value for key, value in _counts(read).items() if "checked" in key)


def _ctx(asked: dict[str, Any]) -> Any:
    return SimpleNamespace(endpoint=Endpoint.CHAT, body=asked, route=SimpleNamespace(alias="a"),
                           target=SimpleNamespace(name="t"), status=200, quality_reader=None,
                           runtime=SimpleNamespace(policy=SimpleNamespace(labels=_LABELS)))


def _source() -> OpenAIStream:
    provider = SimpleNamespace(name="p", sanitize=str, release=lambda: None)
    return OpenAIStream(provider, None, 0.0, False, 1.0, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(_STREAMS))
@pytest.mark.parametrize("batches", ["one", "each", "replayed", "all replayed"])
def test_a_stream_read_by_the_providers_decode_counts_as_one_read_from_its_events(name: str, batches: str) -> None:
    """The quality signals' reader handed to the provider's stream (`ReplyStream.read_choices`: the common
    stream's `PlainStreamQuality`, else `StreamQuality`), which then decodes a chunk with its choices only while
    the reader wants its text or, for `StreamQuality`, when it carries more than text, counts what the reader of
    the events counts: chunks in one batch, one a batch, or some or all read before the reader came (a routed
    attempt's `Replay`). The common stream's reader skims: outside what such a request gets (`_OUTSIDE_PLAIN`),
    it counts what the reader of the first text's chunks and the last chunk counts."""
    asked, payloads = _STREAMS[name]
    ctx = _ctx(asked)
    source = _source()
    looked, fed = Metrics(), Metrics()
    looking = StreamQuality(QualitySignals(looked, 1 << 20), chat_asked(asked), True)
    stage = QualitySignals(fed, 1 << 20)
    held: list[Any] = []
    if batches.endswith("replayed"):  # the attempt's first batch, decoded before the reader came
        held = [source._events(payloads[:1] if batches == "replayed" else payloads)[0]]
        stream = ReplyStream(Replay(source, held, None, lambda: None), ctx)  # type: ignore[arg-type]
    else:
        stream = ReplyStream(source, ctx)
    stage.read_stream(ctx, Reply(stream=stream))
    if asked:  # a request that asks for JSON or offers tools: a stream stage
        (reader,) = stream._stages
        assert ctx.quality_reader is None and not reader.reads_events  # fed by the provider's stream: no events
    else:  # the common stream: no stage, ended by the telemetry stage
        reader = ctx.quality_reader
        assert isinstance(reader, PlainStreamQuality) and not stream._stages
    rest = payloads[len(held[0]):] if held else payloads
    for batch in [rest] if batches == "one" else [[payload] for payload in rest]:
        source._events(batch)
    events = _source()  # the same chunks as events with their typed choices, for the reader that looks at them
    read = _skimmed(payloads) if name in _OUTSIDE_PLAIN and not asked else payloads

    async def run() -> None:
        await looking.on_events(ctx, events._events(read)[0])
        await looking.on_end(ctx, StreamEnd("done"))
        reader.end(ctx, StreamEnd("done"))

    asyncio.run(run())
    assert _counts(fed) == _counts(looked)
    assert any(value for key, value in _counts(fed).items() if "checked" in key)


@pytest.mark.parametrize("batches", ["each", "all replayed"])
def test_the_common_streams_reader_takes_no_chunk_between_its_first_text_and_the_last(batches: str) -> None:
    """The common stream's reader skims: after the chunk whose text settled the checks, the provider's stream
    decodes no chunk's choices (as with no reader) and hands the reader none, until the last one's at the end;
    chunks read before the reader came carry typed choices only up to the first text."""
    payloads = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}),
                *[_chunk({"content": f" word{n}"}) for n in range(6)], _chunk({}, "length")]
    taken: list[Any] = []

    class Counting(PlainStreamQuality):
        def take(self, choices: Any) -> bool:
            taken.append(choices)
            return super().take(choices)

    ctx = _ctx({})
    source = _source()
    fed = Metrics()
    stage = QualitySignals(fed, 1 << 20)
    reader = Counting(stage)
    if batches == "each":
        assert source.read_choices(reader)
        for payload in payloads:
            source._events([payload])
    else:
        events, _ = source._events(payloads)
        assert [event.choices is not None for event in events] == [True, True] + [False] * 7
        assert Replay(source, [events], None, lambda: None).read_choices(reader)  # type: ignore[arg-type]
    assert source._peek is peek_chunk and len(taken) == 2  # the role's chunk and the first text's
    reader.end(ctx, StreamEnd("done"))
    assert len(taken) == 3 and taken[-1][0].finish_reason == "length"
    assert _counts(fed) == {
        "gateway_quality_checked_total[('model', 'a'), ('target', 't')]": 1,
        "gateway_quality_finish_reasons_total[('model', 'a'), ('reason', 'length'), ('target', 't')]": 1,
        "gateway_quality_signals_total[('model', 'a'), ('signal', 'truncated'), ('target', 't')]": 1}
