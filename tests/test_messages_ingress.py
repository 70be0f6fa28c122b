"""The Anthropic SDK against `/v1/messages` and `count_tokens`; the OpenAI SDK against `/v1/responses`.

`/v1/messages` is routed by the same policy as Chat Completions: to an
OpenAI-compatible upstream (translated both ways) and to an Anthropic upstream
(translated to chat and back). Keys come as `x-api-key`; errors come in
Anthropic's envelope so the SDK raises its own exception classes. Guards apply to
both new ingresses.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, LIMITED_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import CACHE_READ, CACHE_WRITE, MockAnthropic
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-ingress"
REPLY = MockUpstream(None).reply_text
TOOL = {"name": "echo", "description": "Echo a text",
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}


def ingress_policy(openai_url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: limited, tenant: acme, hash: "{hash_key(LIMITED_KEY)}", models: [gpt]}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY,
                   timeouts: {{connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 20}}}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          gpt: {{provider: openai, model: mock-model}}
          gpt-echo: {{provider: openai, model: fault-echo}}
          gpt-tool: {{provider: openai, model: fault-echo-tool}}
          gpt-500: {{provider: openai, model: fault-status-500}}
          gpt-stall: {{provider: openai, model: fault-stall-after-3}}
          claude: {{provider: claude, model: claude-mock}}
          claude-tool: {{provider: claude, model: fault-echo-tool}}
          claude-529: {{provider: claude, model: fault-status-529}}
          guarded: {{provider: openai, model: mock-model}}
        guards:
          models:
            guarded:
              deny: {{kind: denylist, terms: [project falcon], places: [input]}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: MockAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(ingress_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def sdk(gw: RunningGateway, claude_mock: MockAnthropic) -> Iterator[anthropic.Anthropic]:
    claude_mock.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


def ask(sdk: anthropic.Anthropic, model: str, text: str = "Say hello", **kwargs: Any) -> Message:
    return sdk.messages.create(model=model, max_tokens=100, messages=[{"role": "user", "content": text}], **kwargs)


# -- /v1/messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias", ["gpt", "claude"])
def test_plain_message(alias: str, sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    message = ask(sdk, alias, system="Be brief.")
    Message.model_validate(message.model_dump())
    assert message.type == "message" and message.role == "assistant" and message.model == alias
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 20 and message.usage.input_tokens > 0
    if alias == "gpt":
        sent = upstream.requests[-1].json
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."} and sent["max_tokens"] == 100


def test_cache_tokens_survive_the_round_trip(sdk: anthropic.Anthropic) -> None:
    usage = ask(sdk, "claude").usage
    assert usage.cache_read_input_tokens == CACHE_READ and usage.cache_creation_input_tokens == CACHE_WRITE


@pytest.mark.parametrize("alias", ["gpt", "claude"])
def test_streamed_message(alias: str, sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(model=alias, max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 10 and "".join(pieces) == REPLY
    assert final.content[0].type == "text" and final.content[0].text == REPLY
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 20


def test_stream_event_sequence_is_anthropics(gw: RunningGateway) -> None:
    body = {"model": "gpt", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": FULL_KEY}, timeout=10)
    names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "content_block_delta"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert [d["type"] for d in data] == names


@pytest.mark.parametrize("alias", ["gpt-tool", "claude-tool"])
def test_tools(alias: str, sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    message = ask(sdk, alias, "ping pong", tools=[TOOL], tool_choice={"type": "any"})
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "echo" and block.input == {"text": "ping pong"}
    with sdk.messages.stream(model=alias, max_tokens=50, tools=[TOOL],  # type: ignore[list-item]
                             messages=[{"role": "user", "content": "stream it"}]) as stream:
        final = stream.get_final_message()
    streamed = final.content[0]
    assert streamed.type == "tool_use" and streamed.input == {"text": "stream it"}
    follow = sdk.messages.create(model="gpt" if alias == "gpt-tool" else "claude", max_tokens=50,
                                 tools=[TOOL],  # type: ignore[list-item]
                                 messages=[{"role": "user", "content": "ping pong"},
                                           {"role": "assistant", "content": [block.model_dump()]},
                                           {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                                                         "content": "done"}]}])
    assert follow.content[0].type == "text"
    if alias == "gpt-tool":
        sent = upstream.requests[-1].json
        assert sent["messages"][1]["tool_calls"][0]["function"]["name"] == "echo"
        assert sent["messages"][2] == {"role": "tool", "tool_call_id": block.id, "content": "done"}
        assert sent["tool_choice"] if "tool_choice" in sent else True


def test_image_reaches_an_openai_upstream_as_a_data_url(sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    sdk.messages.create(model="gpt", max_tokens=10, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "What is it?"}]}])
    part = upstream.requests[-1].json["messages"][0]["content"][0]
    assert part == {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_bad_key_is_an_authentication_error(gw: RunningGateway) -> None:
    with anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            ask(client, "gpt")
    assert caught.value.status_code == 401
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


def test_unknown_or_forbidden_model_is_not_found(gw: RunningGateway) -> None:
    with anthropic.Anthropic(base_url=gw.url, api_key=LIMITED_KEY, max_retries=0) as client:
        with pytest.raises(anthropic.NotFoundError):
            ask(client, "claude")
        assert ask(client, "gpt").content


@pytest.mark.parametrize(("alias", "status"), [("gpt-500", 502), ("claude-529", 503)])
def test_upstream_failure_is_an_api_status_error(alias: str, status: int, sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk, alias)
    assert caught.value.status_code == status
    assert UPSTREAM_KEY not in caught.value.response.text and "10.0.0.5" not in caught.value.response.text


def test_stream_failure_ends_with_an_error_event(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk.messages.stream(model="gpt-stall", max_tokens=10,
                                 messages=[{"role": "user", "content": "x"}]) as stream:
            for _ in stream:
                pass
    assert "timed out" in str(caught.value)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "gpt", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "gpt", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
     "messages.0.content.0"),
    ({"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "bogus": 1}, "bogus"),
])
def test_invalid_shape_gets_anthropics_envelope(body: dict[str, Any], param: str, gw: RunningGateway) -> None:
    response = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": FULL_KEY}, timeout=10)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert param in error["error"]["message"]


def test_invalid_shape_raises_the_sdks_bad_request_error(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.create(model="gpt", max_tokens=0, messages=[{"role": "user", "content": "x"}])


def test_count_tokens(sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    short = sdk.messages.count_tokens(model="gpt", messages=[{"role": "user", "content": "hi"}])
    longer = sdk.messages.count_tokens(model="gpt", system="You are a careful assistant.", tools=[TOOL],
                                       messages=[{"role": "user", "content": "hi there, how are you today?"}])
    assert 0 < short.input_tokens < longer.input_tokens
    with anthropic.Anthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.count_tokens(model="gpt", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_messages_are_counted_under_their_own_endpoint_label(sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    ask(sdk, "gpt")
    assert 'endpoint="messages"' in gw.metrics()


def test_guards_apply_to_messages(sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(sdk, "guarded", "tell me about Project Falcon")
    assert "content policy" in str(caught.value) and len(upstream.requests) == before
    assert ask(sdk, "guarded", "tell me about birds").content


# -- /v1/responses ------------------------------------------------------------------------------------


@pytest.fixture
def oai(gw: RunningGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


def test_responses_plain(oai: openai.OpenAI, upstream: MockUpstream, gw: RunningGateway) -> None:
    response = oai.responses.create(model="gpt", input="Say hello")
    assert response.output_text == REPLY
    assert response.usage is not None and response.usage.output_tokens == 20
    assert upstream.requests[-1].path == "/v1/responses" and upstream.requests[-1].json["model"] == "mock-model"
    assert 'endpoint="responses"' in gw.metrics()


def test_responses_streamed(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="gpt", input="Say hello", stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 20 and "".join(deltas) == REPLY
    assert events[-1].type == "response.completed" and events[-1].response.usage is not None


def test_responses_to_a_target_that_cannot_serve_it(oai: openai.OpenAI, claude_mock: MockAnthropic) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model="claude", input="hi")
    assert "cannot serve /v1/responses" in caught.value.message and not claude_mock.requests


def test_guards_apply_to_responses(oai: openai.OpenAI) -> None:
    for given in ("about project falcon", [{"role": "user", "content": [
            {"type": "input_text", "text": "about project falcon"}]}]):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.responses.create(model="guarded", input=given)  # type: ignore[arg-type]
        assert caught.value.code == "content_policy_violation"
    assert oai.responses.create(model="guarded", input="about birds").output_text == REPLY


def test_responses_bad_input_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="gpt", input=[])
