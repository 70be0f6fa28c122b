"""The provider conformance suite: every provider kind passes the same tests through a real gateway.

Each kind (`openai`, `azure`, `anthropic`, `gemini`) is backed by a mock server
speaking that API's wire format (tests/support/mock_*.py) and reached through
one gateway, by the official `openai` SDK. What the gateway sends upstream is
checked with the upstream's own SDK types (`anthropic`, `google-genai`), and
what comes back with `openai`'s. Plain chat, streams, tools (complete and
streamed), images, JSON mode, usage, each error class, timeouts, cancellation
on client disconnect, and bad streams are covered for every kind.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from google.genai import types as genai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import CACHE_READ, CACHE_WRITE, MockAnthropic
from tests.support.mock_gemini import CACHED, THOUGHTS, MockGemini
from tests.support.mock_upstream import MockUpstream, RecordedRequest

KINDS = ("openai", "azure", "anthropic", "gemini")
ANTHROPIC_KEY = "sk-ant-conformance"
GEMINI_KEY = "gemini-conformance-key"
PRICES = "{input_per_mtok: 100, cached_input_per_mtok: 10, output_per_mtok: 1000, reasoning_per_mtok: 2000}"
MODELS = ("mock-model", "fault-echo", "fault-echo-tool", "fault-status-400", "fault-status-429", "fault-status-500",
          "fault-status-401", "fault-slow-first-byte-3000", "fault-stall-after-3", "fault-slow-stream-100",
          "fault-malformed-json", "fault-context-length", "fault-status-529", "fault-out-of-order",
          "fault-content-filter", "fault-safety", "fault-prompt-blocked", "fault-error-first",
          "fault-overloaded-midstream", "fault-cached-reasoning")
IMAGE = ("data:image/png;base64,"
         "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "echo", "description": "Echo a text", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}]
_anthropic_request = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)


def validated(value: Any) -> Any:
    """Consume what pydantic validates lazily (the SDK's `Iterable` fields), so that every item is checked."""
    if isinstance(value, dict):
        return {k: validated(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return [validated(v) for v in value]


class Mocks:
    def __init__(self, openai_mock: MockUpstream, claude: MockAnthropic, gemini: MockGemini) -> None:
        self.by_kind = {"openai": openai_mock, "azure": openai_mock, "anthropic": claude, "gemini": gemini}

    def last(self, kind: str) -> RecordedRequest:
        return self.by_kind[kind].requests[-1]


def conformance_policy(mocks: Mocks) -> str:
    timeouts = "{connect_s: 1, first_byte_s: 1.5, idle_s: 1.5, total_s: 20}"
    openai_url = mocks.by_kind["openai"].base_url
    providers = textwrap.dedent(f"""\
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY, timeouts: {timeouts}}}
          azure:
            kind: azure
            base_url: {openai_url.removesuffix("/v1")}
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {timeouts}
            azure: {{api_version: "2024-10-21"}}
          azure-2024-06:
            kind: azure
            base_url: {openai_url.removesuffix("/v1")}
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {timeouts}
            azure: {{api_version: "2024-06-01"}}
          anthropic:
            kind: anthropic
            base_url: {mocks.by_kind["anthropic"].base_url}
            api_key_env: ANTHROPIC_KEY
            timeouts: {timeouts}
            anthropic: {{default_max_tokens: 321}}
          gemini: {{kind: gemini, base_url: {mocks.by_kind["gemini"].base_url}, api_key_env: GEMINI_KEY,
                    timeouts: {timeouts}}}
        """)
    models = "\n".join(f"  {kind}-{model}: {{provider: {kind}, model: {model}}}" for kind in KINDS for model in MODELS)
    models += ("\n  overloaded-then-openai:\n    targets: [{provider: anthropic, model: fault-error-first}, "
               "{provider: openai, model: mock-model}]"
               "\n  azure-old-version:\n    targets: [{provider: azure-2024-06, model: mock-model}]"
               "\n  gemini-listed-name:\n    targets: [{provider: gemini, model: models/mock-model}]"
               "\n  anthropic-first:\n    targets: [{provider: anthropic, model: mock-model}, "
               "{provider: openai, model: mock-model}]"
               "\n  failing-then-anthropic:\n    targets: [{provider: openai, model: fault-status-500}, "
               "{provider: anthropic, model: mock-model}]")
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{_hash(FULL_KEY)}"}}
        prices:
          fault-cached-reasoning: {PRICES}
        """) + providers + "models:\n" + models + "\n"


def _hash(key: str) -> str:
    from gateway.auth.keys import hash_key

    return hash_key(key)


@pytest.fixture(scope="module")
def mocks(upstream: MockUpstream) -> Iterator[Mocks]:
    with MockAnthropic(ANTHROPIC_KEY) as claude, MockGemini(GEMINI_KEY) as gemini:
        yield Mocks(upstream, claude, gemini)


@pytest.fixture(scope="module")
def gw(mocks: Mocks) -> Iterator[RunningGateway]:
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY, "GEMINI_KEY": GEMINI_KEY}
    running = RunningGateway(conformance_policy(mocks), env).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, mocks: Mocks) -> Iterator[openai.OpenAI]:
    for mock in {id(m): m for m in mocks.by_kind.values()}.values():
        mock.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def check_upstream(kind: str, record: RecordedRequest) -> dict[str, Any]:
    """What the gateway sent, validated with the upstream's own SDK types; returns the body."""
    body = record.json
    assert isinstance(body, dict)
    if kind == "anthropic":
        validated(_anthropic_request.validate_python({**body, "stream": False}))
        assert record.headers["x-api-key"] == ANTHROPIC_KEY and record.headers["anthropic-version"]
        assert "authorization" not in record.headers
    elif kind == "gemini":
        for content in body["contents"]:
            genai.Content.model_validate(content)
        for tool in body.get("tools") or ():
            genai.Tool.model_validate(tool)
        if "generationConfig" in body:
            genai.GenerationConfig.model_validate(body["generationConfig"])
        assert record.headers["x-goog-api-key"] == GEMINI_KEY
    elif kind == "azure":
        assert record.path.startswith("/openai/deployments/") and record.query["api-version"] == "2024-10-21"
        assert record.headers["api-key"] == UPSTREAM_KEY and "authorization" not in record.headers
    return body


def stream_chunks(client: openai.OpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    return list(client.chat.completions.create(stream=True, **kwargs))


# -- answers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_plain_chat(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    answer = client.chat.completions.create(model=f"{kind}-mock-model", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}], max_tokens=50)
    ChatCompletion.model_validate(answer.model_dump())
    assert answer.choices[0].message.content == MockUpstream(None).reply_text
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 20 and answer.usage.prompt_tokens > 0
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        assert body["system"] == "Be brief." and body["max_tokens"] == 50
    if kind == "gemini":
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert body["generationConfig"]["maxOutputTokens"] == 50


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_arrives_in_pieces_with_usage(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    chunks = stream_chunks(client, model=f"{kind}-mock-model", messages=[{"role": "user", "content": "hi"}],
                           stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MockUpstream(None).reply_text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 10  # not buffered into one
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    check_upstream(kind, mocks.last(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_stream_without_usage_request_shows_none(kind: str, client: openai.OpenAI) -> None:
    chunks = stream_chunks(client, model=f"{kind}-mock-model", messages=[{"role": "user", "content": "hi"}])
    assert all(c.usage is None for c in chunks)


@pytest.mark.parametrize("kind", KINDS)
def test_default_max_tokens_only_where_required(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    client.chat.completions.create(model=f"{kind}-mock-model", messages=[{"role": "user", "content": "hi"}])
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        assert body["max_tokens"] == 321  # the policy's default_max_tokens


# -- tools --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tool_call_and_result_round_trip(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    answer = client.chat.completions.create(model=f"{kind}-fault-echo-tool", tools=TOOLS, tool_choice="required",
                                            messages=[{"role": "user", "content": "ping pong"}])
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]  # asserted by the finish reason
    assert call.type == "function" and call.function.name == "echo"
    assert json.loads(call.function.arguments) == {"text": "ping pong"}
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        assert body["tools"][0]["name"] == "echo" and body["tool_choice"] == {"type": "any"}
    if kind == "gemini":
        assert body["tools"][0]["functionDeclarations"][0]["name"] == "echo"
        assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    follow = [{"role": "user", "content": "ping pong"}, choice.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": call.id, "content": '{"echoed": "ping pong"}'}]
    again = client.chat.completions.create(model=f"{kind}-mock-model", tools=TOOLS, messages=follow)
    assert again.choices[0].message.content
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        assert body["messages"][1]["content"][0]["type"] == "tool_use"
        assert body["messages"][2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id,
                                                     "content": '{"echoed": "ping pong"}'}
    if kind == "gemini":
        assert body["contents"][1]["parts"][0]["functionCall"] == {"name": "echo", "args": {"text": "ping pong"}}
        assert body["contents"][2]["parts"][0]["functionResponse"] == {"name": "echo",
                                                                       "response": {"echoed": "ping pong"}}


@pytest.mark.parametrize("kind", KINDS)
def test_tool_call_streamed(kind: str, client: openai.OpenAI) -> None:
    chunks = stream_chunks(client, model=f"{kind}-fault-echo-tool", tools=TOOLS,
                           messages=[{"role": "user", "content": "stream these words"}])
    names = [t.function.name for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()
             if t.function and t.function.name]
    arguments = "".join(t.function.arguments or "" for c in chunks if c.choices
                        for t in c.choices[0].delta.tool_calls or () if t.function)
    assert names == ["echo"]
    assert json.loads(arguments) == {"text": "stream these words"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


# -- images and JSON mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_image_parts_reach_the_upstream_in_its_format(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    client.chat.completions.create(model=f"{kind}-mock-model", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": IMAGE}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        blocks = body["messages"][0]["content"]
        assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                         "data": IMAGE.split(",", 1)[1]}}
        assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}
    elif kind == "gemini":
        parts = body["contents"][0]["parts"]
        assert parts[1] == {"inlineData": {"mimeType": "image/png", "data": IMAGE.split(",", 1)[1]}}
        assert parts[2] == {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/cat.png"}}
    else:
        assert body["messages"][0]["content"][1]["image_url"]["url"] == IMAGE


@pytest.mark.parametrize("kind", KINDS)
def test_json_mode(kind: str, client: openai.OpenAI, mocks: Mocks) -> None:
    client.chat.completions.create(model=f"{kind}-mock-model", response_format={"type": "json_object"},
                                   messages=[{"role": "user", "content": "Give me JSON"}])
    body = check_upstream(kind, mocks.last(kind))
    if kind == "anthropic":
        assert "JSON object" in body["system"]
    elif kind == "gemini":
        assert body["generationConfig"]["responseMimeType"] == "application/json"
    else:
        assert body["response_format"] == {"type": "json_object"}


# -- usage --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_usage_reports_cached_tokens(kind: str, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=f"{kind}-mock-model", messages=[{"role": "user", "content": "one two three"}])
    usage = json.loads(raw.text)["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if kind == "anthropic":  # prompt_tokens counts the cache reads and writes, as OpenAI's does
        assert usage["prompt_tokens_details"] == {"cached_tokens": CACHE_READ, "cache_write_tokens": CACHE_WRITE}
        assert usage["prompt_tokens"] == 3 + 3 + CACHE_READ + CACHE_WRITE
    if kind == "gemini":
        assert usage["prompt_tokens_details"]["cached_tokens"] == CACHED


@pytest.mark.parametrize("kind", ["openai", "gemini"])
def test_cached_and_thinking_tokens_are_billed_at_their_prices(kind: str, client: openai.OpenAI) -> None:
    """Gemini's `cachedContentTokenCount` and `thoughtsTokenCount` are priced apart, as OpenAI's details are (the
    bill read neither: cached input at the full price, thoughts at the output price)."""
    raw = client.chat.completions.with_raw_response.create(
        model=f"{kind}-fault-cached-reasoning", messages=[{"role": "user", "content": "one two three four"}])
    usage = json.loads(raw.text)["usage"]
    cached, thinking = usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens_details"][
        "reasoning_tokens"]
    if kind == "gemini":
        assert (cached, thinking) == (CACHED, THOUGHTS)
    assert cached and thinking
    expected = ((usage["prompt_tokens"] - cached) * 100 + cached * 10
                + (usage["completion_tokens"] - thinking) * 1000 + thinking * 2000) / 1e6
    assert float(raw.headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-6)


# -- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("fault", "error", "status"), [
    ("fault-status-400", openai.BadRequestError, 400),
    ("fault-status-429", openai.RateLimitError, 429),
    ("fault-status-500", openai.InternalServerError, 502),
    ("fault-status-401", openai.InternalServerError, 502),  # the gateway's credentials: never the client's 401
    ("fault-context-length", openai.BadRequestError, 400),
])
def test_each_error_class(kind: str, fault: str, error: type[openai.APIStatusError], status: int,
                          client: openai.OpenAI) -> None:
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=f"{kind}-{fault}", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    text = caught.value.response.text
    assert UPSTREAM_KEY not in text and ANTHROPIC_KEY not in text and "10.0.0.5" not in text
    if fault == "fault-context-length":
        assert caught.value.code == "context_length_exceeded"
    if fault == "fault-status-429":  # (Gemini's: from its body's RetryInfo, as it sends no Retry-After)
        assert caught.value.response.headers.get("retry-after") == "7"


def test_anthropic_overloaded_is_a_retryable_503(client: openai.OpenAI, mocks: Mocks) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="anthropic-fault-status-529", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 503 and caught.value.code == "upstream_overloaded"
    from gateway.errors import UpstreamOverloaded
    from gateway.routing.attempts import classify

    error = UpstreamOverloaded("x")
    error.upstream_status = 529
    assert classify(error) == "server_error"  # in the default retry_on: retried and fallen back on


@pytest.mark.parametrize("kind", ["openai", "azure"])
def test_an_upstream_400_keeps_its_code_and_param(kind: str, client: openai.OpenAI, gw: RunningGateway) -> None:
    """What an OpenAI-shaped upstream names in a refusal (`code`, `param`) reaches the SDK; its message is still
    scrubbed. The metrics label the error by its type: an upstream's own codes would be series without bound."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=f"{kind}-fault-status-400", messages=[{"role": "user", "content": "x"}])
    assert (caught.value.code, caught.value.param) == ("invalid_value", "temperature")
    assert "10.0.0.5" not in caught.value.response.text
    metrics = gw.metrics()
    assert f'gateway_errors_total{{code="invalid_request_error",model="{kind}-fault-status-400"}}' in metrics
    assert 'code="invalid_value"' not in metrics and 'error_type="invalid_value"' not in metrics


def test_targets_that_cannot_serve_an_endpoint_are_skipped(client: openai.OpenAI) -> None:
    """An alias of an Anthropic and an OpenAI target: `/v1/responses` and `/v1/embeddings` go to the OpenAI one
    whatever the order (the Anthropic one answered 400 first), and an OpenAI failure is the client's 502, not a
    fallback's 400 that the SDK never retries."""
    assert client.responses.create(model="anthropic-first", input="hi").output_text
    assert client.embeddings.create(model="anthropic-first", input="hi").data
    with pytest.raises(openai.InternalServerError) as caught:
        client.responses.create(model="failing-then-anthropic", input="hi")
    assert caught.value.status_code == 502
    chat = client.chat.completions.with_raw_response.create(
        model="failing-then-anthropic", messages=[{"role": "user", "content": "hi"}])
    assert chat.headers["x-gateway-target"] == "anthropic/mock-model"  # chat: both serve it, the fallback runs


def test_anthropic_error_event_before_content_falls_back(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="overloaded-then-openai", stream=True, messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-gateway-target"] == "openai/mock-model"
    assert raw.headers["x-gateway-fallback-reason"] == "server_error"
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MockUpstream(None).reply_text
    with pytest.raises(openai.APIError) as caught:  # one target, no retries: the error reaches the client's stream
        stream_chunks(client, model="anthropic-fault-error-first", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "upstream_overloaded"


def test_azure_content_filter_is_a_content_policy_violation(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="azure-fault-content-filter", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "content_policy_violation"


@pytest.mark.parametrize("stream", [False, True])
def test_a_gemini_tool_call_goes_back_with_its_thought_signature(client: openai.OpenAI, mocks: Mocks,
                                                                 stream: bool) -> None:
    """Gemini 3 refuses its own function call sent back without the `thoughtSignature` it came with: the gateway
    dropped it, so no tool conversation could go on. It rides on the tool call as Google's OpenAI-compatible API
    has it (`extra_content.google.thought_signature`), and goes back on the `functionCall` part."""
    from tests.support.mock_gemini import SIGNATURE

    asked = [{"role": "user", "content": "say hi"}]
    tools = [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}]
    if stream:
        with client.chat.completions.stream(model="gemini-fault-echo-tool", messages=asked, tools=tools) as events:
            message = events.get_final_completion().choices[0].message
    else:
        message = client.chat.completions.create(model="gemini-fault-echo-tool", messages=asked,
                                                 tools=tools).choices[0].message  # type: ignore[arg-type]
    call = message.tool_calls[0]  # type: ignore[index]
    assert (call.model_extra or {}).get("extra_content") == {"google": {"thought_signature": SIGNATURE}}
    history = [*asked, message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "hi"}]
    again = client.chat.completions.create(model="gemini-fault-echo-tool", messages=history,  # type: ignore[arg-type]
                                           tools=tools)  # type: ignore[arg-type]
    assert again.choices[0].message.tool_calls
    sent = [part for content in mocks.last("gemini").json["contents"] for part in content["parts"]
            if "functionCall" in part]
    assert sent == [{"functionCall": {"name": "echo", "args": json.loads(call.function.arguments)},
                     "thoughtSignature": SIGNATURE}]


def test_gemini_gets_tool_results_in_the_order_of_its_calls(client: openai.OpenAI, mocks: Mocks) -> None:
    """Two calls of one function, answered in the other order: Gemini matches results by name and place, so each
    got the other's result."""
    calls = [{"id": f"call_{n}", "type": "function", "function": {"name": "weather", "arguments": json.dumps(
        {"city": city})}} for n, city in enumerate(("Paris", "London"))]
    history = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 11}'},
               {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 24}'}]
    client.chat.completions.create(model="gemini-mock-model", messages=history)  # type: ignore[arg-type]
    results = mocks.last("gemini").json["contents"][-1]["parts"]
    assert [part["functionResponse"]["response"] for part in results] == [{"temp_c": 24}, {"temp_c": 11}]


def test_an_azure_api_version_before_2024_09_is_not_asked_for_stream_usage(client: openai.OpenAI, mocks: Mocks
                                                                         ) -> None:
    """Azure's API versions before 2024-09-01 refuse `stream_options` with a 400 the client never caused: the
    gateway does not add it there, and counts the stream's tokens itself."""
    stream = client.chat.completions.create(model="azure-old-version", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "stream_options" not in mocks.last("azure").json
    client.chat.completions.create(model="azure-mock-model", stream=True, messages=[{"role": "user", "content": "hi"}])
    assert mocks.last("azure").json["stream_options"] == {"include_usage": True}  # 2024-10-21: asked


def test_a_gemini_model_written_as_google_lists_it_is_found(client: openai.OpenAI, mocks: Mocks) -> None:
    """`models/gemini-...` (as Google lists its models) made `/models/models/...`, a 404."""
    assert client.chat.completions.create(model="gemini-listed-name", messages=[{"role": "user", "content": "hi"}])
    path = mocks.last("gemini").path
    assert path.endswith("/models/mock-model:generateContent") and "/models/models/" not in path


def test_gemini_small_points() -> None:
    """MAX_TOKENS with a function call is `length` (a truncated call); Google's 400 for a bad key is the gateway's
    credential (502), not the client's request."""
    from gateway.policy import compile_text as compile_policy
    from gateway.providers import build_provider
    from gateway.telemetry.tokens import TokenCounter
    from gateway.translate.chat_to_gemini import _finish

    assert _finish("MAX_TOKENS", True) == "length" and _finish("STOP", True) == "tool_calls"
    policy = compile_policy("version: 1\nauth: none\nproviders: {g: {kind: gemini, "
                            "base_url: 'https://generativelanguage.googleapis.com/v1beta', api_key_env: G}}\n"
                            "models: {m: {provider: g, model: gemini-x}}\n", "p.yaml", {"G": "AIzaSy-test-key-1"})
    gemini = build_provider(policy.providers["g"], TokenCounter())
    error = gemini._map_status(400, "API key not valid. Please pass a valid API key.", None, "INVALID_ARGUMENT",
                               "API key not valid. Please pass a valid API key.")
    assert error.status == 502 and "credentials" in error.message


def test_gemini_safety_stop_is_content_filter(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="gemini-fault-safety", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].finish_reason == "content_filter"
    chunks = stream_chunks(client, model="gemini-fault-safety", messages=[{"role": "user", "content": "x"}])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "content_filter"]


@pytest.mark.parametrize("stream", [False, True])
def test_gemini_blocked_prompt_is_a_content_policy_violation(stream: bool, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError) as caught:  # a 400, or the stream's error event (no fallback to try)
        list(client.chat.completions.create(model="gemini-fault-prompt-blocked", stream=True,
                                            messages=[{"role": "user", "content": "x"}]) if stream else [
            client.chat.completions.create(model="gemini-fault-prompt-blocked",
                                           messages=[{"role": "user", "content": "x"}])])
    assert caught.value.code == "content_policy_violation"
    assert stream or isinstance(caught.value, openai.BadRequestError)


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("anthropic", "n", 2), ("anthropic", "logprobs", True), ("anthropic", "seed", 7),
    ("anthropic", "frequency_penalty", 0.5), ("gemini", "logprobs", True), ("gemini", "logit_bias", {"1": 2}),
])
def test_unsupported_field_is_a_400_naming_it(kind: str, field: str, value: Any, client: openai.OpenAI,
                                              mocks: Mocks) -> None:
    before = len(mocks.by_kind[kind].requests)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=f"{kind}-mock-model", messages=[{"role": "user", "content": "x"}],
                                       extra_body={field: value})
    assert caught.value.param == field and f"`{field}`" in caught.value.message
    assert len(mocks.by_kind[kind].requests) == before  # refused before anything was sent


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
def test_unsupported_content_part_is_a_400(kind: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=f"{kind}-mock-model", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}])
    assert caught.value.param == "messages.0.content.0"


# -- timeouts, bad streams, cancellation --------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_first_byte_timeout_is_a_504(kind: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=f"{kind}-fault-slow-first-byte-3000",
                                       messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 504


@pytest.mark.parametrize("kind", KINDS)
def test_stalled_stream_ends_with_an_error_event(kind: str, client: openai.OpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model=f"{kind}-fault-stall-after-3", stream=True,
                                                    messages=[{"role": "user", "content": "x"}]):
            received.append(chunk)
    assert received and "timed out" in caught.value.message


@pytest.mark.parametrize(("kind", "fault"), [(k, "fault-malformed-json") for k in KINDS]
                         + [("anthropic", "fault-out-of-order"), ("gemini", "fault-out-of-order")])
def test_malformed_or_out_of_order_stream_ends_with_an_error_event(kind: str, fault: str,
                                                                   client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError) as caught:
        stream_chunks(client, model=f"{kind}-{fault}", messages=[{"role": "user", "content": "x"}])
    assert "upstream" in caught.value.message


@pytest.mark.parametrize("kind", KINDS)
def test_client_disconnect_cancels_the_upstream(kind: str, gw: RunningGateway, mocks: Mocks,
                                                client: openai.OpenAI) -> None:
    mock = mocks.by_kind[kind]
    body = {"model": f"{kind}-fault-slow-stream-100", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gw.base_url + "/chat/completions", json=body,
            headers={"Authorization": f"Bearer {FULL_KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    assert mock.wait_for_disconnect(5)


def test_anthropic_midstream_overload_reaches_the_client_as_an_error_event(client: openai.OpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="anthropic-fault-overloaded-midstream", stream=True,
                                                    messages=[{"role": "user", "content": "x"}]):
            received.append(chunk)
    assert received and "overloaded" in caught.value.message.lower()



def test_gemini_midstream_error_reaches_the_client_as_its_own_status_scrubbed(client: openai.OpenAI) -> None:
    """Google's `{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}` mid-stream is the client's 429 error
    event (not a generic upstream error), and its message is scrubbed like an error answer's."""
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="gemini-fault-overloaded-midstream", stream=True,
                                                    messages=[{"role": "user", "content": "x"}]):
            received.append(chunk)
    assert received and "quota exhausted" in caught.value.message.lower()
    assert "10.0.0.5" not in caught.value.message and "sk-upstream-test" not in caught.value.message
    body = caught.value.body if isinstance(caught.value.body, dict) else {}
    assert body.get("code") == "rate_limit_exceeded", body


# -- Anthropic's prompt caching and stop sequences -----------------------------------------------------

CC = {"type": "ephemeral"}


def test_litellm_style_cache_control_reaches_anthropic(client: openai.OpenAI, mocks: Mocks) -> None:
    """A Chat Completions client marks breakpoints as LiteLLM's clients do: on a content part, on a message, on a
    tool; an Anthropic target gets them on the matching blocks."""
    messages: Any = [
        {"role": "system", "content": [{"type": "text", "text": "Long instructions.", "cache_control": CC}]},
        {"role": "user", "content": "first question", "cache_control": CC},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image_url", "image_url": {
            "url": IMAGE}, "cache_control": CC}]}]
    tools: Any = [{**TOOLS[0], "cache_control": CC}]
    answer = client.chat.completions.create(model="anthropic-mock-model", messages=messages, tools=tools)
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == CACHE_READ
    body = check_upstream("anthropic", mocks.last("anthropic"))
    assert body["system"] == [{"type": "text", "text": "Long instructions.", "cache_control": CC}]
    assert body["tools"][0]["cache_control"] == CC
    assert body["messages"][0]["content"] == [{"type": "text", "text": "first question", "cache_control": CC}]
    assert body["messages"][1]["content"] == [{"type": "text", "text": "first answer"}]
    assert body["messages"][2]["content"][1]["cache_control"] == CC
    assert "cache_control" not in body["messages"][2]["content"][0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_messages_cache_control_reaches_only_anthropic(kind: str, stream: bool, gw: RunningGateway,
                                                       client: openai.OpenAI, mocks: Mocks) -> None:
    """`/v1/messages` breakpoints reach an Anthropic target; every other kind gets the request without them (an
    OpenAI-compatible API may refuse an unknown field; Gemini's translator refuses an unknown request field)."""
    body = {"model": f"{kind}-mock-model", "max_tokens": 20, "stream": stream,
            "system": [{"type": "text", "text": "Long instructions.", "cache_control": CC}],
            "tools": [{"name": "echo", "input_schema": {"type": "object"}, "cache_control": CC}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": CC}]}]}
    answer = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY}, json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    record = mocks.last(kind)
    sent = check_upstream(kind, record)
    if kind == "anthropic":
        assert sent["system"] == body["system"] and sent["tools"][0]["cache_control"] == CC
        assert sent["messages"][0]["content"] == body["messages"][0]["content"]
    else:
        assert b"cache_control" not in record.body, record.body


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_stop_sequence_is_named_in_the_choice(stream: bool, client: openai.OpenAI) -> None:
    """Chat Completions has no field for it: the choice's `stop_reason` names it, as vLLM's answers do."""
    kwargs: Any = {"model": "anthropic-mock-model", "stop": ["END", " mock"],
                   "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        chunks = stream_chunks(client, **kwargs)
        last = next(c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        last = client.chat.completions.create(**kwargs).choices[0]  # type: ignore[assignment]
        text = last.message.content  # type: ignore[attr-defined]
    assert last.finish_reason == "stop" and last.model_extra == {"stop_reason": " mock"}
    assert text == "Hello from the"


# -- the mocks themselves speak the real formats ------------------------------------------------------


def _sse_data(text: str) -> list[Any]:
    return [json.loads(line[5:]) for line in text.replace("\r\n", "\n").split("\n") if line.startswith("data:")]


@pytest.mark.parametrize("model", ["mock-model", "fault-echo-tool"])
def test_the_anthropic_mock_answers_in_the_sdks_types(model: str, mocks: Mocks) -> None:
    from anthropic.types import Message, RawMessageStreamEvent

    url = mocks.by_kind["anthropic"].base_url + "/messages"
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": "a b"}]}
    Message.model_validate(httpx.post(url, json=body, headers=headers).json())
    streamed = httpx.post(url, json={**body, "stream": True}, headers=headers).text
    events = [pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(e) for e in _sse_data(streamed)
              if e["type"] != "ping"]
    assert events[0].type == "message_start" and events[-1].type == "message_stop"


@pytest.mark.parametrize("model", ["mock-model", "fault-echo-tool", "fault-safety"])
def test_the_gemini_mock_answers_in_the_sdks_types(model: str, mocks: Mocks) -> None:
    base = mocks.by_kind["gemini"].base_url + f"/models/{model}"
    headers = {"x-goog-api-key": GEMINI_KEY}
    body = {"contents": [{"role": "user", "parts": [{"text": "a b"}]}]}
    answer = genai.GenerateContentResponse.model_validate(
        httpx.post(base + ":generateContent", json=body, headers=headers).json())
    assert answer.candidates and answer.usage_metadata is not None
    streamed = httpx.post(base + ":streamGenerateContent", params={"alt": "sse"}, json=body, headers=headers).text
    parts = [genai.GenerateContentResponse.model_validate(e) for e in _sse_data(streamed)]
    assert parts[-1].candidates and parts[-1].candidates[0].finish_reason is not None


# -- Anthropic's extended thinking ---------------------------------------------------------------------

THINK = {"type": "enabled", "budget_tokens": 1024}


def signed_thought(text: str) -> dict[str, Any]:
    from tests.support.mock_anthropic import thinking_signature

    return {"type": "thinking", "thinking": text, "signature": thinking_signature(text)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
def test_messages_thinking_reaches_only_anthropic(kind: str, stream: bool, gw: RunningGateway,
                                                  client: openai.OpenAI, mocks: Mocks) -> None:
    """A `/v1/messages` history's thinking goes back to an Anthropic target, signed, before the tool call; every
    other kind gets the turn without it (neither its text nor its signature)."""
    thought = signed_thought("A private chain of thought.")
    body: dict[str, Any] = {
        "model": f"{kind}-mock-model", "max_tokens": 2048, "stream": stream,
        "tools": [{"name": "echo", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": [thought, {"type": "tool_use", "id": "toolu_1", "name": "echo",
                                                                 "input": {"text": "hi"}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": "hi"}]}]}
    if kind == "anthropic":
        body["thinking"] = THINK
    answer = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY}, json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    record = mocks.last(kind)
    sent = check_upstream(kind, record)
    if kind == "anthropic":
        assert sent["messages"][1]["content"][0] == thought
    else:
        for private in (b"reasoning", b"signature", b"chain of thought", b"_gateway"):
            assert private not in record.body, record.body


@pytest.mark.parametrize("stream", [False, True])
def test_chat_client_of_anthropic_gets_the_thinking_and_sends_it_back(stream: bool, client: openai.OpenAI,
                                                                       mocks: Mocks) -> None:
    """A Chat Completions client passing `thinking` gets `reasoning_content` (and the blocks' signatures in
    `reasoning_blocks`); sending both back with the tool call's result continues the conversation."""
    kwargs: Any = {"model": "anthropic-fault-echo-tool", "max_tokens": 2048, "tools": TOOLS,
                   "messages": [{"role": "user", "content": "ping"}], "extra_body": {"thinking": THINK}}
    if stream:
        chunks = stream_chunks(client, **kwargs)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
        blocks = [entry for d in deltas for entry in (d.model_extra or {}).get("reasoning_blocks") or ()]
        calls = [call for d in deltas for call in d.tool_calls or ()]
        call = {"id": calls[0].id, "type": "function",
                "function": {"name": "echo", "arguments": "".join(c.function.arguments or "" for c in calls
                                                                  if c.function)}}
        assert len([d for d in deltas if (d.model_extra or {}).get("reasoning_content")]) > 1  # as it comes
    else:
        message = client.chat.completions.create(**kwargs).choices[0].message
        reasoning, blocks = (message.model_extra or {})["reasoning_content"], message.model_extra["reasoning_blocks"]
        assert message.tool_calls is not None
        call = message.tool_calls[0].model_dump()
    assert reasoning == "The user asks: ping. I should answer briefly."
    # (a streamed entry has its place in the list as `index`, which a client joins the entries by; it goes back
    # with it, as the `openai` SDK's stream helper leaves it)
    assert blocks == [{**({"index": 0} if stream else {}), "type": "thinking",
                       "signature": signed_thought(reasoning)["signature"], "length": len(reasoning)}]
    check_upstream("anthropic", mocks.last("anthropic"))
    follow = client.chat.completions.create(
        model="anthropic-mock-model", max_tokens=2048, tools=TOOLS, extra_body={"thinking": THINK}, messages=[
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": None, "tool_calls": [call],  # type: ignore[misc]
             "reasoning_content": reasoning, "reasoning_blocks": blocks},
            {"role": "tool", "tool_call_id": call["id"], "content": "done"}])
    assert follow.choices[0].message.content
    sent = check_upstream("anthropic", mocks.last("anthropic"))
    assert sent["messages"][1]["content"][0] == signed_thought(reasoning)


@pytest.mark.parametrize("model", ["mock-model", "fault-echo-tool"])
def test_the_anthropic_mock_thinks_in_the_sdks_types(model: str, mocks: Mocks) -> None:
    from anthropic.types import Message, RawMessageStreamEvent

    from tests.support.mock_anthropic import REDACTED_TRIGGER

    url = mocks.by_kind["anthropic"].base_url + "/messages"
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    body = {"model": model, "max_tokens": 2048, "thinking": THINK,
            "messages": [{"role": "user", "content": f"think twice {REDACTED_TRIGGER}"}]}
    answer = Message.model_validate(httpx.post(url, json=body, headers=headers).json())
    assert [block.type for block in answer.content][:3] == ["thinking", "redacted_thinking", "thinking"]
    streamed = httpx.post(url, json={**body, "stream": True}, headers=headers).text
    events = [pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(e) for e in _sse_data(streamed)
              if e["type"] != "ping"]
    kinds = [getattr(getattr(e, "delta", None), "type", None) for e in events]
    assert "thinking_delta" in kinds and kinds.count("signature_delta") == 2
    refused = httpx.post(url, headers=headers, json={**body, "messages": [
        *body["messages"], {"role": "assistant", "content": [{**answer.content[0].model_dump(), "thinking": "x"}]},
        {"role": "user", "content": "go on"}]})
    assert refused.status_code == 400 and "signature" in refused.text
