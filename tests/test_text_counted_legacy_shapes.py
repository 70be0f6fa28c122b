"""An answer counted from its text counts a legacy function call, a custom tool's input and content sent as parts.

A provider's answers are counted from their text when it reports no usage (`stream_usage: false`, as a vLLM server
is configured; a complete answer without `usage`). That count read a chat message's `content` only as a string and
its tool calls' `function.arguments` only: a legacy `function_call`'s arguments, a custom tool call's
`custom.input` (each streamed a piece a chunk, or whole), tool arguments sent as a JSON object, and `content` sent as
a list of parts (as the guards read them all: `guards.texts.answer_refs`) were left out, so such an answer was
billed 0 completion tokens, or a stream billed its chunk count.

Through a real gateway (a scripted OpenAI-compatible server that reports no usage, shaped as the mock upstream's
`fault-legacy-call`, `fault-custom-tool`, `fault-object-arguments` and `fault-content-parts`; the openai SDK as the
client; a budget on the key so that the bill is read back from `/admin/usage` and the access log), each such answer
is billed the tokens of the text the gateway counts (`TokenCounter.count`); and an answer whose upstream reports its
usage is billed exactly that usage, as before.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.telemetry.tokens import TokenCounter
from gateway.telemetry.usage import answer_text
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

KEY = "gw-text-counted-legacy-key-000000000000000"
ADMIN = "admin-text-counted-legacy"
PRICE = "{input_per_mtok: 0, output_per_mtok: 1000}"  # $0.001 a completion token, the prompt free
TOKEN_USD = 0.001

ARGUMENT_PIECES = ['{"city": ', '"Paris", ', '"unit": ', '"celsius", ', '"days": 3}']
ARGUMENTS = "".join(ARGUMENT_PIECES)
INPUT_PIECES = ["print(", "'hello ", "world", " from a ", "custom tool')"]
TOOL_INPUT = "".join(INPUT_PIECES)
OBJECT_ARGUMENTS = {"city": "Paris", "unit": "celsius"}
TEXT_PIECES = ["Hello there, ", "it is good ", "to hear ", "from you!"]
REFUSAL = "I cannot share that."
THINKING = "The user greets me; I greet back."


def _deltas(model: str) -> list[dict[str, Any]]:
    """The deltas of the scripted server's stream for `model`, after its role chunk."""
    if model == "legacy-call":  # as `fault-legacy-call`: the name first, then the arguments a piece a chunk
        return ([{"function_call": {"name": "weather", "arguments": ""}}]
                + [{"function_call": {"arguments": piece}} for piece in ARGUMENT_PIECES])
    if model == "custom-tool":  # as `fault-custom-tool`
        first = {"index": 0, "id": "call_1", "type": "custom", "custom": {"name": "run", "input": ""}}
        return ([{"tool_calls": [first]}]
                + [{"tool_calls": [{"index": 0, "custom": {"input": piece}}]} for piece in INPUT_PIECES])
    if model == "object-arguments":  # as `fault-object-arguments`: the whole call in one delta
        return [{"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                 "function": {"name": "weather", "arguments": OBJECT_ARGUMENTS}}]}]
    if model == "content-parts":  # as `fault-content-parts`
        return [{"content": [{"type": "text", "text": piece}]} for piece in TEXT_PIECES]
    raise AssertionError(model)


def _message(model: str) -> dict[str, Any]:
    """The scripted server's complete answer's message for `model`."""
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    if model == "legacy-call":
        message["function_call"] = {"name": "weather", "arguments": ARGUMENTS}
    elif model == "custom-tool":
        message["tool_calls"] = [{"id": "call_1", "type": "custom", "custom": {"name": "run", "input": TOOL_INPUT}}]
    elif model == "object-arguments":
        message["tool_calls"] = [{"id": "call_1", "type": "function",
                                  "function": {"name": "weather", "arguments": OBJECT_ARGUMENTS}}]
    elif model == "content-parts":
        message["content"] = [{"type": "text", "text": piece} for piece in TEXT_PIECES]
    elif model == "mixed-parts":  # Mistral's thinking part, a refusal part, an image (no text)
        message["content"] = [{"type": "thinking", "thinking": [{"type": "text", "text": THINKING}]},
                              {"type": "text", "text": "".join(TEXT_PIECES)},
                              {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                              {"type": "refusal", "refusal": REFUSAL}]
    else:
        raise AssertionError(model)
    return message


class QuietServer(ThreadedApp):
    """An OpenAI-compatible server that reports no usage: the chat answers above, whole or streamed."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        base = {"id": "chatcmpl-quiet", "created": 1, "model": model}
        finish = {"legacy-call": "function_call", "custom-tool": "tool_calls",
                  "object-arguments": "tool_calls"}.get(model, "stop")
        if not body.get("stream"):
            return web.json_response({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": _message(model), "finish_reason": finish}]})
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(request)

        async def send(delta: dict[str, Any], reason: str | None = None) -> None:
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            await answer.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": None})
        for delta in _deltas(model):
            await send(delta)
        await send({}, finish)
        await answer.write(b"data: [DONE]\n\n")
        await answer.write_eof()
        return answer


@pytest.fixture(scope="module")
def tokens() -> TokenCounter:
    """The gateway's counter, as it counts an answer's text (its default encoding)."""
    counter = TokenCounter()
    assert counter.load(), "the tiktoken encoding must be in TIKTOKEN_CACHE_DIR for exact counts"
    return counter


MODELS = ("legacy-call", "custom-tool", "object-arguments", "content-parts", "mixed-parts")


def _policy(mock: MockUpstream, quiet: QuietServer) -> str:
    aliases = [f"  {model}: {{targets: [{{provider: quiet, model: {model}, price: {PRICE}}}]}}\n"
               f"  {model}-whole: {{targets: [{{provider: quiet, model: {model}, price: {PRICE}}}]}}"
               for model in MODELS]
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 1000}}}}
        accounting: {{default_max_tokens: 2}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          quiet: {{kind: openai, base_url: http://127.0.0.1:{quiet.port}/v1, api_key_env: MOCK_UPSTREAM_KEY,
                   stream_usage: false}}
          reporting: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          reported-legacy: {{targets: [{{provider: reporting, model: fault-legacy-call, price: {PRICE}}}]}}
          reported-custom: {{targets: [{{provider: reporting, model: fault-custom-tool, price: {PRICE}}}]}}
          reported-parts: {{targets: [{{provider: reporting, model: fault-content-parts, price: {PRICE}}}]}}
          reported-parts-stream: {{targets: [{{provider: reporting, model: fault-content-parts, price: {PRICE}}}]}}
        {{models}}
        """).replace("{models}", "\n".join(aliases))


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock, QuietServer() as quiet:
        running = RunningGateway(_policy(mock, quiet),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def _streamed(gw: RunningGateway, alias: str) -> list[dict[str, Any]]:
    """The deltas a client got of a chat stream (as sent: a value of any type), which must finish."""
    stream = _client(gw).chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}],
                                                 stream=True)
    with stream:
        return [choice.delta.model_dump(exclude_none=True, warnings=False)
                for chunk in stream for choice in chunk.choices]


def _whole(gw: RunningGateway, alias: str) -> dict[str, Any]:
    """The message of a complete chat answer, as sent."""
    answer = _client(gw).chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.model_dump(exclude_none=True, warnings=False)


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    return usage_row(gw.url, ADMIN, alias)


def _billed(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, estimated: bool = True) -> int:
    """The completion tokens the alias's one request was billed, the access log's figure the same."""
    row = _row(gw, alias)
    completion = int(row["completion_tokens"])
    assert row["cost_usd"] == pytest.approx(completion * TOKEN_USD, abs=2e-6), row
    line = access_line(caplog, alias)
    assert (line["completion_tokens"], line["tokens_estimated"]) == (completion, estimated), line
    return completion


@pytest.fixture(autouse=True)
def _access_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")


# -- streamed ---------------------------------------------------------------------------------------------------


def test_a_streamed_legacy_function_call_is_billed_its_arguments(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    deltas = _streamed(gw, "legacy-call")
    assert "".join(d.get("function_call", {}).get("arguments", "") for d in deltas) == ARGUMENTS  # as sent
    expected = tokens.count(ARGUMENTS)
    assert expected > 0
    assert _billed(gw, caplog, "legacy-call") == expected  # was the stream's length


def test_a_streamed_custom_tool_call_is_billed_its_input(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    deltas = _streamed(gw, "custom-tool")
    sent = [call for d in deltas for call in d.get("tool_calls", [])]
    assert "".join(call["custom"]["input"] for call in sent) == TOOL_INPUT  # (the SDK keeps `custom` as extra)
    expected = tokens.count(TOOL_INPUT)
    assert expected > len(INPUT_PIECES) + 2  # more than the stream's length would bill
    assert _billed(gw, caplog, "custom-tool") == expected


def test_streamed_tool_arguments_sent_as_an_object_are_billed_their_json(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    deltas = _streamed(gw, "object-arguments")
    assert [call["function"]["arguments"] for d in deltas for call in d.get("tool_calls", [])] == [OBJECT_ARGUMENTS]
    expected = tokens.count(json.dumps(OBJECT_ARGUMENTS, separators=(",", ":")))
    assert expected > 3  # more than the stream's length would bill
    assert _billed(gw, caplog, "object-arguments") == expected


def test_streamed_content_parts_are_billed_their_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter,
) -> None:
    deltas = _streamed(gw, "content-parts")
    assert [d["content"] for d in deltas if isinstance(d.get("content"), list)] == [
        [{"type": "text", "text": piece}] for piece in TEXT_PIECES]  # passed on as sent
    expected = tokens.count("".join(TEXT_PIECES))
    assert expected > len(TEXT_PIECES) + 2  # more than the stream's length would bill
    assert _billed(gw, caplog, "content-parts") == expected


# -- complete ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "text"), [
    ("legacy-call", ARGUMENTS),
    ("custom-tool", TOOL_INPUT),
    ("object-arguments", json.dumps(OBJECT_ARGUMENTS, separators=(",", ":"))),
    ("content-parts", "".join(TEXT_PIECES)),
    ("mixed-parts", THINKING + "".join(TEXT_PIECES) + REFUSAL),
])
def test_a_complete_answer_of_each_shape_is_billed_its_text(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, tokens: TokenCounter, model: str, text: str,
) -> None:
    alias = f"{model}-whole"
    message = _whole(gw, alias)
    assert message.get("content") or message.get("function_call") or message.get("tool_calls"), message
    expected = tokens.count(text)
    assert expected > 0
    assert _billed(gw, caplog, alias) == expected  # was 0


# -- the usual path -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("alias", "stream"), [
    ("reported-legacy", False), ("reported-custom", False), ("reported-parts", False), ("reported-parts-stream", True)])
def test_an_answer_whose_upstream_reports_usage_is_billed_that_usage(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, stream: bool,
) -> None:
    """The mock's usage: a completion token per echoed word, and one more for a call's answer."""
    words = "please note this down"
    messages = [{"role": "user", "content": words}]
    client = _client(gw)
    if stream:
        chunks = client.chat.completions.create(model=alias, messages=messages,  # type: ignore[arg-type]
                                                stream=True, stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens > 0
        reported = usage[0].completion_tokens
    else:
        answer = client.chat.completions.create(model=alias, messages=messages)  # type: ignore[arg-type]
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        reported = answer.usage.completion_tokens
    assert _billed(gw, caplog, alias, estimated=False) == reported


@pytest.mark.parametrize(("message", "text"), [
    ({"function_call": {"name": "f", "arguments": "x"}, "content": None}, "x"),
    ({"tool_calls": [{"index": 0, "type": "custom", "custom": {"name": "f", "input": "x"}}]}, "x"),
    ({"tool_calls": [{"index": 0, "function": {"arguments": ["x", 1]}}]}, '["x",1]'),
    ({"content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "y"}}]}, "x"),
    ({"content": [{"type": "thinking", "thinking": "x"}, {"type": "text", "text": "y"}]}, "xy"),
    ({"content": [{"type": "refusal", "refusal": "x"}]}, "x"),
    ({"reasoning_content": "r", "content": [{"type": "text", "text": "x"}], "function_call": {"arguments": "{}"}},
     "rx{}"),
])
def test_each_rare_shape_of_a_message_is_read(message: dict[str, Any], text: str) -> None:
    """The pure reader, each shape alone (a streamed delta's reads the same), in the order a model writes it."""
    body = {"choices": [{"index": 0, "message": message}]}
    assert answer_text(json.dumps(body).encode()) == text


@pytest.mark.parametrize("message", [
    {"function_call": "x"}, {"function_call": {"arguments": 7}}, {"tool_calls": [{"custom": "x"}]},
    {"tool_calls": [{"custom": {"input": 7}}]}, {"content": [7, None, {"type": "text", "text": 7}]},
    {"content": [{"type": "thinking", "thinking": 7}]}, {"content": {"type": "text", "text": "x"}},
])
def test_a_shape_of_the_wrong_type_holds_no_text(message: dict[str, Any]) -> None:
    body = {"choices": [{"index": 0, "message": message}]}
    assert answer_text(json.dumps(body).encode()) == ""
