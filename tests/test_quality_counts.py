"""The quality signals' counts for a stream, as the stream reader makes them at its end (the common stream counted
by its finish reason alone: `StreamQuality.on_end`), against counting the answer read from every chunk."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from gateway.pipeline.streams import StreamEnd
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import Chunk
from gateway.schemas.openai import ChunkChoicesPeek
from gateway.telemetry.answers import Answer
from gateway.telemetry.labels import MetricLabels
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.quality import QualitySignals, chat_asked
from gateway.telemetry.quality_reading import StreamQuality, read_payload

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
}


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
        return Chunk(payload, None, msgspec.json.decode(payload, type=ChunkChoicesPeek).choices) if typed \
            else Chunk(payload)

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
