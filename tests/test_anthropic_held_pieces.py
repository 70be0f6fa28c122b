"""What `/v1/messages` holds after a tool call is bounded in memory, not only in characters, however small the pieces.

In front of a chat upstream, `/v1/messages` holds every block from the first tool call on, to write it whole at the
end (`anthropic_answer.MessagesStream`), up to `HELD_CHARS` (64 MiB) in all. Each piece held (of text, thinking or a
call's arguments) counted its characters alone, yet costs a Python string (49 bytes beyond its characters for ASCII,
74 and more else) and a list slot (8): a stream of one- or two-character pieces held about 30 times the memory it
counted, 64 Mi of them several GiB. Now each piece also counts `_PIECE_CHARS` (64), about what it costs beyond its
characters: what is held stays within about its count in bytes (per character, the 1 to 4 bytes a string takes).

The unit tests feed a `MessagesStream` chunks and weigh what it holds (`sys.getsizeof` of its lists and strings)
against what it counted; the end-to-end ones run a real gateway (in this process, `HELD_CHARS` made 1 MiB) in front of
a small upstream that streams one call's arguments in many one-character pieces.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.errors import UpstreamError
from gateway.schemas.events import Chunk
from gateway.translate import anthropic_answer
from gateway.translate.anthropic_answer import MessagesStream
from gateway.translate.thinking import REASONING
from gateway.translate.thinking_stream import HeldThinking
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

FIRST_CALL = {"tool_calls": [{"index": 0, "id": "t0", "type": "function",
                              "function": {"name": "f", "arguments": "{}"}}]}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _delta(kind: str, piece: str) -> dict[str, Any]:
    """A piece after the first call: text, thinking, or a second call's arguments."""
    if kind == "text":
        return {"content": piece}
    if kind == "thinking":
        return {REASONING: piece}
    return {"tool_calls": [{"index": 1, "function": {"arguments": piece}}]}


def _held_bytes(stream: MessagesStream) -> int:
    """The memory of the pieces a stream holds: each list and each string in it (as if none were shared, as the
    strings a decoded upstream chunk gives are not)."""
    total = 0
    for block in stream._held:
        pieces = block if isinstance(block, list) else block.texts if isinstance(block, HeldThinking) \
            else block.arguments
        total += sys.getsizeof(pieces) + sum(sys.getsizeof(piece) for piece in pieces)
    return total


def _fed(kind: str, pieces: list[str]) -> MessagesStream:
    stream = MessagesStream("alias")
    stream.frame([Chunk.of(_chunk(FIRST_CALL))])
    if kind == "arguments":
        stream.frame([Chunk.of(_chunk({"tool_calls": [{"index": 1, "id": "t1", "type": "function",
                                                       "function": {"name": "g", "arguments": ""}}]}))])
    for piece in pieces:
        stream.frame([Chunk.of(_chunk(_delta(kind, piece)))])
    return stream


@pytest.mark.parametrize("kind", ["text", "thinking", "arguments"])
@pytest.mark.parametrize("pieces", [
    [f"{n % 100:02d}" for n in range(20_000)],  # two ASCII characters each
    ["中文"] * 20_000,  # two characters of two bytes each
    ["😀"] * 20_000,  # one character of four bytes
], ids=["ascii", "cjk", "emoji"])
def test_what_is_held_weighs_about_what_it_counts(kind: str, pieces: list[str]) -> None:
    """20,000 tiny pieces after the first call: their memory within twice their count (it was about 30 times)."""
    stream = _fed(kind, pieces)
    counted = stream._held_chars
    assert counted >= sum(map(len, pieces))
    assert _held_bytes(stream) <= 2 * counted, (_held_bytes(stream), counted)


@pytest.mark.parametrize("kind", ["text", "thinking", "arguments"])
def test_tiny_pieces_end_the_stream_at_the_cap(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """`HELD_CHARS` made 64 KiB: one-character pieces end the stream after about 1,000 of them (64 KiB of memory),
    not 65,536 (about 64 times the memory the cap stands for)."""
    monkeypatch.setattr(anthropic_answer, "HELD_CHARS", 64 * 1024)
    stream = _fed(kind, [])
    fed = 0
    with pytest.raises(UpstreamError, match="after its first tool call"):
        while fed < 70_000:
            stream.frame([Chunk.of(_chunk(_delta(kind, "x")))])
            fed += 1
    assert fed < 64 * 1024 // 64, fed
    assert _held_bytes(stream) <= 2 * 64 * 1024


# -- through a real gateway


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class _Upstream(ThreadedApp):
    """`pieces-N`: a call of `f` whose arguments, `{"a": "x...x"}`, come with N one-character pieces of `x`, all in
    one chunk (each an entry of its `tool_calls`, as a chunk may carry several pieces of a call), then the usage."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        count = int((await request.json())["model"].split("-")[1])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse(_chunk({"role": "assistant", "content": None})))
        await response.write(_sse(_chunk({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                                          "function": {"name": "f", "arguments": '{"a": "'}}]})))
        await response.write(_sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": "x"}}] * count})))
        await response.write(_sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"}'}}]})))
        await response.write(_sse(_chunk({}, "tool_calls")))
        await response.write(_sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                                   "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9,
                                                            "total_tokens": 14}}))
        await response.write(b"data: [DONE]\n\n")
        return response


MODELS = ("pieces-10000", "pieces-20000")


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        policy = textwrap.dedent(f"""\
            version: 1
            server: {{watch_policy: false}}
            auth: none
            providers:
              wire: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY}}
            models:
            """) + "".join(f"  {name}: {{provider: wire, model: {name}}}\n" for name in MODELS)
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _messages_events(gw: RunningGateway, model: str) -> list[tuple[str, dict[str, Any]]]:
    body = {"model": model, "stream": True, "max_tokens": 100, "messages": [{"role": "user", "content": "call"}],
            "tools": [{"name": "f", "input_schema": {"type": "object"}}]}
    events: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    with httpx.stream("POST", f"{gw.url}/v1/messages", json=body, timeout=60,
                      headers={"anthropic-version": "2023-06-01"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_many_tiny_pieces_past_the_cap_end_the_stream(gw: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 one-character pieces (20,000 characters, 1.3 MiB counted with their cost): past a 1 MiB cap, the
    stream ends with Anthropic's `error` event, no held block written. It was written whole (its 20 KB of
    characters alone were counted)."""
    monkeypatch.setattr(anthropic_answer, "HELD_CHARS", 1024 * 1024)
    events = _messages_events(gw, "pieces-20000")
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error", kinds[-3:]
    assert "message_stop" not in kinds and "content_block_start" not in kinds
    assert events[-1][1]["error"]["type"] == "api_error" and "1 MiB" in events[-1][1]["error"]["message"]


def test_tiny_pieces_within_the_cap_are_written_whole(gw: RunningGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(anthropic_answer, "HELD_CHARS", 1024 * 1024)
    events = _messages_events(gw, "pieces-10000")
    assert [kind for kind, _ in events][-1] == "message_stop"
    [start] = [data["content_block"] for kind, data in events if kind == "content_block_start"]
    [delta] = [data["delta"] for kind, data in events if kind == "content_block_delta"]
    assert start["type"] == "tool_use" and start["name"] == "f"
    assert json.loads(delta["partial_json"]) == {"a": "x" * 10_000}
