"""Every tool call of an OpenAI-compatible answer reaches a `/v1/messages` client as a `tool_use` block.

The translation read only `tool_calls[].function`: a legacy `function_call` (complete, or streamed as
`delta.function_call` pieces) was lost, the client getting `stop_reason: "tool_use"` and no `tool_use` block; a custom
tool call (`{"type": "custom", "custom": {"name", "input"}}`) came as a `tool_use` with `name: None` and `input: {}`.
A call with no id got `id: None`, which the gateway's own ingress refuses when the client sends it back; a call with no
name cannot be carried at all: the answer is the upstream's error (502, or the stream's `error` event), never a
`tool_use` without a name. A streamed call whose `arguments` came as a JSON object (not a string) lost them.

A real gateway in front of the OpenAI mock (`fault-legacy-call`, `fault-custom-tool`), reached by the official
`anthropic` SDK, streamed or not; the framing's edge cases as unit tests of `translate.anthropic_answer`.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from aiohttp import web

from gateway.errors import UpstreamError
from gateway.schemas.events import Chunk, StreamDone
from gateway.translate.anthropic_answer import MessagesStream, messages_response
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

PROMPT = "remember the word banana"
TOOLS: Any = [{"name": "note", "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}]
ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")  # Messages' tool_use id alphabet
# What each alias's call carries: a legacy call's JSON arguments; a custom call's text input under `input`.
# (`object`: JSON arguments sent as an object, not a string, as some servers do; streamed, they were dropped.)
EXPECTED = {"legacy": {"text": PROMPT}, "custom": {"input": PROMPT}, "object": {"text": PROMPT}}


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          legacy: {{provider: mock, model: fault-legacy-call}}
          custom: {{provider: mock, model: fault-custom-tool}}
          object: {{provider: mock, model: fault-object-arguments}}
          chat: {{provider: mock, model: mock-model}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _ask(gw: RunningGateway, stream: bool, **ask: Any) -> anthropic.types.Message:
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=30) as sdk:
        if stream:
            with sdk.messages.stream(**ask) as events:
                return events.get_final_message()
        message: anthropic.types.Message = sdk.messages.create(**ask)
        return message


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
@pytest.mark.parametrize("alias", ["legacy", "custom", "object"])
def test_the_call_reaches_the_client_whole(gw: RunningGateway, alias: str, stream: bool) -> None:
    message = _ask(gw, stream, model=alias, max_tokens=100, messages=[{"role": "user", "content": PROMPT}],
                   tools=TOOLS)
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["tool_use"]
    use = message.content[0]
    assert use.type == "tool_use"
    assert use.name == "note" and use.input == EXPECTED[alias]
    assert isinstance(use.id, str) and ANTHROPIC_ID.fullmatch(use.id)


@pytest.mark.parametrize("alias", ["legacy", "custom"])
def test_the_client_sends_the_call_back_and_its_result(gw: RunningGateway, upstream: MockUpstream,
                                                       alias: str) -> None:
    """The block is one the ingress takes back: the next turn reaches the upstream with the call and its result
    under the same id (a made id for the legacy call, which has none)."""
    first = _ask(gw, False, model=alias, max_tokens=100, messages=[{"role": "user", "content": PROMPT}],
                 tools=TOOLS)
    use = first.content[0]
    assert use.type == "tool_use"
    history: Any = [{"role": "user", "content": PROMPT},
                    {"role": "assistant", "content": [use.model_dump(exclude_none=True)]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "ok"}]}]
    upstream.clear()
    second = _ask(gw, False, model="chat", max_tokens=100, messages=history, tools=TOOLS)
    assert second.stop_reason == "end_turn"
    sent = upstream.requests[-1].json
    assert sent is not None
    call = sent["messages"][1]["tool_calls"][0]
    assert call["id"] == use.id == sent["messages"][2]["tool_call_id"]
    assert call["function"]["name"] == "note" and json.loads(call["function"]["arguments"]) == EXPECTED[alias]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> Chunk:
    return Chunk.of({"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def _events(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(frame.split("\n")[1].removeprefix("data: ")) for frame in out.decode().split("\n\n") if frame]


def _answer(message: dict[str, Any], finish: str = "tool_calls") -> bytes:
    return json.dumps({"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": finish,
                                                        "message": {"role": "assistant", **message}}]}).encode()


def test_a_call_without_an_id_gets_one() -> None:
    """Complete and streamed: an id in Messages' alphabet, which the client can send back (the ingress requires it);
    two calls get two ids."""
    calls = [{"type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"type": "function", "function": {"name": "g", "arguments": "{}"}}]
    content = json.loads(messages_response(_answer({"tool_calls": calls}), "a"))["content"]
    streamed = _events(MessagesStream("a").frame([
        _chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]}),
        _chunk({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "{}"}}]}),
        _chunk({}, "tool_calls"), StreamDone()]))
    starts = [e["content_block"] for e in streamed if e["type"] == "content_block_start"]
    for blocks in (content, starts):
        ids = [block["id"] for block in blocks]
        assert [block["name"] for block in blocks] == ["f", "g"]
        assert all(isinstance(i, str) and ANTHROPIC_ID.fullmatch(i) for i in ids) and len(set(ids)) == 2


@pytest.mark.parametrize("call", [
    {"id": "c", "type": "function", "function": {"arguments": "{}"}},
    {"id": "c", "type": "custom", "custom": {"input": "x"}},
    {"id": "c"},
], ids=["function", "custom", "neither"])
def test_a_call_without_a_name_is_the_upstreams_error(call: dict[str, Any]) -> None:
    """Complete: an `UpstreamError` (a 502); streamed: an error at the end, which `api.proxy` sends as the stream's
    `error` event, and no `tool_use` block."""
    with pytest.raises(UpstreamError, match="name"):
        messages_response(_answer({"tool_calls": [call]}), "a")
    framer = MessagesStream("a")
    framer.frame([_chunk({"tool_calls": [{"index": 0, **call}]}), _chunk({}, "tool_calls")])
    with pytest.raises(UpstreamError, match="name"):
        framer.frame([StreamDone()])


def test_a_streamed_custom_call_and_a_legacy_call_beside_text() -> None:
    """Text before the call goes as it comes; the custom call's input pieces are joined; a legacy call after a
    tool call is a block of its own."""
    out = _events(MessagesStream("a").frame([
        _chunk({"content": "Sure."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_c", "type": "custom", "custom": {"name": "n", "input": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "custom": {"input": "a b"}}]}),
        _chunk({"tool_calls": [{"index": 0, "custom": {"input": " c"}}]}),
        _chunk({"function_call": {"name": "f", "arguments": '{"k":'}}),
        _chunk({"function_call": {"arguments": " 1}"}}),
        _chunk({}, "tool_calls"), StreamDone()]))
    starts = [e["content_block"] for e in out if e["type"] == "content_block_start"]
    deltas = [e["delta"] for e in out if e["type"] == "content_block_delta"]
    assert [(s["type"], s.get("name")) for s in starts] == [("text", None), ("tool_use", "n"), ("tool_use", "f")]
    assert starts[1]["id"] == "call_c" and ANTHROPIC_ID.fullmatch(starts[2]["id"])
    assert [json.loads(d["partial_json"]) for d in deltas[1:]] == [{"input": "a b c"}, {"k": 1}]


NAMELESS = {"index": 0, "id": "call_1", "type": "function", "function": {"arguments": "{}"}}


class _NamelessUpstream(ThreadedApp):
    """An OpenAI-compatible upstream whose answer is "Hello" and a tool call without a name (streamed: a chunk
    each)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        base = {"id": "chatcmpl-1", "created": 1, "model": "m"}
        if not (await request.json()).get("stream"):
            message = {"role": "assistant", "content": "Hello", "tool_calls": [NAMELESS]}
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls"}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta, finish in (({"content": "Hello"}, None), ({"tool_calls": [NAMELESS]}, None), ({}, "tool_calls")):
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(b"data: %s\n\n" % json.dumps(chunk).encode())
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def nameless_gw() -> Iterator[RunningGateway]:
    with _NamelessUpstream() as wire:
        policy = textwrap.dedent(f"""\
            version: 1
            server: {{watch_policy: false}}
            auth: none
            providers:
              wire: {{kind: openai, base_url: "http://127.0.0.1:{wire.port}/v1", api_key_env: UP_KEY}}
            models:
              nameless: {{provider: wire, model: m}}
            """)
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_a_nameless_call_reaches_the_client_as_the_upstreams_error(nameless_gw: RunningGateway,
                                                                   stream: bool) -> None:
    """Complete: a 502 `api_error`; streamed: the stream's `error` event (in a 200 stream) where the answer would
    end. No `tool_use` block the client would run, or send back to the ingress's 400."""
    ask: Any = {"model": "nameless", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    with anthropic.Anthropic(base_url=nameless_gw.url, api_key="unused", max_retries=0, timeout=30) as sdk:
        with pytest.raises(anthropic.APIStatusError) as caught:
            if stream:
                with sdk.messages.stream(**ask) as events:
                    events.get_final_message()
            else:
                sdk.messages.create(**ask)
    error: Any = caught.value.body
    assert error["error"]["type"] == "api_error", error
    assert "malformed" in error["error"]["message"] and "name" in error["error"]["message"]
    assert caught.value.status_code == (200 if stream else 502)
