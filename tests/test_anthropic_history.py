"""Histories Anthropic's Messages API refused as the gateway translated them, through a running gateway.

* A request with only system (or developer) messages went as `messages: []`: Anthropic's 400 reached the client as
  an upstream error, and routing never tried a target that answers it (OpenAI does). It is now `Unsupported`.
* A tool call without an id was sent as `toolu_<message>_<position>`, and the result answering it (no
  `tool_call_id`, or an empty one) with an empty `tool_use_id`: results without ids now answer the calls without ids
  of the turn before them, in order, and one with no such call left is `Unsupported`.
* Older gateway versions gave Gemini's tool calls `call_0`, `call_1`... in every answer, so a history repeats ids:
  they were sent as they were (Messages refuses a repeated `tool_use` id). A later call with a taken id is now sent
  as `<id>_<n>`, and the results after it with that id answer it.

The Anthropic upstream is `StrictAnthropic` plus the real API's checks of tool ids (`HistoryAnthropic`, below); what
it got is checked whole, and with the `anthropic` SDK's request types. Clients are the official `openai` SDK.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest
from aiohttp import web
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import StrictAnthropic, anthropic_error
from tests.support.mock_upstream import _RECORD, MockUpstream, _send

ANTHROPIC_KEY = "sk-ant-history"
REPLY = MockUpstream(None).reply_text
_anthropic_request = pydantic.TypeAdapter(MessageCreateParamsNonStreaming)


def _tool_id_problem(body: dict[str, Any]) -> str | None:
    """The real API's refusals of tool ids (in its words): a repeated `tool_use` id, and a `tool_result` whose id
    names no `tool_use` of the message just before it."""
    seen: set[Any] = set()
    previous: set[Any] = set()
    for index, message in enumerate(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        blocks = [block for block in content if isinstance(block, dict)] if isinstance(content, list) else []
        for position, block in enumerate(blocks):
            if block.get("type") == "tool_use":
                if block.get("id") in seen:
                    return f"messages.{index}.content.{position}: `tool_use` ids must be unique"
                seen.add(block.get("id"))
            if block.get("type") == "tool_result" and block.get("tool_use_id") not in previous:
                return (f"messages.{index}.content.{position}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message.")
        previous = {block.get("id") for block in blocks if block.get("type") == "tool_use"}
    return None


class HistoryAnthropic(StrictAnthropic):
    """`StrictAnthropic` with `_tool_id_problem`'s checks."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_RECORD].json
        problem = _tool_id_problem(body) if isinstance(body, dict) else None
        if problem is not None:
            return await _send(request, anthropic_error(400, problem))
        return await super()._messages(request)


def _policy(openai_url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
          claude-b: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude: {{provider: claude, model: claude-mock}}
          claude-then-gpt:
            targets: [{{provider: claude, model: claude-mock}}, {{provider: openai, model: mock-model}}]
          claude-twice:
            targets: [{{provider: claude, model: claude-mock}}, {{provider: claude-b, model: claude-mock}}]
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[HistoryAnthropic]:
    with HistoryAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: HistoryAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, claude_mock: HistoryAnthropic, upstream: MockUpstream) -> Iterator[openai.OpenAI]:
    claude_mock.clear()
    upstream.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def sent_to_claude(claude_mock: HistoryAnthropic) -> list[Any]:
    """The `messages` of the one request Anthropic got, its body validated with the `anthropic` SDK's types."""
    assert len(claude_mock.requests) == 1
    body = claude_mock.requests[0].json
    assert isinstance(body, dict)
    _validated(_anthropic_request.validate_python({**body, "stream": False}))
    messages: list[Any] = body["messages"]
    return messages


def _validated(value: Any) -> Any:
    """Consume what pydantic validates lazily (the SDK's `Iterable` fields), so that every item is checked."""
    if isinstance(value, dict):
        return {k: _validated(v) for k, v in value.items()}
    if isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return value
    return [_validated(v) for v in value]


TOOLS: Any = [{"type": "function", "function": {
    "name": "echo", "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]


def call(text: str, id_: str | None = None) -> dict[str, Any]:
    """A Chat Completions tool call of `echo` (`id_` None: no `id` key at all)."""
    out: dict[str, Any] = {"type": "function", "function": {"name": "echo", "arguments": f'{{"text": "{text}"}}'}}
    return out if id_ is None else {"id": id_, **out}


def tool_use(id_: str, text: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": id_, "name": "echo", "input": {"text": text}}


def result(content: str, id_: str | None = None) -> dict[str, Any]:
    """A `tool` message (`id_` None: no `tool_call_id` key at all)."""
    return {"role": "tool", "content": content, **({} if id_ is None else {"tool_call_id": id_})}


def tool_result(id_: str, content: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": id_, "content": content}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# -- 1. only system and developer messages ---------------------------------------------------------------------------

SYSTEM_ONLY: dict[str, list[Any]] = {
    "system": [{"role": "system", "content": "Say hello."}],
    "system-and-developer": [{"role": "system", "content": "You are terse."},
                             {"role": "developer", "content": [{"type": "text", "text": "Say hello."}]}],
    "system-and-empty-turns": [{"role": "system", "content": "Say hello."}, {"role": "assistant", "content": ""}],
}


@pytest.mark.parametrize("case", list(SYSTEM_ONLY))
def test_a_request_with_only_system_messages_is_refused_for_the_next_target(
        case: str, client: openai.OpenAI, claude_mock: HistoryAnthropic, upstream: MockUpstream) -> None:
    """OpenAI answers a system prompt alone; Messages needs a turn, and none is made up (that would be invented
    text): `Unsupported`, so an OpenAI target behind Claude answers it, and with no such target the client's 400
    names the request's problem, not Anthropic's "messages: Field required"."""
    messages = SYSTEM_ONLY[case]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", messages=messages)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "messages"
    assert "only system or developer messages" in caught.value.message
    assert not claude_mock.requests
    raw = client.chat.completions.with_raw_response.create(model="claude-then-gpt", messages=messages)
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-gateway-fallback-reason"] == "unsupported"
    assert upstream.requests[-1].json["messages"] == messages and not claude_mock.requests
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude-twice", messages=messages)
    assert "no target of `claude-twice` supports this request (" in caught.value.message
    assert "claude/claude-mock: a request with only system" in caught.value.message
    assert "claude-b/claude-mock: a request with only system" in caught.value.message


# -- 2. tool calls and results without ids -------------------------------------------------------------------------


def test_results_without_ids_answer_the_calls_without_ids_in_order(
        client: openai.OpenAI, claude_mock: HistoryAnthropic) -> None:
    """No `id` key and `id: ""` alike, beside a call with an id whose result comes first; a later turn's calls
    without ids get their own ids, and its results answer them, not the earlier turn's."""
    messages: list[Any] = [
        user("echo a, b and c"),
        {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b", ""), call("c", "call_c")]},
        result("C", "call_c"),
        result("A"),
        result("B", ""),
        {"role": "assistant", "content": "once more", "tool_calls": [call("d"), call("e")]},
        result("D", ""),
        result("E"),
    ]
    answer = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == REPLY
    assert sent_to_claude(claude_mock) == [
        {"role": "user", "content": [{"type": "text", "text": "echo a, b and c"}]},
        {"role": "assistant", "content": [tool_use("toolu_1_0", "a"), tool_use("toolu_1_1", "b"),
                                          tool_use("call_c", "c")]},
        {"role": "user", "content": [tool_result("call_c", "C"), tool_result("toolu_1_0", "A"),
                                     tool_result("toolu_1_1", "B")]},
        {"role": "assistant", "content": [{"type": "text", "text": "once more"}, tool_use("toolu_5_0", "d"),
                                          tool_use("toolu_5_1", "e")]},
        {"role": "user", "content": [tool_result("toolu_5_0", "D"), tool_result("toolu_5_1", "E")]},
    ]


UNPAIRED: dict[str, list[Any]] = {
    "no call without an id": [user("echo a"), {"role": "assistant", "tool_calls": [call("a", "call_a")]},
                              result("A")],
    "one call, two results": [user("echo a"), {"role": "assistant", "tool_calls": [call("a")]},
                              result("A"), result("A again", "")],
    "the call of an earlier turn": [user("echo a"), {"role": "assistant", "tool_calls": [call("a")]},
                                    user("never mind"), {"role": "assistant", "content": "Fine."},
                                    user("so?"), result("A")],
}


@pytest.mark.parametrize("case", list(UNPAIRED))
def test_a_result_without_an_id_that_answers_no_call_is_refused_for_the_next_target(
        case: str, client: openai.OpenAI, claude_mock: HistoryAnthropic, upstream: MockUpstream) -> None:
    """It was sent with `tool_use_id: ""` (Anthropic's 400); no call is guessed for it."""
    messages = UNPAIRED[case]
    where = f"messages.{len(messages) - 1}.tool_call_id"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == where
    assert "without a `tool_call_id`" in caught.value.message
    assert not claude_mock.requests
    answer = client.chat.completions.create(model="claude-then-gpt", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == REPLY and upstream.requests[-1].json["messages"] == messages


# -- 3. repeated tool call ids -------------------------------------------------------------------------------------


def test_repeated_ids_are_made_unique_and_their_results_follow(
        client: openai.OpenAI, claude_mock: HistoryAnthropic) -> None:
    """The history of a Gemini conversation through an older gateway (`call_0` in every turn), then a turn that
    repeats an id within itself and uses, as its own, an id a renamed call took."""
    messages: list[Any] = [
        user("weather in Paris, then the time"),
        {"role": "assistant", "content": None, "tool_calls": [call("paris", "call_0")]},
        result('{"temp_c": 11}', "call_0"),
        {"role": "assistant", "content": None, "tool_calls": [call("time", "call_0"), call("date", "call_1")]},
        result('{"date": "May 1"}', "call_1"),
        result('{"time": "10:00"}', "call_0"),
        {"role": "assistant", "content": "11 degrees, 10:00, May 1."},
        user("and three more"),
        {"role": "assistant", "content": None, "tool_calls": [
            call("x", "call_0"), call("y", "call_0"), call("z", "call_0_1")]},
        result("Z", "call_0_1"),
        result("X", "call_0"),
        result("Y", "call_0"),
    ]
    answer = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == REPLY
    assert sent_to_claude(claude_mock) == [
        {"role": "user", "content": [{"type": "text", "text": "weather in Paris, then the time"}]},
        {"role": "assistant", "content": [tool_use("call_0", "paris")]},
        {"role": "user", "content": [tool_result("call_0", '{"temp_c": 11}')]},
        {"role": "assistant", "content": [tool_use("call_0_1", "time"), tool_use("call_1", "date")]},
        {"role": "user", "content": [tool_result("call_1", '{"date": "May 1"}'),
                                     tool_result("call_0_1", '{"time": "10:00"}')]},
        {"role": "assistant", "content": [{"type": "text", "text": "11 degrees, 10:00, May 1."}]},
        {"role": "user", "content": [{"type": "text", "text": "and three more"}]},
        {"role": "assistant", "content": [tool_use("call_0_2", "x"), tool_use("call_0_3", "y"),
                                          tool_use("call_0_1_1", "z")]},
        {"role": "user", "content": [tool_result("call_0_1_1", "Z"), tool_result("call_0_2", "X"),
                                     tool_result("call_0_3", "Y")]},
    ]
