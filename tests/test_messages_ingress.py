"""The Anthropic SDK against `/v1/messages` and `count_tokens`; the OpenAI SDK against `/v1/responses`.

`/v1/messages` is routed by the same policy as Chat Completions: to an
OpenAI-compatible upstream (translated both ways) and to an Anthropic upstream
(translated to chat and back). Keys come as `x-api-key`; errors come in
Anthropic's envelope so the SDK raises its own exception classes. Guards apply to
both new ingresses.
"""

from __future__ import annotations

import json
import re
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
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY,
                    anthropic: {{beta: [files-api-2025-04-14]}}}}
          claude-own: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY,
                        anthropic: {{forward_beta: false}}}}
        models:
          claude-own-betas: {{provider: claude-own, model: claude-mock}}
          gpt: {{provider: openai, model: mock-model}}
          gpt-echo: {{provider: openai, model: fault-echo}}
          gpt-tool: {{provider: openai, model: fault-echo-tool}}
          gpt-500: {{provider: openai, model: fault-status-500}}
          gpt-stall: {{provider: openai, model: fault-stall-after-3}}
          claude: {{provider: claude, model: claude-mock}}
          claude-tool: {{provider: claude, model: fault-echo-tool}}
          claude-529: {{provider: claude, model: fault-status-529}}
          guarded: {{provider: openai, model: mock-model}}
          gpt-cached: {{provider: openai, model: mock-model, cache: {{}}}}
          gpt-nousage: {{provider: openai, model: fault-no-usage}}
          gpt-interleaved: {{provider: openai, model: fault-interleaved-tools}}
          gpt-odd-arguments: {{provider: openai, model: fault-odd-arguments}}
          gpt-parts: {{provider: openai, model: fault-content-parts}}
          gpt-riding: {{provider: openai, model: fault-usage-riding}}
          claude-cached: {{provider: claude, model: claude-mock, cache: {{}}}}
          claude-out: {{provider: claude, model: claude-mock}}
          claude-out-tool: {{provider: claude, model: fault-echo-tool}}
          resp-out: {{provider: openai, model: fault-echo}}
          resp-out-tool: {{provider: openai, model: fault-echo-tool}}
          resp-pseudo: {{provider: openai, model: fault-echo}}
          resp-pseudo-tool: {{provider: openai, model: fault-echo-tool}}
        guards:
          stream: {{window_chars: 32, step_chars: 8}}
          models:
            guarded:
              deny: {{kind: denylist, terms: [project falcon], places: [input]}}
            resp-out: &out
              pii: {{kind: pii, places: [output], entities: {{EMAIL_ADDRESS: {{}}}}}}
              secrets: {{kind: secrets, places: [output]}}
            resp-out-tool: *out
            resp-pseudo: &pseudo
              pii: {{kind: pii, places: [input], action: pseudonymize, entities: {{EMAIL_ADDRESS: {{}}}}}}
            resp-pseudo-tool: *pseudo
            claude-out: *out
            claude-out-tool: *out
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


def test_a_clients_anthropic_beta_reaches_an_anthropic_upstream_only(
    sdk: anthropic.Anthropic, upstream: MockUpstream, claude_mock: MockAnthropic,
) -> None:
    """Claude Code asks for betas (interleaved thinking, a longer context) in `anthropic-beta`: merged after the
    provider's own `beta`, checked names only; an OpenAI upstream gets neither the header nor the private field."""
    betas = {"anthropic-beta": "interleaved-thinking-2025-05-14, Bad Value!,context-1m-2025-08-07"}
    ask(sdk, "claude", extra_headers=betas)
    assert claude_mock.requests[-1].headers["anthropic-beta"] == (
        "files-api-2025-04-14,interleaved-thinking-2025-05-14,context-1m-2025-08-07")
    assert "_gateway" not in claude_mock.requests[-1].body.decode()
    ask(sdk, "claude-own-betas", extra_headers=betas)
    assert "anthropic-beta" not in claude_mock.requests[-1].headers  # `forward_beta: false`: the policy's only
    ask(sdk, "gpt", extra_headers=betas)
    assert "anthropic-beta" not in upstream.requests[-1].headers
    assert "_gateway" not in upstream.requests[-1].body.decode()


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


@pytest.mark.parametrize(("alias", "status"), [("gpt-500", 502), ("claude-529", 529)])
def test_upstream_failure_is_an_api_status_error(alias: str, status: int, sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        ask(sdk, alias)
    assert caught.value.status_code == status
    assert UPSTREAM_KEY not in caught.value.response.text and "10.0.0.5" not in caught.value.response.text


@pytest.mark.parametrize("stream", [False, True])
def test_an_overloaded_upstream_is_anthropics_529(stream: bool, sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    """Anthropic's own status and type, which the SDK raises as `OverloadedError` (and retries); the OpenAI-shaped
    endpoints keep the gateway's 503 for the same failure."""
    with pytest.raises(anthropic.OverloadedError) as caught:
        ask(sdk, "claude-529", stream=stream)
    assert caught.value.status_code == 529 and caught.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert caught.value.request_id == caught.value.response.headers["x-request-id"]
    chat = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=10,
                      json={"model": "claude-529", "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "upstream_overloaded"


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


_BASE = {"model": "gpt", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize(("field", "value"), [
    ("stop_sequences", 5), ("stop_sequences", 1.5), ("stop_sequences", True), ("stop_sequences", "END"),
    ("stop_sequences", [1]), ("tools", True), ("tools", "echo"), ("tools", {"name": "echo"}), ("tools", [5]),
])
def test_mistyped_lists_get_anthropics_400(path: str, field: str, value: Any, gw: RunningGateway) -> None:
    # these were a 500 (or, for a string of stop sequences, one stop sequence per character)
    response = httpx.post(gw.url + path, json={**_BASE, field: value}, headers={"x-api-key": FULL_KEY}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert field in error["error"]["message"]


def test_typed_lists_still_reach_the_upstream(sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    ask(sdk, "gpt", stop_sequences=["END", "STOP"], tools=[TOOL])
    sent = upstream.requests[-1].json
    assert sent["stop"] == ["END", "STOP"] and sent["tools"][0]["function"]["name"] == "echo"


_DEEP = "__deep__"


def _nested(body: dict[str, Any], levels: int) -> bytes:
    """`body` encoded, with the string `_DEEP` in it replaced by objects nested `levels` deep."""
    return json.dumps(body).replace(f'"{_DEEP}"', '{"a":' * levels + "1" + "}" * levels).encode()


@pytest.mark.parametrize(("path", "where"), [
    ("/v1/messages", "tool input"), ("/v1/messages", "input_schema"), ("/v1/messages", "thinking"),
    ("/v1/messages/count_tokens", "input_schema"),
])
def test_bodies_nested_too_deeply_get_anthropics_400(path: str, where: str, gw: RunningGateway) -> None:
    def body(levels: int) -> bytes:  # nested `levels` deep, plus the body's own few levels
        if where == "tool input":
            messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "echo", "input": _DEEP}]},
                        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]}]
            return _nested({**_BASE, "messages": messages, "tools": [TOOL]}, levels)
        if where == "thinking":
            return _nested({**_BASE, "thinking": _DEEP}, levels)
        return _nested({**_BASE, "tools": [{**TOOL, "input_schema": _DEEP}]}, levels)

    def post(levels: int) -> httpx.Response:
        return httpx.post(gw.url + path, content=body(levels), headers={"x-api-key": FULL_KEY}, timeout=10)

    for levels in (200, 980):  # 980: past what re-encoding the body further down the stack survives
        response = post(levels)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "128 deep" in error["message"]
    assert post(100).status_code == 200  # deep, but within the limit


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


def messages_events(gw: RunningGateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed `/v1/messages` answer, each `event:` line checked against its data's type."""
    response = httpx.post(gw.url + "/v1/messages", json={**body, "stream": True}, headers={"x-api-key": FULL_KEY},
                          timeout=10)
    assert response.status_code == 200
    events = []
    for frame in response.text.split("\n\n"):
        if frame:
            name, data = frame.split("\n")
            events.append(json.loads(data.removeprefix("data: ")))
            assert name == "event: " + events[-1]["type"]
    return events


def assert_blocks_one_after_another(events: list[dict[str, Any]]) -> None:
    """Anthropic's order: each content block started, given its deltas and stopped before the next one starts."""
    open_index, last = None, -1
    for event in events:
        kind, index = event["type"], event.get("index")
        if kind == "content_block_start":
            assert open_index is None and index == last + 1, events
            open_index = last = index
        elif kind in ("content_block_delta", "content_block_stop"):
            assert index == open_index, events
            open_index = None if kind == "content_block_stop" else open_index
    assert open_index is None


def test_interleaved_tool_calls_reach_the_client_whole(sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    text = "call both tools now"
    expected = [("tool0", {"text": text}), ("tool1", {"words": 4})]
    with sdk.messages.stream(model="gpt-interleaved", max_tokens=50, tools=[TOOL],  # type: ignore[list-item]
                             messages=[{"role": "user", "content": text}]) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == expected
    assert final.stop_reason == "tool_use"
    plain = ask(sdk, "gpt-interleaved", text, tools=[TOOL])
    assert [(b.name, b.input) for b in plain.content if b.type == "tool_use"] == expected
    events = messages_events(gw, {"model": "gpt-interleaved", "max_tokens": 50, "tools": [TOOL],
                                  "messages": [{"role": "user", "content": text}]})
    assert_blocks_one_after_another(events)
    assert [e["content_block"]["id"] for e in events if e["type"] == "content_block_start"] == [
        "call_mock0", "call_mock1"]


@pytest.mark.parametrize("alias", ["gpt-parts", "gpt-odd-arguments"])
def test_streamed_answer_matches_the_whole_one(alias: str, sdk: anthropic.Anthropic) -> None:
    # text sent as a list of parts, and tool arguments that are invalid JSON or an array: the same either way
    plain = ask(sdk, alias, "text in parts", tools=[TOOL])
    with sdk.messages.stream(model=alias, max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                             messages=[{"role": "user", "content": "text in parts"}]) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in plain.content]
    if alias == "gpt-parts":
        assert [b.model_dump() for b in plain.content] == [{"type": "text", "text": "text in parts",
                                                            "citations": None}]
    else:
        assert [b.input for b in plain.content if b.type == "tool_use"] == [
            {"_raw_arguments": '{"text": '}, {"value": [1, 2]}]


def counted_tokens(gw: RunningGateway, alias: str) -> tuple[float, float]:
    """The prompt and completion tokens the gateway counted for `alias` so far (its token counter)."""
    found = dict(re.findall(rf'gateway_tokens_total{{kind="(prompt|completion)",model="{alias}"}} (\S+)',
                            gw.metrics()))
    return float(found.get("prompt", 0)), float(found.get("completion", 0))


@pytest.mark.parametrize("stream", [False, True, True])  # the second stream: its provider known to send no usage
def test_usage_the_upstream_did_not_send_is_the_gateways_estimate(stream: bool, sdk: anthropic.Anthropic,
                                                                  gw: RunningGateway) -> None:
    before = counted_tokens(gw, "gpt-nousage")
    if stream:
        with sdk.messages.stream(model="gpt-nousage", max_tokens=50,
                                 messages=[{"role": "user", "content": "count me please"}]) as streamed:
            usage = streamed.get_final_message().usage
    else:
        usage = ask(sdk, "gpt-nousage", "count me please").usage
    after = counted_tokens(gw, "gpt-nousage")
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert (usage.input_tokens, usage.output_tokens) == (after[0] - before[0], after[1] - before[1])


def test_stream_usage_on_the_last_content_chunk_keeps_the_cache_split(sdk: anthropic.Anthropic) -> None:
    plain = ask(sdk, "gpt-riding", "a b c d e f").usage
    with sdk.messages.stream(model="gpt-riding", max_tokens=50,
                             messages=[{"role": "user", "content": "a b c d e f"}]) as stream:
        streamed = stream.get_final_message().usage
    assert plain.cache_read_input_tokens and plain.input_tokens
    assert (streamed.input_tokens, streamed.output_tokens, streamed.cache_read_input_tokens,
            streamed.cache_creation_input_tokens) == (plain.input_tokens, plain.output_tokens,
                                                      plain.cache_read_input_tokens, plain.cache_creation_input_tokens)


def test_anthropic_cache_tokens_survive_a_streamed_gateway_cache_hit(gw: RunningGateway) -> None:
    body = {"model": "claude-cached", "max_tokens": 100, "temperature": 0,
            "messages": [{"role": "user", "content": "cache this one"}]}
    miss = httpx.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": FULL_KEY}, timeout=10)
    assert miss.headers["x-gateway-cache"] == "miss"  # stored whole, then served to a stream
    hit = httpx.post(gw.url + "/v1/messages", json={**body, "stream": True}, headers={"x-api-key": FULL_KEY},
                     timeout=10)
    assert hit.headers["x-gateway-cache"] == "hit"
    usage = next(json.loads(line[6:])["usage"] for line in hit.text.splitlines() if line.startswith("data: ")
                 and '"message_delta"' in line)
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (CACHE_READ, CACHE_WRITE)
    assert usage == miss.json()["usage"]


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}


def screenshot_turns(result: list[dict[str, Any]]) -> list[Any]:
    return [{"role": "user", "content": "take a screenshot"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]}]


def test_tool_result_image_reaches_an_anthropic_upstream_inside_the_result(sdk: anthropic.Anthropic,
                                                                           claude_mock: MockAnthropic) -> None:
    result = [{"type": "text", "text": "the screen"}, IMAGE]
    assert sdk.messages.create(model="claude", max_tokens=10, tools=[TOOL],  # type: ignore[list-item]
                               messages=screenshot_turns(result)).content
    sent = claude_mock.requests[-1].json["messages"][-1]["content"]
    assert sent == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]


def test_tool_result_image_reaches_an_openai_upstream_as_it_is(sdk: anthropic.Anthropic,
                                                               upstream: MockUpstream) -> None:
    # OpenAI's own API takes only text in a tool message (and says so in its 400); other servers read images there
    sdk.messages.create(model="gpt", max_tokens=10, tools=[TOOL],  # type: ignore[list-item]
                        messages=screenshot_turns([IMAGE]))
    assert upstream.requests[-1].json["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}


def test_request_id_where_the_anthropic_sdk_reads_it(sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    raw = sdk.messages.with_raw_response.create(model="gpt", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert raw.parse()._request_id == raw.headers["x-request-id"]
    with sdk.messages.stream(model="gpt", max_tokens=10, messages=[{"role": "user", "content": "x"}]) as stream:
        assert stream.response.headers["request-id"] == stream.response.headers["x-request-id"]
    counted = sdk.messages.with_raw_response.count_tokens(model="gpt", messages=[{"role": "user", "content": "x"}])
    assert counted.request_id == counted.headers["x-request-id"]
    for refused in (lambda: ask(sdk, "nope"), lambda: sdk.messages.count_tokens(
            model="nope", messages=[{"role": "user", "content": "x"}])):
        with pytest.raises(anthropic.NotFoundError) as caught:
            refused()
        request_id = caught.value.response.headers["x-request-id"]
        assert caught.value.request_id == request_id and caught.value.body["request_id"] == request_id  # type: ignore[index]
    chat = httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=10,
                      json={"model": "gpt", "messages": [{"role": "user", "content": "x"}]})
    assert "request-id" not in chat.headers and "x-request-id" in chat.headers  # OpenAI's endpoints: unchanged


# -- prompt caching (`cache_control`) and stop sequences ----------------------------------------------

CC = {"type": "ephemeral"}
CC_1H = {"type": "ephemeral", "ttl": "1h"}


def cached_request() -> dict[str, Any]:
    """A Claude Code-like request: breakpoints on the system, the tools, a tool call and a tool result (4: the most
    Anthropic takes), and `cache_control` where a client might put it on plain blocks too (a later request)."""
    return {"max_tokens": 20,
            "system": [{"type": "text", "text": "You are a coder.", "cache_control": CC_1H},
                       {"type": "text", "text": "Be brief."}],
            "tools": [{**TOOL, "cache_control": CC}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "echo x"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "calling"},
                    {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {"text": "x"},
                     "cache_control": CC}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x", "cache_control": CC},
                    {"type": "text", "text": "and now?"}]}]}


@pytest.mark.parametrize("stream", [False, True])
def test_cache_control_reaches_an_anthropic_upstream_on_its_blocks(stream: bool, sdk: anthropic.Anthropic,
                                                                   claude_mock: MockAnthropic) -> None:
    request = cached_request()
    if stream:
        with sdk.messages.stream(model="claude", **request) as events:
            message = events.get_final_message()
    else:
        message = sdk.messages.create(model="claude", **request)
    assert message.usage.cache_read_input_tokens == CACHE_READ
    sent = claude_mock.requests[-1].json
    assert sent["system"] == request["system"]
    assert sent["tools"] == [{"name": "echo", "description": "Echo a text", "input_schema": TOOL["input_schema"],
                              "cache_control": CC}]
    assert sent["messages"][1:] == request["messages"][1:]
    assert "cache_control" not in sent["messages"][0]["content"][0]


def test_cache_control_on_plain_blocks_reaches_an_anthropic_upstream(sdk: anthropic.Anthropic,
                                                                     claude_mock: MockAnthropic) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "look", "cache_control": CC},
                                     {**IMAGE, "cache_control": CC}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "is_error": True, "content": [
            {"type": "text", "text": "no screen", "cache_control": CC}, {"type": "text", "text": "at all"}]}]}]
    sdk.messages.create(model="claude", max_tokens=10, tools=[TOOL], messages=messages)  # type: ignore[arg-type,list-item]
    sent = claude_mock.requests[-1].json["messages"]
    assert sent[0]["content"] == messages[0]["content"]
    assert sent[2]["content"] == [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
        {"type": "text", "text": "Error: no screen", "cache_control": CC}, {"type": "text", "text": "at all"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_cache_control_never_reaches_an_openai_upstream(stream: bool, sdk: anthropic.Anthropic,
                                                        upstream: MockUpstream) -> None:
    request = cached_request()
    if stream:
        with sdk.messages.stream(model="gpt", **request) as events:
            assert events.get_final_message().content
    else:
        assert sdk.messages.create(model="gpt", **request).content
    record = upstream.requests[-1]
    assert b"cache_control" not in record.body, record.body
    sent = record.json["messages"]
    assert sent[0] == {"role": "system", "content": [{"type": "text", "text": "You are a coder."},
                                                     {"type": "text", "text": "Be brief."}]}
    assert sent[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "x"}
    assert record.json["tools"] == [{"type": "function", "function": {
        "name": "echo", "parameters": TOOL["input_schema"], "description": "Echo a text"}}]
    plain = {**request, "system": [{"type": "text", "text": "Be brief."}], "tools": [TOOL]}
    sdk.messages.create(model="gpt", **plain)
    assert upstream.requests[-1].json["messages"][0] == {"role": "system", "content": "Be brief."}  # as before


def test_cache_control_is_removed_from_a_copy() -> None:
    from gateway.translate.anthropic_ingress import chat_request
    from gateway.translate.cache_control import CACHE_MARK, without_cache_control

    chat, _ = chat_request(json.dumps({"model": "m", **cached_request()}).encode())
    before = json.dumps(chat)
    assert chat[CACHE_MARK] is True and json.dumps(without_cache_control(chat)).count("cache_control") == 0
    assert json.dumps(chat) == before  # a fallback to an Anthropic target still finds them
    plain, _ = chat_request(b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}')
    assert CACHE_MARK not in plain


def test_a_cache_control_that_is_not_an_object_is_a_400(gw: RunningGateway) -> None:
    body = {"model": "claude", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": "yes"}]}]}
    answer = httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY}, json=body, timeout=10)
    assert answer.status_code == 400 and "messages.0.content.0.cache_control" in answer.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_matched_stop_sequence_is_reported(stream: bool, sdk: anthropic.Anthropic) -> None:
    if stream:
        with sdk.messages.stream(model="claude", max_tokens=50, stop_sequences=["END", " mock"],
                                 messages=[{"role": "user", "content": "Say hello"}]) as events:
            message = events.get_final_message()
    else:
        message = ask(sdk, "claude", stop_sequences=["END", " mock"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " mock"
    assert message.content[0].type == "text" and message.content[0].text == "Hello from the"
    unmatched = ask(sdk, "claude", stop_sequences=["END"])
    assert unmatched.stop_reason == "end_turn" and unmatched.stop_sequence is None


def test_a_stop_sequence_survives_a_gateway_cache_hit(gw: RunningGateway, claude_mock: MockAnthropic) -> None:
    body = {"model": "claude-cached", "max_tokens": 50, "stop_sequences": [" mock"], "temperature": 0,
            "messages": [{"role": "user", "content": "stop sequence cached"}]}
    answers = [httpx.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY}, json=body, timeout=10)
               for _ in range(2)]
    assert [a.headers.get("x-gateway-cache") for a in answers] == ["miss", "hit"]
    for answer in answers:
        assert answer.json()["stop_reason"] == "stop_sequence" and answer.json()["stop_sequence"] == " mock"
    claude_mock.clear()  # (later tests check that nothing reached it)


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


def test_responses_are_never_cached(oai: openai.OpenAI, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    for _ in range(2):
        raw = oai.responses.with_raw_response.create(model="gpt-cached", input="Say hello", temperature=0)
        assert raw.headers["x-gateway-cache"] == "bypass" and raw.parse().output_text == REPLY
    assert len(upstream.requests) == before + 2
    chat = [oai.chat.completions.with_raw_response.create(
        model="gpt-cached", messages=[{"role": "user", "content": "Say hello"}], temperature=0) for _ in range(2)]
    assert [c.headers["x-gateway-cache"] for c in chat] == ["miss", "hit"]  # the alias does cache chat


def test_responses_bad_input_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.responses.create(model="gpt", input=[])


# -- /v1/responses: output guards -----------------------------------------------------------------------

EMAIL = "jane.doe@mailbox.org"
SECRET = "AKIAIOSFODNN7EXAMPLQ"
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


def responses_stream(gw: RunningGateway, model: str, text: str, **extra: Any) -> tuple[str, list[dict[str, Any]]]:
    """The raw SSE text of a streamed Responses answer, and its events (each named by its `type`, as OpenAI frames
    them, and no `[DONE]`)."""
    body = {"model": model, "input": text, "stream": True, **extra}
    with httpx.stream("POST", gw.base_url + "/responses", headers=AUTH, json=body, timeout=20) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    frames = [frame.partition("\ndata: ") for frame in raw.split("\n\n") if frame]
    events = [json.loads(data) for _, _, data in frames]
    assert [name for name, _, _ in frames] == ["event: " + event["type"] for event in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))  # consecutive, whatever was held
    return raw, events


def streamed_texts(events: list[dict[str, Any]]) -> dict[str, str]:
    """Every place a streamed Responses answer says its text: the deltas, and each event that repeats it."""
    final = events[-1]["response"]["output"]
    return {
        "deltas": "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta"),
        "text.done": next(e["text"] for e in events if e["type"] == "response.output_text.done"),
        "part.done": next(e["part"]["text"] for e in events if e["type"] == "response.content_part.done"),
        "item.done": next(e["item"]["content"][0]["text"] for e in events if e["type"] == "response.output_item.done"),
        "completed": final[0]["content"][0]["text"],
    }


def test_responses_output_redacted_not_streamed(oai: openai.OpenAI, gw: RunningGateway) -> None:
    text = f"write to {EMAIL} today"
    answer = oai.responses.create(model="resp-out", input=text)
    assert answer.output_text == "write to <EMAIL_ADDRESS> today" and answer.status == "completed"
    raw = httpx.post(gw.base_url + "/responses", headers=AUTH, json={"model": "resp-out", "input": text}, timeout=20)
    assert EMAIL not in raw.text and "pii.redact=1" in raw.headers["x-gateway-guards"]


def test_responses_output_block_not_streamed(oai: openai.OpenAI, gw: RunningGateway) -> None:
    text = f"the key {SECRET} and the mail {EMAIL}"
    raw = httpx.post(gw.base_url + "/responses", headers=AUTH, json={"model": "resp-out", "input": text}, timeout=20)
    assert raw.status_code == 200 and SECRET not in raw.text and EMAIL not in raw.text
    body = raw.json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "content_filter"}
    assert [part["text"] for item in body["output"] for part in item["content"]] == [""]
    answer = oai.responses.create(model="resp-out", input=text)
    assert answer.status == "incomplete" and answer.incomplete_details is not None
    assert answer.incomplete_details.reason == "content_filter" and answer.output_text == ""


@pytest.mark.parametrize("size", [1, 4, 7])
def test_responses_stream_redaction_split_at_every_offset(gw: RunningGateway, size: int) -> None:
    for pad in range(size):
        text = "y" * pad + f" the address is {EMAIL} and nothing else matters here at all."
        raw, events = responses_stream(gw, "resp-out", text, echo_chunk=size)
        assert EMAIL not in raw and "mailbox" not in raw
        expected = text.replace(EMAIL, "<EMAIL_ADDRESS>")
        assert set(streamed_texts(events).values()) == {expected}, streamed_texts(events)
        assert events[-1]["type"] == "response.completed" and events[-1]["response"]["usage"]["output_tokens"] > 0


def test_responses_stream_reassembled_by_the_sdk(oai: openai.OpenAI) -> None:
    text = f"Write to {EMAIL} when the report is ready, and copy the team."
    expected = text.replace(EMAIL, "<EMAIL_ADDRESS>")
    events = list(oai.responses.create(model="resp-out", input=text, stream=True, extra_body={"echo_chunk": 3}))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected
    with oai.responses.stream(model="resp-out", input=text, extra_body={"echo_chunk": 5}) as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert snapshots[-1] == expected and final.output_text == expected and final.status == "completed"


@pytest.mark.parametrize("size", [1, 4, 7])
def test_responses_stream_block_ends_incomplete_and_sends_nothing_of_the_finding(
        gw: RunningGateway, oai: openai.OpenAI, size: int) -> None:
    text = f"Here is a long preamble that comes first, and then the key {SECRET} and more text after it."
    raw, events = responses_stream(gw, "resp-out", text, echo_chunk=size)
    assert not any(SECRET[:i] in raw for i in range(4, len(SECRET) + 1))
    last = events[-1]
    assert last["type"] == "response.incomplete" and last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert last["response"]["id"] == events[0]["response"]["id"]
    sent = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text.startswith(sent) and last["response"]["output"][0]["content"][0]["text"] == sent
    sdk_events = list(oai.responses.create(model="resp-out", input=text, stream=True, extra_body={"echo_chunk": size}))
    assert sdk_events[-1].type == "response.incomplete"
    with oai.responses.stream(model="resp-out", input=text, extra_body={"echo_chunk": size}) as stream:
        kinds = [e.type for e in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.incomplete"


def test_responses_pseudonyms_restored_not_streamed(oai: openai.OpenAI, upstream: MockUpstream) -> None:
    text = f"Please write to {EMAIL} soon"
    answer = oai.responses.create(model="resp-pseudo", input=text)
    assert upstream.requests[-1].json["input"] == "Please write to <EMAIL_ADDRESS_1> soon"
    assert answer.output_text == text


@pytest.mark.parametrize("size", [1, 3, 7])
def test_responses_pseudonyms_restored_in_streams_split_at_every_offset(
        gw: RunningGateway, upstream: MockUpstream, size: int) -> None:
    for pad in range(0, 12, 3 if size == 1 else 1):  # the placeholder starts at every offset of a chunk
        text = "x" * pad + f" Say hi to {EMAIL} today."
        _, events = responses_stream(gw, "resp-pseudo", text, echo_chunk=size)
        assert "<EMAIL_ADDRESS_1>" in upstream.requests[-1].json["input"]
        assert set(streamed_texts(events).values()) == {text}


@pytest.mark.parametrize("stream", [False, True])
def test_responses_function_call_arguments_redacted_and_restored(gw: RunningGateway, oai: openai.OpenAI,
                                                                 stream: bool) -> None:
    text = f"send it to {EMAIL} tonight"
    for alias, expected in (("resp-out-tool", text.replace(EMAIL, "<EMAIL_ADDRESS>")), ("resp-pseudo-tool", text)):
        if not stream:
            raw = httpx.post(gw.base_url + "/responses", headers=AUTH, timeout=20,
                             json={"model": alias, "input": text})
            assert (EMAIL not in raw.text) is (alias == "resp-out-tool")
            call = raw.json()["output"][0]
            assert call["type"] == "function_call" and json.loads(call["arguments"]) == {"text": expected}
            continue
        raw_sse, events = responses_stream(gw, alias, text, echo_chunk=3)
        assert (EMAIL not in raw_sse) is (alias == "resp-out-tool")
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        done = next(e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done")
        item = next(e["item"]["arguments"] for e in events if e["type"] == "response.output_item.done")
        final = events[-1]["response"]["output"][0]["arguments"]
        assert {deltas, done, item, final} == {json.dumps({"text": expected})}
        with oai.responses.stream(model=alias, input=text, extra_body={"echo_chunk": 3}) as sdk_stream:
            answer = sdk_stream.get_final_response()
        assert answer.output[0].type == "function_call"
        assert json.loads(answer.output[0].arguments) == {"text": expected}


def test_responses_stream_without_output_guards_passes_the_upstreams_bytes(gw: RunningGateway) -> None:
    raw, events = responses_stream(gw, "guarded", "about birds")
    assert '"type": "response.output_text.delta"' in raw  # the mock's own spacing: not re-encoded
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == REPLY


# -- extended thinking ----------------------------------------------------------------------------------

THINK = {"type": "enabled", "budget_tokens": 1024}


def think(sdk: anthropic.Anthropic, model: str, messages: list[Any], stream: bool, **kwargs: Any) -> Message:
    """One answer with thinking enabled, complete or through the SDK's stream helper (its events checked)."""
    request: dict[str, Any] = {"model": model, "max_tokens": 2048, "thinking": THINK, "messages": messages,
                               **kwargs}
    if not stream:
        return sdk.messages.create(**request)
    with sdk.messages.stream(**request) as events:
        seen = [(event.type, getattr(getattr(event, "delta", None), "type", None)) for event in events]
        final = events.get_final_message()
    thinking_blocks = sum(1 for block in final.content if block.type == "thinking")
    assert seen.count(("content_block_delta", "signature_delta")) == thinking_blocks
    assert (("content_block_delta", "thinking_delta") in seen) == bool(thinking_blocks)
    return final


def expected_thinking(text: str) -> dict[str, Any]:
    from tests.support.mock_anthropic import thinking_signature

    thought = f"The user asks: {text}. I should answer briefly."
    return {"type": "thinking", "thinking": thought, "signature": thinking_signature(thought)}


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_reaches_the_client_before_the_text(stream: bool, sdk: anthropic.Anthropic) -> None:
    message = think(sdk, "claude", [{"role": "user", "content": "why is the sky blue"}], stream)
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].model_dump() == expected_thinking("why is the sky blue")
    assert message.content[1].text == REPLY  # type: ignore[union-attr]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_and_tool_use_over_two_turns(stream: bool, sdk: anthropic.Anthropic,
                                              claude_mock: MockAnthropic) -> None:
    """Anthropic wants the thinking of the turn that called the tools back, signed, before its tool calls: the
    mock refuses the second turn otherwise, as the real API does."""
    question = [{"role": "user", "content": "ping pong"}]
    first = think(sdk, "claude-tool", question, stream, tools=[TOOL])
    assert [block.type for block in first.content] == ["thinking", "tool_use"]
    assert first.content[0].model_dump() == expected_thinking("ping pong")
    call = first.content[1]
    turn = [*question, {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "done"}]}]
    second = think(sdk, "claude", turn, stream, tools=[TOOL])
    assert [block.type for block in second.content] == ["thinking", "text"]
    sent = claude_mock.requests[-1].json["messages"][1]["content"]
    assert sent[0] == first.content[0].model_dump() and sent[1]["type"] == "tool_use"


def test_a_turn_without_its_thinking_is_refused_as_anthropic_does(sdk: anthropic.Anthropic) -> None:
    first = think(sdk, "claude-tool", [{"role": "user", "content": "ping"}], False, tools=[TOOL])
    call = first.content[1]
    with pytest.raises(anthropic.BadRequestError, match="Expected `thinking` or `redacted_thinking`"):
        think(sdk, "claude", [{"role": "user", "content": "ping"},
                              {"role": "assistant", "content": [call.model_dump()]},
                              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                            "content": "done"}]}], False, tools=[TOOL])


@pytest.mark.parametrize("stream", [False, True])
def test_several_thinking_blocks_round_trip_in_order(stream: bool, sdk: anthropic.Anthropic,
                                                     claude_mock: MockAnthropic) -> None:
    from tests.support.mock_anthropic import REDACTED_TRIGGER

    text = f"think twice {REDACTED_TRIGGER}"
    first = think(sdk, "claude-tool", [{"role": "user", "content": text}], stream, tools=[TOOL])
    assert [block.type for block in first.content] == ["thinking", "redacted_thinking", "thinking", "tool_use"]
    assert first.content[2].thinking == "On second thought, an echo will do."  # type: ignore[union-attr]
    blocks = [block.model_dump() for block in first.content]
    turn = [{"role": "user", "content": text}, {"role": "assistant", "content": blocks},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first.content[3].id,  # type: ignore
                                          "content": "done"}]}]
    think(sdk, "claude", turn, stream, tools=[TOOL])
    sent = claude_mock.requests[-1].json["messages"][1]["content"]
    assert sent[:3] == blocks[:3] and sent[3]["type"] == "tool_use"


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_text_goes_through_the_output_guards(stream: bool, sdk: anthropic.Anthropic) -> None:
    message = think(sdk, "claude-out", [{"role": "user", "content": f"mail {EMAIL} now"}], stream)
    thought = message.content[0]
    assert thought.type == "thinking" and EMAIL not in thought.thinking
    assert thought.thinking == "The user asks: mail <EMAIL_ADDRESS> now. I should answer briefly."
    assert thought.signature  # kept: it no longer matches the text, so Anthropic would refuse it in the next turn
    assert EMAIL not in message.model_dump_json()


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_never_reaches_an_openai_upstream(stream: bool, sdk: anthropic.Anthropic,
                                                   upstream: MockUpstream) -> None:
    first = think(sdk, "claude-tool", [{"role": "user", "content": "ping"}], False, tools=[TOOL])
    call = first.content[1]
    turn = [{"role": "user", "content": "ping"},
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "done"}]}]
    request: dict[str, Any] = {"model": "gpt", "max_tokens": 50, "messages": turn, "tools": [TOOL]}
    if stream:
        with sdk.messages.stream(**request) as events:
            events.get_final_message()
    else:
        sdk.messages.create(**request)
    raw = upstream.requests[-1].body
    for private in (b"reasoning_blocks", b"reasoning_content", b"signature", b"_gateway", b"The user asks"):
        assert private not in raw, raw
    assert upstream.requests[-1].json["messages"][1]["tool_calls"][0]["id"] == call.id


def test_thinking_is_carried_in_the_chat_form_and_marked() -> None:
    from gateway.translate.anthropic_ingress import chat_request
    from gateway.translate.cache_control import CACHE_MARK, without_cache_control

    blocks = [{"type": "thinking", "thinking": "abc", "signature": "s1"}, {"type": "redacted_thinking", "data": "d"},
              {"type": "tool_use", "id": "t1", "name": "echo", "input": {}},
              {"type": "thinking", "thinking": "de", "signature": "s2"}]
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": blocks}]}
    chat, _ = chat_request(json.dumps(body).encode())
    reply = chat["messages"][1]
    assert chat[CACHE_MARK] is True and reply["reasoning_content"] == "abcde"
    assert reply["reasoning_blocks"] == [{"type": "thinking", "signature": "s1", "length": 3},
                                         {"type": "redacted_thinking", "data": "d"},
                                         {"type": "thinking", "signature": "s2", "length": 2, "after_tool_calls": 1}]
    bare = without_cache_control(chat)
    assert CACHE_MARK not in bare and "reasoning" not in json.dumps(bare) and "reasoning_blocks" in reply
    from gateway.translate.chat_to_anthropic import anthropic_request

    assert anthropic_request(chat, 10, "t")["messages"][1]["content"] == blocks  # order kept around the tool call


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> Any:
    from gateway.schemas.events import Chunk

    return Chunk.of({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_streamed_thinking_whose_text_comes_after_its_signature_keeps_its_blocks() -> None:
    """An output guard holds the tail of the thinking back, past the entry that ends its block: the block ends
    where its length says, and the next one begins after it."""
    from gateway.schemas.events import DONE
    from gateway.translate.anthropic_answer import MessagesStream

    framer = MessagesStream("claude")
    chunks = [{"reasoning_content": "abc"},
              {"reasoning_blocks": [{"type": "thinking", "signature": "s1", "length": 5}]},
              {"reasoning_blocks": [{"type": "redacted_thinking", "data": "d"}]},
              {"reasoning_content": "deXY"},
              {"reasoning_blocks": [{"type": "thinking", "signature": "s2", "length": 2}]},
              {"content": "hi"}]
    raw = framer.frame([chat_chunk(delta) for delta in chunks]) + framer.frame([chat_chunk({}, "stop"), DONE])
    events = [json.loads(frame.split("\n")[1].removeprefix("data: ")) for frame in raw.decode().split("\n\n") if frame]
    assert_blocks_one_after_another(events)
    import pydantic
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    message, buffers = None, {}  # type: ignore[var-annotated]
    for event in events:
        if event["type"] != "ping":
            message = accumulate_event(event=pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(event),
                                       current_snapshot=message, json_bufs=buffers)
    assert message is not None
    assert [block.model_dump() for block in message.content] == [
        {"type": "thinking", "thinking": "abcde", "signature": "s1"}, {"type": "redacted_thinking", "data": "d"},
        {"type": "thinking", "thinking": "XY", "signature": "s2"}, {"type": "text", "text": "hi", "citations": None}]


def test_a_get_to_messages_is_told_to_post_to_messages(gw: RunningGateway) -> None:
    """The 405 names the path the client used (`/v1/messages`), not the chat endpoint the request becomes."""
    response = httpx.get(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY}, timeout=10)
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert body["error"]["message"] == "use POST for /v1/messages", body
