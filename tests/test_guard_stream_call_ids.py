"""With output guards on a chat stream, parallel tool calls that come without a conformant `index` stay apart.

The stream guard holds each tool call's arguments in a lane keyed by the call's `index`. Older Ollama and Gemini's
OpenAI-compatible API send no `index` (each call whole, side by side in one chunk); Ollama 0.20 sends `index: 0` on
every call, each with its own id. Both calls' arguments went into one lane, released on one call: the first call got
`{"c": "Paris"}{"to": ...}`, the second `{}` (and through `/v1/messages`, a `tool_use` with `_raw_arguments`). Now a
call without an `index` is keyed (and numbered, on the wire) by its place in the chunk's `tool_calls`, and a piece
with another id than the call held at its index begins another call there, the earlier call's held arguments
released first. A conformant stream (ids on the first pieces only, arguments split, calls interleaved) as before.

A real gateway with `pii` and `secrets` output guards (redacting) in front of a scripted OpenAI-compatible upstream;
the clients are httpx (the chat wire, read as a client tells calls apart: by index, a new id beginning another call)
and the anthropic SDK (`/v1/messages`).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp
from tests.support.tool_call_pieces import piece

EMAIL = "jane.doe@mailbox.org"
WEATHER = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"c": "Paris"}'}}
MAIL = {"id": "call_b", "type": "function", "function": {"name": "send_mail", "arguments": json.dumps({"to": EMAIL})}}
EXPECTED = [("call_a", "get_weather", {"c": "Paris"}), ("call_b", "send_mail", {"to": "<EMAIL_ADDRESS>"})]
TOOLS: Any = [{"name": "get_weather", "input_schema": {"type": "object"}},
              {"name": "send_mail", "input_schema": {"type": "object"}}]


# The `delta.tool_calls` of each chunk, per upstream model.
SCRIPTS: dict[str, list[list[dict[str, Any]]]] = {
    "no-index": [[WEATHER, MAIL]],  # older Ollama, Gemini's OpenAI-compatible API
    "no-index-apart": [[WEATHER], [MAIL]],
    "index-zero": [[{**WEATHER, "index": 0}], [{**MAIL, "index": 0}]],  # Ollama 0.20
    "index-zero-together": [[{**WEATHER, "index": 0}, {**MAIL, "index": 0}]],
    "conformant": [
        [piece(0, "call_a", "get_weather", "")],
        [piece(0, None, None, '{"c": ')],
        [piece(1, "call_b", "send_mail", '{"to"')],
        [piece(0, None, None, '"Paris"}')],
        [piece(1, None, None, f': "{EMAIL[:7]}')],
        [piece(1, None, None, f'{EMAIL[7:]}"}}')],
    ],
    # Poolside's API, mlx-openai-server before its PR 216: a call's later pieces carry another id than its first,
    # without the name: one call still (split by id, the address's two halves were scanned apart and let through)
    "unstable-ids": [
        [piece(0, "call_a", "get_weather", "")],
        [{"index": 0, "id": "call_a2", "function": {"arguments": '{"c": "Paris"}'}}],
        [piece(1, "call_b", "send_mail", "")],
        [{"index": 1, "id": "call_b2", "function": {"arguments": f'{{"to": "{EMAIL[:7]}'}}],
        [{"index": 1, "id": "call_b3", "function": {"arguments": f'{EMAIL[7:]}"}}'}}],
    ],
}


class _Upstream(ThreadedApp):
    """An OpenAI-compatible upstream streaming two tool calls as its model's script says."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        deltas = [({"role": "assistant", "content": ""}, None),
                  *(({"tool_calls": calls}, None) for calls in SCRIPTS[body["model"]]), ({}, "tool_calls")]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in deltas:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
            await asyncio.sleep(0.002)
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
              wire: {{kind: openai, base_url: "http://127.0.0.1:{wire.port}/v1", api_key_env: UP_KEY,
                      timeouts: {{connect_s: 2, first_byte_s: 10, idle_s: 10, total_s: 30}}}}
            guards:
              global:
                pii: {{kind: pii, places: [output], action: redact, entities: {{EMAIL_ADDRESS: {{}}}}}}
                secrets: {{kind: secrets, places: [output], action: redact}}
            models:
            """) + models + "\n"
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _wire_calls(gw: RunningGateway, alias: str) -> tuple[list[tuple[Any, Any, Any]], str | None]:
    """The chat stream's tool calls as a client puts them together: each piece names its call by `index` (which
    must be there), a piece with another id and a name than the call at its index begins another call; and the
    finish."""
    calls: list[dict[str, Any]] = []
    at: dict[int, dict[str, Any]] = {}
    finish = None
    body = {"model": alias, "stream": True, "messages": [{"role": "user", "content": "weather, then mail"}],
            "tools": [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
                      for t in TOOLS]}
    with httpx.stream("POST", f"{gw.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:])["choices"]:
                finish = choice.get("finish_reason") or finish
                for piece in choice["delta"].get("tool_calls") or ():
                    assert type(piece.get("index")) is int, piece
                    held, named = at.get(piece["index"]), piece.get("id")
                    function = piece.get("function") or {}
                    if held is None or (named and held["id"] and named != held["id"] and function.get("name")):
                        held = at[piece["index"]] = {"id": named, "name": None, "arguments": ""}
                        calls.append(held)
                    held["id"] = held["id"] or named
                    held["name"] = held["name"] or function.get("name")
                    held["arguments"] += function.get("arguments") or ""
    return [(c["id"], c["name"], json.loads(c["arguments"] or "null")) for c in calls], finish


@pytest.mark.parametrize("alias", list(SCRIPTS))
def test_each_guarded_call_keeps_its_own_arguments(gw: RunningGateway, alias: str) -> None:
    calls, finish = _wire_calls(gw, alias)
    assert (calls, finish) == (EXPECTED, "tool_calls")


@pytest.mark.parametrize("alias", list(SCRIPTS))
def test_each_guarded_call_is_a_tool_use_block_of_its_own(gw: RunningGateway, alias: str) -> None:
    ask: Any = {"model": alias, "max_tokens": 100, "messages": [{"role": "user", "content": "weather, then mail"}],
                "tools": TOOLS}
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=30) as sdk, \
            sdk.messages.stream(**ask) as events:
        message = events.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"] == EXPECTED, message.content
    assert len(message.content) == 2
