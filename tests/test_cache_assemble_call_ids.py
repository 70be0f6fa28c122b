"""A cached stream whose parallel tool calls came without a conformant `index` is served whole as those calls, or not.

A stored stream served to a non-streamed request is assembled into the complete answer, its tool calls joined by
`index`. Older Ollama and Gemini's OpenAI-compatible API send no `index` (each call whole, side by side in one chunk);
Ollama 0.20 sends `index: 0` on every call, each with its own id. Both were read as index 0 and joined: the hit was one
call, the second call's id over the first's, its name `get_weatherget_time` and its arguments both calls'. Now a call
without an `index` is at its place in the chunk's `tool_calls` (the calls, exactly), and another id at an index that
holds one is not joined: the hit is not made (a miss, the upstream's own complete answer). A conformant stream is served
as before.

A real gateway caching in memory, in front of a scripted OpenAI-compatible upstream; the client is httpx.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp
from tests.support.tool_call_pieces import piece

WEATHER = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"c": "Paris"}'}}
TIME = {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
         for name in ("get_weather", "get_time")]


# The `delta.tool_calls` of each chunk, per upstream model; and whether the stream is served to a complete request.
SCRIPTS: dict[str, tuple[list[list[dict[str, Any]]], bool]] = {
    "no-index": ([[WEATHER, TIME]], True),  # older Ollama, Gemini's OpenAI-compatible API: each call at its place
    "index-zero": ([[{**WEATHER, "index": 0}], [{**TIME, "index": 0}]], False),  # Ollama 0.20
    "index-zero-together": ([[{**WEATHER, "index": 0}, {**TIME, "index": 0}]], False),
    "no-index-apart": ([[WEATHER], [TIME]], False),
    "repeated-ids": ([[piece(0, "call_a", "get_weather", "")], [{"index": 0, "id": "call_a", "function": {
        "arguments": '{"c": "Paris"}'}}], [{**TIME, "index": 1}]], True),
    "conformant": ([
        [piece(0, "call_a", "get_weather", "")],
        [piece(0, None, None, '{"c": ')],
        [piece(1, "call_b", "get_time", '{"tz"')],
        [piece(0, None, None, '"Paris"}')],
        [piece(1, None, None, ': "CET"}')],
    ], True),
    # Poolside's API, mlx-openai-server before its PR 216: a call's later pieces carry another id, without the name:
    # one call, its first id kept
    "unstable-ids": ([
        [piece(0, "call_a", "get_weather", "")],
        [{"index": 0, "id": "call_a2", "function": {"arguments": '{"c": "Paris"}'}}],
        [piece(1, "call_b", "get_time", "")],
        [{"index": 1, "id": "call_b2", "function": {"arguments": '{"tz": "CET"}'}}],
    ], True),
}


class _Upstream(ThreadedApp):
    """An OpenAI-compatible upstream answering with two tool calls: streamed, as its model's script says; complete,
    as a `tool_calls` list."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [WEATHER, TIME]}
            return web.json_response({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]})
        deltas = [({"role": "assistant", "content": None}, None),
                  *(({"tool_calls": calls}, None) for calls in SCRIPTS[body["model"]][0]), ({}, "tool_calls")]
        chunks = [{**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]} for delta, finish in deltas]
        chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
            await asyncio.sleep(0.002)
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as wire:
        models = "\n".join(f"  {name}: {{provider: wire, model: {name}, cache: {{}}}}" for name in SCRIPTS)
        policy = textwrap.dedent(f"""\
            version: 1
            server: {{watch_policy: false}}
            auth: none
            providers:
              wire: {{kind: openai, base_url: "http://127.0.0.1:{wire.port}/v1", api_key_env: UP_KEY}}
            models:
            """) + models + "\n"
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _ask(gw: RunningGateway, alias: str, text: str, stream: bool) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": text}], "tools": TOOLS, "temperature": 0,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    response = httpx.post(f"{gw.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("alias", list(SCRIPTS))
def test_a_stored_streams_calls_are_served_whole_exactly_or_not_at_all(gw: RunningGateway, alias: str) -> None:
    text = f"weather and time? {uuid.uuid4().hex[:8]}"
    assert _ask(gw, alias, text, stream=True).headers.get("x-gateway-cache") == "miss"
    deadline = time.monotonic() + 10  # the entry is written after the answer: a streamed hit shows it stored
    while _ask(gw, alias, text, stream=True).headers.get("x-gateway-cache") != "hit":
        assert time.monotonic() < deadline, "the stream was never stored"
        time.sleep(0.1)
    served = _ask(gw, alias, text, stream=False)
    assert served.headers.get("x-gateway-cache") == ("hit" if SCRIPTS[alias][1] else "miss")
    (choice,) = served.json()["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [WEATHER, TIME]
