"""`malformed_tool_call` for a call to a tool the request did not offer, when it offered none at all.

docs/metrics.md counts "a tool call [that names] a tool the request did not offer" as `malformed_tool_call`, but a call
in an answer to a request that offered no tools was never counted, streamed or not, on any API: the name check ran
only when some function tool was offered, and the common answer's fast paths (one choice, no `tools` asked) never
looked at tool calls (a skimmed stream reads only its last chunk: the calls after its first text passed unread). A
call to an offered tool of another type (a chat custom tool) was counted as malformed when a function tool was
offered too (its name, not in `function`, read as none).

A real gateway in front of the mock upstream (`fault-echo-tool`: one call of the function `echo`; `fault-custom-tool`:
one call of the custom tool `note`; `fault-legacy-call`: a legacy `function_call` of `note`) and of an upstream whose
streamed answer is text first, then a tool call (the stream the quality stage skims), reading `/metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"x": 1}'}}
GET = {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}
ECHO = {"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
NOTE = {"type": "custom", "custom": {"name": "note"}}


class _TextThenCall(ThreadedApp):
    """An OpenAI-compatible upstream whose answer is text ("Here ...", which settles the text checks at once), then
    one call of `get`: streamed, a chunk per word, the call's chunk, then the finish (`tool_calls`)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        base = {"id": "chatcmpl-1", "created": 1, "model": "m"}
        if not (await request.json()).get("stream"):
            message = {"role": "assistant", "content": "Here is the lookup.", "tool_calls": [CALL]}
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls"}]})
        chunk = {**base, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n"

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [event({"role": "assistant", "content": ""})]
        events += [event({"content": piece}) for piece in ("Here", " is", " the", " lookup.")]
        events += [event({"tool_calls": [{"index": 0, **CALL}]}), event({}, "tool_calls"), b"data: [DONE]\n\n"]
        for piece in events:
            await response.write(piece)
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    with _TextThenCall() as text_then_call:
        text = policy_text(upstream.base_url) + (
            "  fault-custom-tool: {provider: mock-fast, model: fault-custom-tool}\n"
            "  fault-legacy-call: {provider: mock-fast, model: fault-legacy-call}\n"
            "  text-then-call: {provider: scripted, model: m}\n"
            "telemetry:\n  quality: {enabled: true}\n")
        text = text.replace("providers:\n", "providers:\n  scripted:\n    kind: openai\n"
                            f"    base_url: http://127.0.0.1:{text_then_call.port}/v1\n"
                            "    api_key_env: MOCK_UPSTREAM_KEY\n", 1)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _counts(gw: RunningGateway, model: str) -> dict[str, float]:
    """`model`'s answers checked, and its signals by signal."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(gw.metrics()):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "gateway_quality_checked_total":
                counts["checked"] = counts.get("checked", 0) + sample.value
            elif sample.name == "gateway_quality_signals_total":
                counts[sample.labels["signal"]] = counts.get(sample.labels["signal"], 0) + sample.value
    return counts


def _signals(gw: RunningGateway, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> set[str]:
    """The signals counted for the one answer to `body` (which was checked: counted once)."""
    before = _counts(gw, body["model"])
    response = httpx.post(f"{gw.base_url}/{path}", json=body, headers={**AUTH, **(headers or {})}, timeout=30)
    assert response.status_code == 200, response.text
    after = _counts(gw, body["model"])
    assert after.get("checked", 0) == before.get("checked", 0) + 1
    return {name for name, value in after.items() if name != "checked" and value > before.get(name, 0)}


def _chat(model: str, stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "look it up"}], "stream": stream, **extra}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["fault-echo-tool", "text-then-call"])
def test_a_call_when_no_tool_was_offered_is_malformed(gw: RunningGateway, model: str, stream: bool) -> None:
    """The hunter's case (a call, no text) and a call after text (streamed: skimmed, only its finish read)."""
    assert _signals(gw, "chat/completions", _chat(model, stream)) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_when_no_tool_was_offered_is_malformed_on_responses(gw: RunningGateway, stream: bool) -> None:
    body = {"model": "fault-echo-tool", "input": "look it up", "stream": stream}
    assert _signals(gw, "responses", body) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("tools", "expected"), [(None, {"malformed_tool_call"}), ("echo", set())])
def test_a_call_when_no_tool_was_offered_is_malformed_on_messages(gw: RunningGateway, stream: bool,
                                                                  tools: str | None, expected: set[str]) -> None:
    """`/v1/messages`: translated to a chat request at ingress, read as one (an offered tool's call is fine)."""
    body: dict[str, Any] = {"model": "fault-echo-tool", "max_tokens": 50, "stream": stream,
                            "messages": [{"role": "user", "content": "look it up"}]}
    if tools:
        body["tools"] = [{"name": tools, "input_schema": ECHO["function"]["parameters"]}]
    assert _signals(gw, "messages", body, {"anthropic-version": "2023-06-01"}) == expected


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("model", "tools"), [
    ("fault-echo-tool", [ECHO]),  # a valid call of the offered function
    ("fault-echo-tool", [NOTE, ECHO]),
    ("text-then-call", [GET]),
    ("fault-custom-tool", [NOTE]),  # a call of the offered custom tool
    ("fault-custom-tool", [GET, NOTE]),  # (was malformed: its name, not in `function`, read as none)
])
def test_a_call_of_an_offered_tool_is_not_malformed(gw: RunningGateway, model: str, tools: list[Any],
                                                    stream: bool) -> None:
    assert _signals(gw, "chat/completions", _chat(model, stream, tools=tools)) == set()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_another_tool_than_the_offered_ones_is_malformed(gw: RunningGateway, stream: bool) -> None:
    assert _signals(gw, "chat/completions", _chat("fault-echo-tool", stream, tools=[NOTE])) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_legacy_function_call_is_not_malformed(gw: RunningGateway, stream: bool) -> None:
    """A legacy call of an offered function is read as a call (not `empty`): `test_quality_function_call`."""
    functions = [{"name": "note", "parameters": {"type": "object"}}]
    assert _signals(gw, "chat/completions", _chat("fault-legacy-call", stream, functions=functions)) == set()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_an_offered_responses_tool_is_not_malformed(gw: RunningGateway, stream: bool) -> None:
    tools = [{"type": "web_search"}, {"type": "function", "name": "echo", "parameters": ECHO["function"]["parameters"]}]
    body = {"model": "fault-echo-tool", "input": "look it up", "stream": stream, "tools": tools}
    assert _signals(gw, "responses", body) == set()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_under_a_stored_prompt_is_not_malformed(gw: RunningGateway, stream: bool) -> None:
    """A Responses request's stored `prompt` may offer tools the request does not show: its calls' names pass."""
    body = {"model": "fault-echo-tool", "input": "look it up", "stream": stream, "prompt": {"id": "pmpt_1"}}
    assert _signals(gw, "responses", body) == set()
