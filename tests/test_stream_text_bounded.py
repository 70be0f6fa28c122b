"""A stream's answer text, collected for its count when its provider reports no usage, is kept up to `KEEP_CHARS`:
the rest is counted by its length, at the rate of the text kept. Held whole, it grew with the stream (tool call
arguments included: 400 MB of them took the gateway to 827 MB) and took tiktoken seconds to count at the end.

Pure logic (`StreamText`, `ResponsesText` fed the events a stream carries); the billing through a real gateway of
answers counted from their text is `tests/test_text_counted_reasoning_and_refusals.py`'s."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from gateway.schemas.events import Chunk
from gateway.telemetry.tokens import TokenCounter
from gateway.telemetry.usage import KEEP_CHARS, ResponsesText, StreamText

PIECE = "the quick brown fox jumps over the lazy dog, and then it rests a while. " * 14  # ~1 KB a chunk


def _counter() -> TokenCounter:
    counter = TokenCounter()
    assert counter.load([]) and counter.exact  # tiktoken's encoding (`TIKTOKEN_CACHE_DIR`), not an estimate
    return counter


def _feed(collected: StreamText, datas: list[dict[str, Any]]) -> SimpleNamespace:
    ctx = SimpleNamespace(chunks=len(datas))
    for start in range(0, len(datas), 64):  # events come in batches, as a stream's reads give them
        asyncio.run(collected.on_events(ctx, [Chunk.of(data) for data in datas[start:start + 64]]))  # type: ignore[arg-type]
    return ctx


def _chat(text: str, tool: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = ({"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if tool
                             else {"content": text})
    return {"choices": [{"index": 0, "delta": delta}]}


def test_a_long_chat_stream_keeps_its_text_bounded_and_is_counted_about_right() -> None:
    pieces = 3 * KEEP_CHARS // len(PIECE)  # about 3 MiB of text
    collected = StreamText()
    ctx = _feed(collected, [_chat(PIECE) for _ in range(pieces)])
    kept = collected.text()
    assert KEEP_CHARS < len(kept) <= KEEP_CHARS + len(PIECE)  # the cap, and the chunk that crossed it
    counter = _counter()
    whole = counter.count(PIECE * pieces)
    billed = collected.tokens(ctx, counter.count(kept))  # type: ignore[arg-type]
    assert abs(billed - whole) <= whole * 0.01, (billed, whole)


def test_tool_call_arguments_are_bounded_too() -> None:
    collected = StreamText()
    ctx = _feed(collected, [_chat(PIECE, tool=True) for _ in range(3 * KEEP_CHARS // len(PIECE))])
    assert len(collected.text()) <= KEEP_CHARS + len(PIECE)
    assert collected.tokens(ctx, 1000) > 2_900  # (the rate of the text kept, over three times as much text)


def test_a_short_stream_is_kept_whole_and_counted_as_before() -> None:
    collected = StreamText()
    ctx = _feed(collected, [_chat("Hello "), _chat("there.")])
    assert collected.text() == "Hello there."
    assert collected.tokens(ctx, 3) == 3  # type: ignore[arg-type]


def test_a_long_responses_stream_keeps_its_deltas_bounded() -> None:
    pieces = 3 * KEEP_CHARS // len(PIECE)
    collected = ResponsesText()
    datas = [{"type": "response.output_text.delta", "delta": PIECE} for _ in range(pieces)]
    datas.append({"type": "response.output_audio.delta", "delta": "AAAA"})  # a data delta: a token, as before
    ctx = _feed(collected, datas)
    kept = collected.text()
    assert KEEP_CHARS < len(kept) <= KEEP_CHARS + len(PIECE)
    counter = _counter()
    whole = counter.count(PIECE * pieces) + 1
    billed = collected.tokens(ctx, counter.count(kept))  # type: ignore[arg-type]
    assert abs(billed - whole) <= whole * 0.01, (billed, whole)
