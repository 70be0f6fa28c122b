"""`/v1/messages` fields of the wrong type are a 400 naming the field, as Anthropic's own API answers them.

They were dropped (`tool_choice: "auto"`, `metadata.user_id: 5`), sent on with values made up on the way (a
`tool_use` without `id` as the id "None", `tool_choice: {"type": "bogus"}` as a function named null) or sent on as
they were (`top_k: "x"`, a tool's `description: 5`). Each is refused before any upstream is called, through the
raw HTTP client and the Anthropic SDK; the well-formed variants still reach an OpenAI-compatible upstream and an
Anthropic one as before.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream, RecordedRequest

ANTHROPIC_KEY = "sk-ant-field-types"
USER = {"role": "user", "content": "hi"}
BASE: dict[str, Any] = {"model": "gpt", "max_tokens": 2048, "messages": [USER]}
TOOL = {"name": "echo", "description": "Echo a text", "input_schema": {"type": "object"}}


def _tool_turns(call: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A history with one tool call (`call`, with the fields of a `tool_use` block to change) and its result."""
    use = {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {"text": "a"}, **call}
    answer = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a", **result}
    return {"messages": [USER, {"role": "assistant", "content": [{k: v for k, v in use.items() if v is not None}]},
                         {"role": "user", "content": [{k: v for k, v in answer.items() if v is not None}]}],
            "tools": [TOOL]}


# (what replaces the base request's fields, the field the 400 names)
MISTYPED: dict[str, tuple[dict[str, Any], str]] = {
    "tool_use without id": (_tool_turns({"id": None}, {}), "messages.1.content.0.id"),
    "tool_use id a number": (_tool_turns({"id": 7}, {}), "messages.1.content.0.id"),
    "tool_use without name": (_tool_turns({"name": None}, {}), "messages.1.content.0.name"),
    "tool_use input a string": (_tool_turns({"input": "a"}, {}), "messages.1.content.0.input"),
    "tool_result without tool_use_id": (_tool_turns({}, {"tool_use_id": None}), "messages.2.content.0.tool_use_id"),
    "tool_choice an unknown type": ({"tool_choice": {"type": "bogus"}}, "tool_choice.type"),
    "tool_choice without type": ({"tool_choice": {}}, "tool_choice"),
    "tool_choice a string": ({"tool_choice": "auto"}, "tool_choice"),
    "tool_choice tool without name": ({"tool_choice": {"type": "tool"}}, "`name`"),
    "tool_choice tool name a number": ({"tool_choice": {"type": "tool", "name": 5}}, "tool_choice.name"),
    "disable_parallel_tool_use a string": ({"tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
                                           "tool_choice.disable_parallel_tool_use"),
    "metadata a number": ({"metadata": 5}, "metadata"),
    "metadata.user_id a number": ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    "tool description a number": ({"tools": [{**TOOL, "description": 5}]}, "tools.0.description"),
    "tool input_schema a string": ({"tools": [TOOL, {**TOOL, "input_schema": "x"}]}, "tools.1.input_schema"),
    "tool name a number": ({"tools": [{**TOOL, "name": 5}]}, "tools.0.name"),
    "top_k a string": ({"top_k": "x"}, "top_k"),
    "top_k negative": ({"top_k": -1}, "top_k"),
    "top_k a fraction": ({"top_k": 1.5}, "top_k"),
    "thinking a string": ({"thinking": "on"}, "thinking"),
    "thinking enabled without budget": ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    "thinking budget below 1024": ({"thinking": {"type": "enabled", "budget_tokens": 1023}}, "thinking.budget_tokens"),
    "thinking budget a string": ({"thinking": {"type": "enabled", "budget_tokens": "2048"}}, "thinking.budget_tokens"),
    "thinking type a number": ({"thinking": {"type": 1}}, "thinking.type"),
}


def _policy(openai_url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          gpt: {{provider: openai, model: mock-model}}
          claude: {{provider: claude, model: claude-mock}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: MockAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def sdk(gw: RunningGateway, claude_mock: MockAnthropic) -> Iterator[anthropic.Anthropic]:
    claude_mock.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers={"x-api-key": FULL_KEY}, timeout=10)


def _last(mock: MockUpstream) -> RecordedRequest:
    return mock.requests[-1]


def _refusal(response: httpx.Response) -> str:
    """The message of an Anthropic-enveloped 400."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
@pytest.mark.parametrize("alias", ["gpt", "claude"])
@pytest.mark.parametrize("case", list(MISTYPED))
def test_a_mistyped_field_is_a_400_naming_it(case: str, alias: str, path: str, gw: RunningGateway,
                                              upstream: MockUpstream, claude_mock: MockAnthropic) -> None:
    claude_mock.clear()
    fields, named = MISTYPED[case]
    message = _refusal(_post(gw, path, {**BASE, **fields, "model": alias}))
    assert named in message, message
    assert not upstream.requests and not claude_mock.requests


@pytest.mark.parametrize("case", ["tool_use without id", "tool_choice an unknown type", "metadata.user_id a number",
                                  "tool input_schema a string", "top_k a string", "thinking budget below 1024"])
def test_the_sdk_raises_its_bad_request_error_naming_the_field(
        case: str, sdk: anthropic.Anthropic, upstream: MockUpstream, claude_mock: MockAnthropic) -> None:
    fields, named = MISTYPED[case]
    request = {**BASE, **fields}
    with pytest.raises(anthropic.BadRequestError) as caught:  # every field as `extra_body`: the SDK checks no types
        sdk.messages.create(model="gpt", max_tokens=request.pop("max_tokens"), messages=request.pop("messages"),
                            extra_body={key: value for key, value in request.items() if key != "model"})
    assert named in caught.value.message
    assert not upstream.requests and not claude_mock.requests


# -- the well-formed variants are forwarded as before --------------------------------------------------------------


@pytest.mark.parametrize(("choice", "chat", "parallel"), [
    ({"type": "auto"}, "auto", None),
    ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
    ({"type": "tool", "name": "echo", "disable_parallel_tool_use": False},
     {"type": "function", "function": {"name": "echo"}}, None),
    ({"type": "none"}, "none", None),
])
def test_each_tool_choice_reaches_both_upstreams(choice: dict[str, Any], chat: Any, parallel: bool | None,
                                                 sdk: anthropic.Anthropic, upstream: MockUpstream,
                                                 claude_mock: MockAnthropic) -> None:
    sdk.messages.create(model="gpt", max_tokens=100, messages=[USER], tools=[TOOL],
                        tool_choice=choice)
    sent = upstream.requests[-1].json
    assert sent["tool_choice"] == chat and sent.get("parallel_tool_calls") == parallel
    sdk.messages.create(model="claude", max_tokens=100, messages=[USER], tools=[TOOL],
                        tool_choice=choice)
    sent_to_claude = claude_mock.requests[-1].json
    assert sent_to_claude["tool_choice"] == {k: v for k, v in choice.items() if v is not False}


def test_tools_tool_calls_and_metadata_reach_both_upstreams(
        sdk: anthropic.Anthropic, upstream: MockUpstream, claude_mock: MockAnthropic) -> None:
    turns = _tool_turns({}, {})
    tools = [TOOL, {"name": "bare"}, {"name": "quiet", "description": None, "input_schema": None}]
    for alias in ("gpt", "claude"):
        sdk.messages.create(model=alias, max_tokens=100, messages=turns["messages"], tools=tools,
                            metadata={"user_id": "user-1"})
    sent = upstream.requests[-1].json
    assert sent["user"] == "user-1"
    assert [tool["function"] for tool in sent["tools"]] == [
        {"name": "echo", "description": "Echo a text", "parameters": {"type": "object"}},
        {"name": "bare", "parameters": {"type": "object"}}, {"name": "quiet", "parameters": {"type": "object"}}]
    assert sent["messages"][1]["tool_calls"][0]["id"] == "toolu_1"
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "a"}
    sent_to_claude = claude_mock.requests[-1].json
    assert sent_to_claude["metadata"] == {"user_id": "user-1"}
    assert sent_to_claude["messages"][1]["content"][0]["id"] == "toolu_1"
    assert sent_to_claude["messages"][2]["content"][0]["tool_use_id"] == "toolu_1"


@pytest.mark.parametrize("metadata", [{}, {"user_id": None}, None])
def test_metadata_without_a_user_sets_none(metadata: Any, gw: RunningGateway, upstream: MockUpstream) -> None:
    assert _post(gw, "/v1/messages", {**BASE, "metadata": metadata}).status_code == 200
    assert "user" not in upstream.requests[-1].json


@pytest.mark.parametrize("thinking", [
    {"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}, None,
])
def test_top_k_and_thinking_reach_anthropic_only(thinking: Any, sdk: anthropic.Anthropic, upstream: MockUpstream,
                                                 claude_mock: MockAnthropic) -> None:
    extra = {"top_k": 0, "thinking": thinking}
    for alias in ("gpt", "claude"):
        sdk.messages.create(model=alias, max_tokens=2048, messages=[USER], extra_body=extra)
    assert "top_k" not in _last(upstream).json and "thinking" not in _last(upstream).json
    assert _last(claude_mock).json["top_k"] == 0 and _last(claude_mock).json.get("thinking") == thinking


def test_a_newer_thinking_type_is_forwarded_as_it_is(gw: RunningGateway, upstream: MockUpstream,
                                                     claude_mock: MockAnthropic) -> None:
    """`adaptive` (Anthropic SDK 2.17's, with `display`) is not the gateway's to refuse: an Anthropic upstream
    gets it as sent (this mock knows only `enabled` and `disabled`, and refuses it as an older API would) and an
    OpenAI-compatible one never sees `thinking`."""
    claude_mock.clear()
    thinking = {"type": "adaptive", "display": "summarized"}
    assert _post(gw, "/v1/messages", {**BASE, "thinking": thinking}).status_code == 200
    assert "thinking" not in _last(upstream).json
    refused = _post(gw, "/v1/messages", {**BASE, "model": "claude", "thinking": thinking})
    assert _last(claude_mock).json["thinking"] == thinking
    assert "Input tag does not match" in _refusal(refused)  # Anthropic's own answer, relayed


@pytest.mark.parametrize(("fields", "named"), [
    ({"temperature": 1.5}, "temperature"),  # Anthropic's range is 0 to 1 (a Chat Completions target takes 2)
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.2}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.budget_tokens"),
])
@pytest.mark.parametrize("alias", ["gpt", "claude"])
def test_a_value_out_of_anthropics_range_is_a_400(fields: dict[str, Any], named: str, alias: str,
                                                   gw: RunningGateway, upstream: MockUpstream,
                                                   claude_mock: MockAnthropic) -> None:
    claude_mock.clear()
    message = _refusal(_post(gw, "/v1/messages", {**BASE, **fields, "model": alias}))
    assert named in message, message
    assert not upstream.requests and not claude_mock.requests
