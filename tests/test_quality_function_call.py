"""Quality signals for an answer in the legacy OpenAI `function_call` form: a call, as a tool call is.

Such an answer (`message.function_call` {name, arguments}, content null, finish reason `function_call`; streamed as
`delta.function_call` pieces) was counted as `empty`: only `tool_calls` were read as calls. It is now read as one
call: not empty, and `malformed_tool_call` when the request offered no function, or when its arguments are not a JSON
object, name no offered function, or do not fit that function's `parameters` (`functions[]`, or `tools[]`).

A real gateway in front of the mock upstream (`fault-legacy-call`: a legacy call of `note`, whose arguments are
`{"text": <the prompt>}`) and of a scripted upstream (`bad-arguments`: a legacy call whose arguments are not JSON;
`text-then-call`: text first, then a legacy call, the stream the quality stage skims), reading `/metrics`.
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
NOTE = {"name": "note", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}


class _Scripted(ThreadedApp):
    """An OpenAI-compatible upstream answering with a legacy function call of `note`: `bad-arguments`, whose
    arguments are not JSON; `text-then-call`, after the text "Here is the note." (which settles the text checks at
    once), with the arguments `{"text": "hi"}`. Streamed: a chunk per piece, then the finish (`function_call`)."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = "Here is the note." if body["model"] == "text-then-call" else None
        arguments = '{"text": "hi"}' if text else '{"text": hi'
        base = {"id": "chatcmpl-1", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": text, "function_call": {"name": "note", "arguments": arguments}}
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": message, "finish_reason": "function_call"}]})
        chunk = {**base, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return b"data: " + json.dumps({**chunk, "choices": [choice]}).encode() + b"\n\n"

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [event({"role": "assistant", "content": "" if text else None})]
        events += [event({"content": piece}) for piece in (text.split(" ") if text else ())]
        events.append(event({"function_call": {"name": "note", "arguments": ""}}))
        events += [event({"function_call": {"arguments": arguments[i:i + 4]}}) for i in range(0, len(arguments), 4)]
        events += [event({}, "function_call"), b"data: [DONE]\n\n"]
        for piece in events:
            await response.write(piece)
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    with _Scripted() as scripted:
        text = policy_text(upstream.base_url) + (
            "  fault-legacy-call: {provider: mock-fast, model: fault-legacy-call}\n"
            "  bad-arguments: {provider: scripted, model: bad-arguments}\n"
            "  text-then-call: {provider: scripted, model: text-then-call}\n"
            "telemetry:\n  quality: {enabled: true}\n")
        text = text.replace("providers:\n", "providers:\n  scripted:\n    kind: openai\n"
                            f"    base_url: http://127.0.0.1:{scripted.port}/v1\n"
                            "    api_key_env: MOCK_UPSTREAM_KEY\n", 1)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _counts(gw: RunningGateway, model: str) -> dict[str, float]:
    """`model`'s answers checked, its `function_call` finishes, and its signals by signal."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(gw.metrics()):
        for sample in family.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name == "gateway_quality_checked_total":
                counts["checked"] = counts.get("checked", 0) + sample.value
            elif sample.name == "gateway_quality_finish_reasons_total" and sample.labels["reason"] == "function_call":
                counts["finished"] = counts.get("finished", 0) + sample.value
            elif sample.name == "gateway_quality_signals_total":
                counts[sample.labels["signal"]] = counts.get(sample.labels["signal"], 0) + sample.value
    return counts


def _signals(gw: RunningGateway, model: str, stream: bool, **extra: Any) -> set[str]:
    """The signals counted for the one answer (checked once, finished by `function_call`) to a chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": "take a note"}], "stream": stream, **extra}
    before = _counts(gw, model)
    response = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    if stream:
        assert '"function_call"' in response.text  # (the stream went through whole)
    after = _counts(gw, model)
    assert after.get("checked", 0) == before.get("checked", 0) + 1
    assert after.get("finished", 0) == before.get("finished", 0) + 1
    return {name for name, value in after.items()
            if name not in ("checked", "finished") and value > before.get(name, 0)}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["fault-legacy-call", "text-then-call"])
def test_a_call_of_an_offered_function_is_no_signal(gw: RunningGateway, model: str, stream: bool) -> None:
    """Was `empty` (the call unread, the content null)."""
    assert _signals(gw, model, stream, functions=[NOTE]) == set()


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_an_offered_function_tool_is_no_signal(gw: RunningGateway, stream: bool) -> None:
    """The same function offered as a tool: its name and parameters are the same offer."""
    assert _signals(gw, "fault-legacy-call", stream, tools=[{"type": "function", "function": NOTE}]) == set()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["fault-legacy-call", "text-then-call"])
def test_a_call_when_no_function_was_offered_is_malformed(gw: RunningGateway, model: str, stream: bool) -> None:
    """As a tool call to a request that offered no tool (`text-then-call` streamed: skimmed, only its finish read)."""
    assert _signals(gw, model, stream) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
def test_arguments_that_are_not_json_are_malformed(gw: RunningGateway, stream: bool) -> None:
    assert _signals(gw, "bad-arguments", stream, functions=[NOTE]) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["fault-legacy-call", "text-then-call"])
def test_arguments_that_do_not_fit_the_parameters_are_malformed(gw: RunningGateway, model: str,
                                                                stream: bool) -> None:
    strict = {"name": "note", "parameters": {"type": "object", "required": ["title"]}}
    assert _signals(gw, model, stream, functions=[strict]) == {"malformed_tool_call"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_of_another_function_than_the_offered_ones_is_malformed(gw: RunningGateway, stream: bool) -> None:
    other = {"name": "other", "parameters": {"type": "object"}}
    assert _signals(gw, "fault-legacy-call", stream, functions=[other]) == {"malformed_tool_call"}
