"""Tool call ids from other APIs, sent to Anthropic's Messages API through a running gateway.

Anthropic takes only `tool_use` ids (and `tool_result.tool_use_id`s) matching `^[a-zA-Z0-9_-]+$`; anything else is a
400 "messages.1.content.0.tool_use.id: String should match pattern". Other APIs' ids have other characters (Kimi's
`functions.get_weather:0`), and a conversation begun on such a model and continued on a Claude alias (a client that
switches models, an alias that fell back) went with them as they were: the client got Anthropic's 400 for a history
the gateway could send. Such ids are now sent with each character outside the alphabet as `_`, each result with the
id its call was sent with, and two ids that become one are still told apart (`<id>_<n>`).

The Anthropic mock (tests/support/mock_anthropic.py) checks the id pattern as the real API does; clients are the
official `openai` SDK.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.translate.chat_to_anthropic import anthropic_request
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_anthropic import StrictAnthropic
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-egress-tool-ids"
REPLY = MockUpstream(None).reply_text
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def claude() -> Iterator[StrictAnthropic]:
    with StrictAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def client(claude: StrictAnthropic) -> Iterator[openai.OpenAI]:
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          anthropic: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude: {{provider: anthropic, model: claude-mock}}
        """)
    gateway = RunningGateway(text, {"ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
            yield sdk
    finally:
        gateway.stop()


def _call(call_id: str, city: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}


def _ids(body: dict[str, Any]) -> list[list[str]]:
    """Each message's tool ids as sent: `tool_use` ids and `tool_result` `tool_use_id`s, in order."""
    return [[block.get("id") or block.get("tool_use_id") for block in message["content"]
             if block.get("type") in ("tool_use", "tool_result")] for message in body["messages"]]


@pytest.mark.parametrize(("call_id", "sent"), [
    ("functions.get_weather:0", "functions_get_weather_0"),  # Kimi K2's ids (vLLM, Fireworks, Moonshot)
    ("call 1", "call_1"),
    ("call#1", "call_1"),
    ("toolu_01A-b_c", "toolu_01A-b_c"),  # already in the alphabet: as it is
])
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_foreign_tool_call_id_reaches_claude_in_its_alphabet(call_id: str, sent: str, stream: bool,
                                                               client: openai.OpenAI, claude: StrictAnthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call(call_id, "Paris")]},
        {"role": "tool", "tool_call_id": call_id, "content": "18C, sunny"},
    ]
    claude.clear()
    if stream:  # was Anthropic's 400 "tool_use.id: String should match pattern"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="claude", messages=messages, tools=TOOLS, stream=True) if chunk.choices)
    else:
        text = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS).choices[0] \
            .message.content or ""
    assert text == REPLY
    assert _ids(claude.requests[-1].json) == [[], [sent], [sent]]


def test_ids_that_meet_in_the_alphabet_stay_apart_and_paired(client: openai.OpenAI, claude: StrictAnthropic) -> None:
    """`call 1` and `call#1` both become `call_1`: the second is sent as `call_1_1`, and each result, sent in any
    order, names its own call (across turns too: a later turn's `functions.get_weather:0` is another call)."""
    messages: Any = [
        {"role": "user", "content": "Weather in Paris and London?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call 1", "Paris"), _call("call#1", "London")]},
        {"role": "tool", "tool_call_id": "call#1", "content": "12C, rain"},
        {"role": "tool", "tool_call_id": "call 1", "content": "18C, sunny"},
        {"role": "assistant", "content": "Paris is sunny, London rainy."},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("functions.get_weather:0", "Rome")]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "24C, sunny"},
        {"role": "user", "content": "And the one before, with the id Paris had?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "Oslo")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "2C, snow"},
    ]
    claude.clear()
    answer = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
    assert answer.choices[0].message.content == REPLY
    body = claude.requests[-1].json
    assert _ids(body) == [[], ["call_1", "call_1_1"], ["call_1_1", "call_1"], [], [], ["functions_get_weather_0"],
                          ["functions_get_weather_0"], ["call_1_2"], ["call_1_2"]]
    results = {block["tool_use_id"]: block["content"] for message in body["messages"] for block in message["content"]
               if block.get("type") == "tool_result"}
    assert results == {"call_1": "18C, sunny", "call_1_1": "12C, rain", "functions_get_weather_0": "24C, sunny",
                       "call_1_2": "2C, snow"}


def test_a_result_that_answers_no_call_is_sent_in_the_alphabet_too() -> None:
    """A result whose id names no call of the turn before it goes with its own id (Anthropic then says which result
    has no call): in the alphabet, so that its answer names that problem, not the id's characters."""
    messages: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("functions.get_weather:0", "Paris")]},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "18C, sunny"},
    ]
    sent = anthropic_request({"model": "claude-mock", "messages": messages}, 1024, "claude")
    assert _ids(sent) == [[], ["functions_get_weather_0"], ["functions_get_weather_1"]]
