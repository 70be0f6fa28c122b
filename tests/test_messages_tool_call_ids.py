"""Parallel tool calls streamed without a conformant `index` reach a `/v1/messages` client as one `tool_use` each.

A chat stream tells its tool calls apart by `index`, which OpenAI gives every piece. Older Ollama and Gemini's
OpenAI-compatible API send no `index` (each call whole, side by side in one chunk); Ollama 0.20 sends `index: 0` on
every call, each whole, in a chunk of its own, with its own id. The Messages translation read a missing index as 0
and ignored a later piece's id: the client got one `tool_use`, the first call's id and name, its input
`{"_raw_arguments": "{...}{...}"}`, and the second call was lost. Now a missing index is the call's place in the
chunk's `tool_calls`, and a piece with another id than the call held at its index begins another call.

A real gateway in front of an OpenAI-compatible upstream that streams scripted chunks, reached by the `anthropic`
SDK; the conformant stream (ids on the first pieces only, arguments split, calls interleaved) as before.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp
from tests.support.tool_call_pieces import piece

WEATHER = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"c": "Paris"}'}}
TIME = {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}
EXPECTED = [("call_a", "get_weather", {"c": "Paris"}), ("call_b", "get_time", {"tz": "CET"})]
TOOLS: Any = [{"name": "get_weather", "input_schema": {"type": "object"}},
              {"name": "get_time", "input_schema": {"type": "object"}}]


# The `delta.tool_calls` of each chunk, per upstream model.
SCRIPTS: dict[str, list[list[dict[str, Any]]]] = {
    "no-index": [[WEATHER, TIME]],  # older Ollama, Gemini's OpenAI-compatible API
    "index-zero": [[{**WEATHER, "index": 0}], [{**TIME, "index": 0}]],  # Ollama 0.20
    "conformant": [
        [piece(0, "call_a", "get_weather", "")],
        [piece(0, None, None, '{"c": ')],
        [piece(1, "call_b", "get_time", '{"tz"')],
        [piece(0, None, None, '"Paris"}')],
        [piece(1, None, None, ': "CET"}')],
    ],
    # Poolside's API, mlx-openai-server before its PR 216: a call's later pieces carry another id than its first,
    # without the name: they go on the call (as before the rule above; split, a block had no name: an error)
    "unstable-ids": [
        [piece(0, "call_a", "get_weather", "")],
        [{"index": 0, "id": "call_a2", "function": {"arguments": '{"c": '}}],
        [{"index": 0, "id": "call_a3", "function": {"arguments": '"Paris"}'}}],
        [piece(1, "call_b", "get_time", "")],
        [{"index": 1, "id": "call_b2", "function": {"arguments": '{"tz": "CET"}'}}],
    ],
}


class _Upstream(ThreadedApp):
    """An OpenAI-compatible upstream answering with two tool calls: streamed, as its model's script says;
    complete, as a `tool_calls` list."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "tool_calls": [WEATHER, TIME]}
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls"}]})
        deltas = [({"role": "assistant", "content": ""}, None),
                  *(({"tool_calls": calls}, None) for calls in SCRIPTS[body["model"]]), ({}, "tool_calls")]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in deltas:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as wire:
        models = "\n".join(f"  {name}: {{provider: wire, model: {name}}}" for name in SCRIPTS)
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


def _ask(gw: RunningGateway, alias: str, stream: bool) -> anthropic.types.Message:
    ask: Any = {"model": alias, "max_tokens": 100, "messages": [{"role": "user", "content": "weather and time?"}],
                "tools": TOOLS}
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=30) as sdk:
        if stream:
            with sdk.messages.stream(**ask) as events:
                return events.get_final_message()
        message: anthropic.types.Message = sdk.messages.create(**ask)
        return message


@pytest.mark.parametrize("alias", list(SCRIPTS))
def test_each_streamed_call_is_a_tool_use_block_of_its_own(gw: RunningGateway, alias: str) -> None:
    message = _ask(gw, alias, stream=True)
    assert message.stop_reason == "tool_use"
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == EXPECTED, message.content
    assert len(message.content) == 2


def test_a_complete_answers_calls_are_kept(gw: RunningGateway) -> None:
    """Not streamed, the calls come as an explicit list: each is a block (as before)."""
    message = _ask(gw, "no-index", stream=False)
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == EXPECTED, message.content
