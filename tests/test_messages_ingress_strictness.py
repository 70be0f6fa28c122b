"""`/v1/messages` refuses what Anthropic refuses, in Anthropic's words, rather than changing the request or the error.

Two defects, each against a real gateway in front of the OpenAI, Anthropic and Gemini mocks, reached by the official
`anthropic` SDK:

* A message with empty content (`[]`, `""`) was left out of the chat request: `[user x, assistant y, user []]`
  reached the upstream as `[user x, assistant y]` (an Anthropic upstream takes `y` as a prefill), `[user x,
  assistant [], user z]` as two user turns in a row (joined into one by an Anthropic upstream), an empty first turn
  made the assistant begin the conversation, and a lone empty user message got a 400 naming `messages`. Anthropic
  answers a 400 on the message ("all messages must have non-empty content except for the optional final assistant
  message"): so does the gateway now, naming `messages.N.content`, and sends nothing upstream.
* Every 400 whose text held `` `user` ``, `` `stop` `` or `` `parallel_tool_calls` `` had it replaced by the Messages
  field's name, the gateway's own wording included ("`messages.0.role` must be `metadata.user_id` or `assistant`").
  Only a target's refusal of the chat field the ingress wrote is renamed now.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-strictness"
GEMINI_KEY = "gemini-strictness-key"
TOOL: Any = {"name": "echo", "description": "Echo a text",
             "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
EMPTY = "all messages must have non-empty content except for the optional final assistant message"


def _policy(openai_url: str, anthropic_url: str, gemini_url: str) -> str:
    timeouts = "{connect_s: 1, first_byte_s: 3, idle_s: 3, total_s: 20}"
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY, timeouts: {timeouts}}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY, timeouts: {timeouts}}}
          gemini: {{kind: gemini, base_url: {gemini_url}, api_key_env: GEMINI_KEY, timeouts: {timeouts}}}
        models:
          gpt: {{provider: openai, model: mock-model}}
          claude: {{provider: claude, model: claude-mock}}
          gem-tool: {{provider: gemini, model: fault-echo-tool}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: MockAnthropic, gemini: MockGemini) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url, claude_mock.base_url, gemini.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY,
                              "GEMINI_KEY": GEMINI_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def sdk(gw: RunningGateway, upstream: MockUpstream, claude_mock: MockAnthropic,
        gemini: MockGemini) -> Iterator[anthropic.Anthropic]:
    upstream.clear()
    claude_mock.clear()
    gemini.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


def _refused(call: Any) -> str:
    """The message of the 400 the SDK raised, after checking its envelope's type."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        call()
    body: Any = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    return str(body["error"]["message"])


def _sent(mock: MockUpstream) -> list[dict[str, Any]]:
    """The bodies the upstream received for completions (not `/models` or the like)."""
    return [r.json for r in mock.requests if r.method == "POST" and isinstance(r.json, dict)]


# -- empty content -----------------------------------------------------------------------------------------------

EMPTY_CASES: dict[str, tuple[list[dict[str, Any]], int]] = {
    "last user turn []": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                           {"role": "user", "content": []}], 2),
    "first user turn []": ([{"role": "user", "content": []}, {"role": "assistant", "content": "y"},
                            {"role": "user", "content": "z"}], 0),
    "middle assistant turn []": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": []},
                                  {"role": "user", "content": "z"}], 1),
    "lone user turn []": ([{"role": "user", "content": []}], 0),
    "last user turn empty string": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                     {"role": "user", "content": ""}], 2),
    "middle assistant turn empty string": ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""},
                                            {"role": "user", "content": "z"}], 1),
}


@pytest.mark.parametrize("model", ["gpt", "claude"])
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_a_message_with_empty_content_is_a_400_naming_it(
    sdk: anthropic.Anthropic, upstream: MockUpstream, claude_mock: MockAnthropic, model: str, case: str,
) -> None:
    messages, index = EMPTY_CASES[case]
    message = _refused(lambda: sdk.messages.create(model=model, max_tokens=5, messages=messages))  # type: ignore[arg-type]
    assert message == f"`messages.{index}.content`: {EMPTY}", message
    assert _sent(upstream) == [] and _sent(claude_mock) == []  # nothing went upstream, changed or not


@pytest.mark.parametrize("case", ["middle assistant turn []", "lone user turn []", "last user turn empty string"])
def test_count_tokens_refuses_empty_content_too(sdk: anthropic.Anthropic, case: str) -> None:
    messages, index = EMPTY_CASES[case]
    message = _refused(lambda: sdk.messages.count_tokens(model="gpt", messages=messages))  # type: ignore[arg-type]
    assert message == f"`messages.{index}.content`: {EMPTY}", message


@pytest.mark.parametrize("content", [[], ""], ids=["[]", "empty string"])
def test_an_empty_final_assistant_message_is_allowed(sdk: anthropic.Anthropic, upstream: MockUpstream,
                                                     claude_mock: MockAnthropic, content: Any) -> None:
    """Anthropic's one exception: the final assistant message may be empty (a prefill of nothing)."""
    messages: Any = [{"role": "user", "content": "x"}, {"role": "assistant", "content": content}]
    assert sdk.messages.create(model="gpt", max_tokens=5, messages=messages).content
    [sent] = _sent(upstream)
    assert sent["messages"][0] == {"role": "user", "content": "x"}, sent
    assert sdk.messages.create(model="claude", max_tokens=5, messages=messages).content
    [sent] = _sent(claude_mock)
    assert sent["messages"] == [{"role": "user", "content": [{"type": "text", "text": "x"}]}], sent


VALID = [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "text", "text": "y"}]},
         {"role": "user", "content": [{"type": "text", "text": "z"}]}]


def test_a_valid_conversation_reaches_an_openai_upstream_unaltered(sdk: anthropic.Anthropic,
                                                                   upstream: MockUpstream) -> None:
    sdk.messages.create(model="gpt", max_tokens=5, messages=VALID)  # type: ignore[arg-type]
    [sent] = _sent(upstream)
    assert sent["messages"] == [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                                {"role": "user", "content": [{"type": "text", "text": "z"}]}], sent


def test_a_valid_conversation_reaches_an_anthropic_upstream_unaltered(sdk: anthropic.Anthropic,
                                                                      claude_mock: MockAnthropic) -> None:
    sdk.messages.create(model="claude", max_tokens=5, messages=VALID)  # type: ignore[arg-type]
    [sent] = _sent(claude_mock)
    assert sent["messages"] == [{"role": role, "content": [{"type": "text", "text": text}]}
                                for role, text in (("user", "x"), ("assistant", "y"), ("user", "z"))], sent


# -- error wording ----------------------------------------------------------------------------------------------

def test_the_ingress_role_error_keeps_its_own_wording(sdk: anthropic.Anthropic) -> None:
    message = _refused(lambda: sdk.messages.create(model="gpt", max_tokens=5, messages=[
        {"role": "system", "content": "x"}]))  # type: ignore[list-item]
    assert message == "`messages.0.role` must be `user` or `assistant`", message


@pytest.mark.parametrize("field", ["user", "stop", "parallel_tool_calls"])
def test_a_top_level_chat_field_is_refused_by_its_own_name(sdk: anthropic.Anthropic, upstream: MockUpstream,
                                                           field: str) -> None:
    """A client that sends the chat field itself is told that field is not supported, not the Messages one."""
    message = _refused(lambda: sdk.messages.create(model="gpt", max_tokens=5, extra_body={field: "u1"},
                                                   messages=[{"role": "user", "content": "x"}]))
    assert message == f"`{field}` is not supported by this gateway's /v1/messages", message
    assert _sent(upstream) == []


def test_a_targets_refusal_is_still_named_by_the_field_the_client_sent(sdk: anthropic.Anthropic,
                                                                      gemini: MockGemini) -> None:
    """Gemini cannot forbid parallel calls: its translator refuses `parallel_tool_calls`, which the ingress wrote
    from `tool_choice.disable_parallel_tool_use`; the client is told of the latter."""
    message = _refused(lambda: sdk.messages.create(
        model="gem-tool", max_tokens=50, tools=[TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=[{"role": "user", "content": "echo hi"}]))
    assert message.startswith("`tool_choice.disable_parallel_tool_use` is not supported by "), message
    assert "parallel_tool_calls" not in message.replace("disable_parallel_tool_use", ""), message
