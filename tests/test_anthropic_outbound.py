"""What the gateway sends Anthropic's Messages API, and what it makes of Anthropic's answers, through a running gateway.

The Anthropic upstream is `StrictAnthropic` (the mock with the real API's stricter refusals: empty text blocks,
whitespace-only stop sequences, image types, `temperature` with `top_p`); the OpenAI-compatible upstreams are the
session's `MockUpstream`. Clients are the official `openai` and `anthropic` SDKs; what reaches Anthropic is checked
with the `anthropic` SDK's request types.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pydantic
import pytest
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import StrictAnthropic
from tests.support.mock_upstream import MockUpstream, RecordedRequest

ANTHROPIC_KEY = "sk-ant-outbound"
REPLY = MockUpstream(None).reply_text
_anthropic_request = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)


def _policy(openai_url: str, anthropic_url: str) -> str:
    azure_url = openai_url.removesuffix("/v1")
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          openai-no-usage: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY,
                            stream_usage: false}}
          azure-old: {{kind: azure, base_url: {azure_url}, api_key_env: MOCK_UPSTREAM_KEY,
                      azure: {{api_version: "2024-06-01"}}}}
          azure: {{kind: azure, base_url: {azure_url}, api_key_env: MOCK_UPSTREAM_KEY,
                  azure: {{api_version: "2024-10-21"}}}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude: {{provider: claude, model: claude-mock}}
          gpt: {{provider: openai, model: mock-model}}
          gpt-top-k:
            targets: [{{provider: openai, model: mock-model, extra_body: {{top_k: 5}}}}]
          gpt-no-usage: {{provider: openai-no-usage, model: mock-model}}
          azure-old: {{provider: azure-old, model: mock-model}}
          azure: {{provider: azure, model: mock-model}}
          small:
            targets: [{{provider: claude, model: odd-context-limit}}]
            context_fallback: large
          large: {{provider: openai, model: mock-model}}
          claude-limit: {{provider: claude, model: odd-context-limit}}
          claude-200-overloaded: {{provider: claude, model: odd-200-overloaded}}
          claude-200-invalid: {{provider: claude, model: odd-200-invalid}}
          claude-200-error-only: {{provider: claude, model: odd-200-error-only}}
          claude-200-empty: {{provider: claude, model: odd-200-empty}}
          claude-200-then-gpt:
            targets: [{{provider: claude, model: odd-200-empty}}, {{provider: openai, model: mock-model}}]
          claude-overloaded-then-gpt:
            targets: [{{provider: claude, model: odd-200-overloaded}}, {{provider: openai, model: mock-model}}]
          claude-then-gpt:
            targets: [{{provider: claude, model: claude-mock}}, {{provider: openai, model: mock-model}}]
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[StrictAnthropic]:
    with StrictAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: StrictAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, claude_mock: StrictAnthropic) -> Iterator[openai.OpenAI]:
    claude_mock.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


@pytest.fixture
def sdk(gw: RunningGateway, claude_mock: StrictAnthropic) -> Iterator[anthropic.Anthropic]:
    claude_mock.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as messages_client:
        yield messages_client


def sent_to_claude(record: RecordedRequest) -> dict[str, Any]:
    """The body Anthropic got, validated with the `anthropic` SDK's request types."""
    body = record.json
    assert isinstance(body, dict)
    _validated(_anthropic_request.validate_python({**body, "stream": False}))
    return body


def _validated(value: Any) -> Any:
    """Consume what pydantic validates lazily (the SDK's `Iterable` fields), so that every item is checked."""
    if isinstance(value, dict):
        return {k: _validated(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return [_validated(v) for v in value]


# -- 1. Anthropic's "exceed context limit" is a context window overflow -------------------------------------------


def test_anthropics_context_limit_wording_goes_to_the_context_fallback(client: openai.OpenAI) -> None:
    """"input length and `max_tokens` exceed context limit: ..." (Anthropic's most common overflow) was a plain
    400: `context_fallback` never fired."""
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": "a long prompt"}], max_tokens=4096)
    assert raw.headers["x-gateway-fallback-reason"] == "context_length"
    assert raw.parse().choices[0].message.content == REPLY
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude-limit", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "context_length_exceeded"


# -- 2. the `/v1/messages` ingress sends an OpenAI-compatible upstream only what it takes -------------------------

THINK: Any = {"type": "enabled", "budget_tokens": 1024}
TOP_K = {"top_k": 5}  # (no longer a parameter of the SDK's `create`: the API still takes it)


@pytest.mark.parametrize("alias", ["gpt", "azure", "azure-old", "gpt-no-usage"])
def test_messages_only_fields_never_reach_an_openai_compatible_upstream(
        alias: str, sdk: anthropic.Anthropic, upstream: MockUpstream) -> None:
    """`top_k` and `thinking` (Claude Code sends `thinking` routinely) went to OpenAI and Azure as they were
    ("Unrecognized request argument supplied: top_k"); and `stream_options` was set on every stream, so that an Azure
    API version before 2024-09-01 and a `stream_usage: false` provider got it too."""
    upstream.clear()
    message = sdk.messages.create(model=alias, max_tokens=2048, thinking=THINK, extra_body=TOP_K,
                                  messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    with sdk.messages.stream(model=alias, max_tokens=2048, thinking=THINK, extra_body=TOP_K,
                             messages=[{"role": "user", "content": "hi"}]) as stream:
        final = stream.get_final_message()
    assert "".join(block.text for block in final.content if block.type == "text") == REPLY
    assert final.usage.output_tokens > 0  # the upstream's usage, or the gateway's own count
    sent, streamed = (record.json for record in upstream.requests[-2:])
    for body in (sent, streamed):
        assert "top_k" not in body and "thinking" not in body
        assert not any(key.startswith("_gateway") for key in body)
    if alias in ("azure-old", "gpt-no-usage"):
        assert "stream_options" not in streamed
    else:  # the provider's own request for the usage chunk, as for a Chat Completions client
        assert streamed["stream_options"] == {"include_usage": True}
        assert final.usage.output_tokens == 20


def test_messages_only_fields_still_reach_anthropic(sdk: anthropic.Anthropic, claude_mock: StrictAnthropic,
                                                    upstream: MockUpstream) -> None:
    message = sdk.messages.create(model="claude", max_tokens=2048, thinking=THINK, extra_body=TOP_K,
                                  messages=[{"role": "user", "content": "hi"}])
    assert [block.type for block in message.content] == ["thinking", "text"]
    body = sent_to_claude(claude_mock.requests[-1])
    assert body["top_k"] == 5 and body["thinking"] == THINK
    assert not any(key.startswith("_gateway") for key in body)
    # a fallback from Anthropic to OpenAI: the same request, without them
    claude_mock.override = "fault-status-529"
    try:
        upstream.clear()
        sdk.messages.create(model="claude-then-gpt", max_tokens=2048, thinking=THINK, extra_body=TOP_K,
                            messages=[{"role": "user", "content": "hi"}])
    finally:
        claude_mock.override = None
    assert claude_mock.requests[-1].json["top_k"] == 5
    assert "top_k" not in upstream.requests[-1].json and "thinking" not in upstream.requests[-1].json


def test_a_targets_own_top_k_is_kept(sdk: anthropic.Anthropic, client: openai.OpenAI, upstream: MockUpstream) -> None:
    """Only what a `/v1/messages` client sent is removed: a target's `extra_body` (for vLLM, say) stays, and a Chat
    Completions request is sent as it is."""
    sdk.messages.create(model="gpt-top-k", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert upstream.requests[-1].json["top_k"] == 5
    client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "hi"}],
                                   extra_body={"top_k": 7})
    assert upstream.requests[-1].json["top_k"] == 7


# -- 3. nothing Anthropic refuses: empty text, whitespace stop sequences, image types, temperature with top_p -------

PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "echo", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


def test_empty_and_whitespace_text_is_left_out(client: openai.OpenAI, claude_mock: StrictAnthropic) -> None:
    """A vLLM or Ollama history: `content: ""`, `content: []`, empty text parts, `"\\n\\n"` beside `tool_calls`, a
    whitespace-only system message: Anthropic refused them ("text content blocks must be non-empty")."""
    messages: list[Any] = [
        {"role": "system", "content": "  "},
        {"role": "user", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "call echo"}]},
        {"role": "assistant", "content": "\n\n", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "echo", "arguments": '{"text": "x"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": []},
        {"role": "assistant", "content": [{"type": "text", "text": " "}]},
        {"role": "user", "content": "and now?"},
    ]
    answer = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == REPLY
    body = sent_to_claude(claude_mock.requests[-1])
    assert "system" not in body
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "call echo"}]},
        {"role": "assistant",
         "content": [{"type": "tool_use", "id": "call_1", "name": "echo", "input": {"text": "x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1"},
                                     {"type": "text", "text": "and now?"}]},
    ]


@pytest.mark.parametrize("where", ["between", "last", "first"])
def test_an_empty_user_turn_that_cannot_go_is_refused_for_the_next_target(
        where: str, client: openai.OpenAI, claude_mock: StrictAnthropic, upstream: MockUpstream) -> None:
    """Dropping it would join two assistant turns (or turn the request into a prefill): never done; refused as
    `Unsupported`, so that routing tries the next target."""
    turns: dict[str, list[Any]] = {
        "between": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                    {"role": "user", "content": " "}, {"role": "assistant", "content": "two"},
                    {"role": "user", "content": "go on"}],
        "last": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                 {"role": "user", "content": [{"type": "text", "text": "\n"}]}],
        "first": [{"role": "user", "content": ""}, {"role": "assistant", "content": "one"},
                  {"role": "user", "content": "hi"}],
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", messages=turns[where])
    assert caught.value.code == "unsupported_parameter" and "no content" in caught.value.message
    assert not claude_mock.requests
    upstream.clear()
    answer = client.chat.completions.create(model="claude-then-gpt", messages=turns[where])
    assert answer.choices[0].message.content == REPLY and upstream.requests[-1].json["messages"] == turns[where]


def test_whitespace_stop_sequences_are_dropped(client: openai.OpenAI, claude_mock: StrictAnthropic) -> None:
    client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}],
                                   stop=["\n", "END", " "])
    assert sent_to_claude(claude_mock.requests[-1])["stop_sequences"] == ["END"]
    client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], stop="\n\n")
    assert "stop_sequences" not in sent_to_claude(claude_mock.requests[-1])


def test_image_types(client: openai.OpenAI, claude_mock: StrictAnthropic, upstream: MockUpstream) -> None:
    """`image/jpg` (not a registered type) is sent as `image/jpeg`; a type Anthropic does not take is `Unsupported`
    (the next target is tried), not Anthropic's 400."""
    def ask(model: str, media: str) -> Any:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:{media};base64,{PIXEL}"}}]}])

    ask("claude", "image/jpg")
    image = sent_to_claude(claude_mock.requests[-1])["messages"][0]["content"][1]
    assert image["source"] == {"type": "base64", "media_type": "image/jpeg", "data": PIXEL}
    ask("claude", "IMAGE/WEBP")
    assert claude_mock.requests[-1].json["messages"][0]["content"][1]["source"]["media_type"] == "image/webp"
    claude_mock.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        ask("claude", "image/bmp")
    assert caught.value.code == "unsupported_parameter" and "image/bmp" in caught.value.message
    assert not claude_mock.requests
    assert ask("claude-then-gpt", "image/bmp").choices[0].message.content == REPLY


def test_top_p_is_dropped_beside_temperature(client: openai.OpenAI, claude_mock: StrictAnthropic) -> None:
    """Claude Sonnet 4.5 and later refuse `temperature` and `top_p` together: `temperature` is sent."""
    client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}],
                                   temperature=0.2, top_p=0.9)
    body = sent_to_claude(claude_mock.requests[-1])
    assert body["temperature"] == 0.2 and "top_p" not in body
    client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}], top_p=0.9)
    assert sent_to_claude(claude_mock.requests[-1])["top_p"] == 0.9


# -- 4. a 200 answer that is no Message is an error, never an empty success ----------------------------------------


@pytest.mark.parametrize(("alias", "error", "status"), [
    ("claude-200-overloaded", openai.InternalServerError, 503),
    ("claude-200-invalid", openai.BadRequestError, 400),
    ("claude-200-error-only", openai.InternalServerError, 502),
    ("claude-200-empty", openai.InternalServerError, 502),
])
def test_a_200_that_is_no_message_is_an_error(alias: str, error: type[openai.APIStatusError], status: int,
                                              client: openai.OpenAI) -> None:
    """`{"type": "error", ...}`, `{"error": ...}` or `{}` with HTTP 200 gave the client a 200 with empty content and
    `model: null`."""
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=alias, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    if alias == "claude-200-overloaded":
        assert "overloaded" in caught.value.message


@pytest.mark.parametrize("alias", ["claude-200-then-gpt", "claude-overloaded-then-gpt"])
def test_a_200_that_is_no_message_falls_back(alias: str, client: openai.OpenAI, sdk: anthropic.Anthropic) -> None:
    raw = client.chat.completions.with_raw_response.create(model=alias, messages=[{"role": "user", "content": "hi"}])
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-gateway-fallback-reason"]
    message = sdk.messages.create(model=alias, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text == REPLY


# -- 5. `safety_identifier` and `prompt_cache_key` -------------------------------------------------------------------


def test_safety_identifier_and_prompt_cache_key(client: openai.OpenAI, claude_mock: StrictAnthropic) -> None:
    """Both were a 400 ("not supported by Anthropic's Messages API") while the deprecated `user` was translated:
    `safety_identifier` is `metadata.user_id` (before `user`, which it replaces), `prompt_cache_key` (OpenAI's own
    cache routing) is left out."""
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="claude", messages=hi, safety_identifier="hashed-user-1",
                                   prompt_cache_key="conversation-9")
    body = sent_to_claude(claude_mock.requests[-1])
    assert body["metadata"] == {"user_id": "hashed-user-1"} and "prompt_cache_key" not in body
    client.chat.completions.create(model="claude", messages=hi, safety_identifier="hashed-user-1", user="legacy")
    assert sent_to_claude(claude_mock.requests[-1])["metadata"] == {"user_id": "hashed-user-1"}
    client.chat.completions.create(model="claude", messages=hi, user="legacy")
    assert sent_to_claude(claude_mock.requests[-1])["metadata"] == {"user_id": "legacy"}
