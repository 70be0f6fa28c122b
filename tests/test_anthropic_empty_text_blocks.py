"""An OpenAI client's history reaches Anthropic without the empty text blocks its real API refuses (a real gateway, the
official `openai` SDK, the strict Anthropic mock).

Anthropic refuses `{"type": "text", "text": ""}` ("text content blocks must be non-empty") and whitespace-only text
("... must contain non-whitespace text") with a 400, and an empty turn but for a final assistant one. OpenAI clients
send such text all the time: an assistant turn with `tool_calls` and `content: ""` (the OpenAI Agents SDK, OpenCode,
Hermes), a tool's empty output (`content: ""`, or a command's `"\\n"`), an empty text part, an empty assistant answer
kept in the history. The gateway leaves the text out, and an assistant turn left with nothing goes (its neighbours
join; a final one is no prefill): the request is the one the client meant, and Anthropic takes it, complete or
streamed.

`EmptyRefusingAnthropic` adds to `StrictAnthropic`'s checks the one it lacks: a tool result whose content is a string
with no text but whitespace (Anthropic reads a string as one text block; users report a 400 for an empty tool output).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_anthropic import StrictAnthropic, anthropic_error
from tests.support.mock_upstream import _RECORD, MockUpstream, _send

ANTHROPIC_KEY = "sk-ant-empty-text"
REPLY = MockUpstream(None).reply_text
TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "run", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}}]


def _empty_string_result(body: Any) -> str | None:
    for index, message in enumerate(body.get("messages") or () if isinstance(body, dict) else ()):
        for position, block in enumerate(message.get("content") if isinstance(message.get("content"), list) else ()):
            if isinstance(block, dict) and block.get("type") == "tool_result" \
                    and isinstance(block.get("content"), str) and not block["content"].strip():
                return f"messages.{index}.content.{position}: text content blocks must contain non-whitespace text"
    return None


class EmptyRefusingAnthropic(StrictAnthropic):
    async def _messages(self, request: web.Request) -> web.StreamResponse:
        problem = _empty_string_result(request[_RECORD].json)
        if problem is not None:
            return await _send(request, anthropic_error(400, problem))
        return await super()._messages(request)


@pytest.fixture(scope="module")
def claude() -> Iterator[EmptyRefusingAnthropic]:
    with EmptyRefusingAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(claude: EmptyRefusingAnthropic) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude: {{provider: claude, model: claude-mock}}
        """)
    running = RunningGateway(policy, {"ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, claude: EmptyRefusingAnthropic) -> Iterator[openai.OpenAI]:
    claude.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def _call(call_id: str, command: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "run", "arguments": f'{{"command": "{command}"}}'}}


def _ask(client: openai.OpenAI, messages: list[Any], stream: bool) -> str:
    if not stream:
        answer = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)
        return answer.choices[0].message.content or ""
    chunks = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def _texts(body: dict[str, Any]) -> list[str]:
    """Every text block sent, tool results' included (a string content counts as one)."""
    found = []
    for message in body["messages"]:
        for block in message["content"]:
            inner = block.get("content") if block["type"] == "tool_result" else None
            found += [part["text"] for part in ([block] + (inner if isinstance(inner, list) else []))
                      if part.get("type") == "text"]
            if isinstance(inner, str):
                found.append(inner)
    return found


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_an_agent_history_with_empty_text_is_taken(client: openai.OpenAI, claude: EmptyRefusingAnthropic,
                                                   stream: bool) -> None:
    """Tool turns with `content: ""`, an empty and a whitespace-only tool output, an empty text part, and an empty
    answer kept in the history: Anthropic gets none of that text, and answers."""
    messages: list[Any] = [
        {"role": "user", "content": [{"type": "text", "text": "clean the build"}, {"type": "text", "text": ""}]},
        {"role": "assistant", "content": "", "tool_calls": [_call("call_a", "make clean")]},
        {"role": "tool", "tool_call_id": "call_a", "content": ""},
        {"role": "assistant", "content": "", "tool_calls": [_call("call_b", "ls build")]},
        {"role": "tool", "tool_call_id": "call_b", "content": "\n"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "and now?"},
    ]
    assert _ask(client, messages, stream) == REPLY
    body: dict[str, Any] = claude.requests[-1].json or {}
    assert all(text.strip() for text in _texts(body)), _texts(body)
    assert body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "clean the build"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_a", "name": "run",
                                           "input": {"command": "make clean"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_a"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "call_b", "name": "run",
                                           "input": {"command": "ls build"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_b"},
                                     {"type": "text", "text": "and now?"}]},
    ]


def test_a_tool_output_with_text_is_sent_as_it_is(client: openai.OpenAI, claude: EmptyRefusingAnthropic) -> None:
    """Only a result with no text but whitespace loses its content: one with text keeps it, whitespace and all."""
    messages: list[Any] = [
        {"role": "user", "content": "list the build"},
        {"role": "assistant", "content": None, "tool_calls": [_call("call_c", "ls")]},
        {"role": "tool", "tool_call_id": "call_c", "content": "a.o\nb.o\n"},
    ]
    assert _ask(client, messages, stream=False) == REPLY
    body: dict[str, Any] = claude.requests[-1].json or {}
    assert body["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "call_c",
                                                "content": "a.o\nb.o\n"}]


def test_a_final_empty_assistant_turn_is_no_prefill(client: openai.OpenAI, claude: EmptyRefusingAnthropic) -> None:
    """An empty last assistant message (a client's placeholder for the answer to come) goes: Anthropic answers the
    user turn before it, as without it."""
    messages: list[Any] = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    assert _ask(client, messages, stream=False) == REPLY
    assert (claude.requests[-1].json or {})["messages"] == [{"role": "user", "content": [{"type": "text",
                                                                                         "text": "hi"}]}]
