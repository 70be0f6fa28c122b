"""The `openai` SDK's stream helper joins a Claude answer's thinking blocks (a real gateway, a mock Anthropic).

A Claude answer (an Anthropic target, translated to Chat Completions) carries its thinking blocks' signatures in
`reasoning_blocks`; a stream sends each block's entry in a chunk of its own, once the block is over. Those entries
had no `index`, and `client.chat.completions.stream(...)` (and `beta.chat.completions.stream`), which joins a
delta's lists of objects by `index` (`openai/lib/streaming/_deltas.py`), raised `RuntimeError: Expected list delta
entry to have an index key` on the second one: any answer with two thinking blocks, or thinking then redacted
thinking. Each streamed entry now has its `index` (its place in the turn's list), as a tool call's delta has: the
helper's final message holds the whole list, which goes back to Claude in the next turn (the signatures checked by
the mock, as the real API does), with the `index` the SDK leaves on the entries or without it (an older client's).
A complete answer's list has no `index`: its place is the index.
"""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pydantic
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_anthropic import REDACTED_TRIGGER, MockAnthropic, thinking_signature

ANTHROPIC_KEY = "sk-ant-blocks"
THINK = {"thinking": {"type": "enabled", "budget_tokens": 1024}}
TWICE = "please think twice"  # the mock's answer: two thinking blocks
REDACTED = f"x {REDACTED_TRIGGER}"  # ... a thinking block, then a redacted one


class Echo(pydantic.BaseModel):
    text: str


def blocks_policy(anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude: {{provider: claude, model: claude-mock}}
          claude-tool: {{provider: claude, model: fault-echo-tool}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(claude_mock: MockAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(blocks_policy(claude_mock.base_url), {"ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def ask(text: str) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 2000, "messages": [{"role": "user", "content": text}],
            "extra_body": THINK}


def streamed_entries(sdk_stream: Any) -> tuple[Any, list[list[dict[str, Any]]]]:
    """The helper's final message, and each chunk's `reasoning_blocks` as it came."""
    sent = []
    for event in sdk_stream:
        if event.type == "chunk" and event.chunk.choices:
            found = (event.chunk.choices[0].delta.model_extra or {}).get("reasoning_blocks")
            if found is not None:
                sent.append(found)
    return sdk_stream.get_final_completion().choices[0].message, sent


def check_blocks(message: Any, sent: list[list[dict[str, Any]]], kinds: list[str]) -> None:
    """The final message's list is every streamed entry in order, each once, at its `index`; the thinking entries'
    signatures are those of their own text (the mock signs each block's text)."""
    blocks = message.model_extra["reasoning_blocks"]
    assert [entry for chunk in sent for entry in chunk] == blocks
    assert [len(chunk) for chunk in sent] == [1] * len(kinds)  # one entry a chunk, once its block is over
    assert [entry["index"] for entry in blocks] == list(range(len(kinds)))
    assert [entry["type"] for entry in blocks] == kinds
    text, at = message.model_extra["reasoning_content"], 0
    for entry in blocks:
        if entry["type"] == "thinking":
            piece, at = text[at:at + entry["length"]], at + entry["length"]
            assert entry["signature"] == thinking_signature(piece)
        else:
            assert entry["data"]
    assert at == len(text)


@pytest.mark.parametrize(("text", "kinds"), [(TWICE, ["thinking", "thinking"]),
                                             (REDACTED, ["thinking", "redacted_thinking"])])
def test_the_stream_helper_joins_every_thinking_block(client: openai.OpenAI, text: str, kinds: list[str]) -> None:
    with client.chat.completions.stream(**ask(text)) as stream:
        message, sent = streamed_entries(stream)
    check_blocks(message, sent, kinds)
    with client.beta.chat.completions.stream(**ask(text)) as stream:
        check_blocks(*streamed_entries(stream), kinds)
    whole = client.chat.completions.create(**ask(text)).choices[0].message.model_extra
    # the complete answer: the same list, without `index` (the redacted block's data differs per answer)
    assert [{k: v for k, v in entry.items() if k not in ("index", "data")}
            for entry in message.model_extra["reasoning_blocks"]] == [
        {k: v for k, v in entry.items() if k != "data"} for entry in whole["reasoning_blocks"]]
    assert all("index" not in entry for entry in whole["reasoning_blocks"])
    assert whole["reasoning_content"] == message.model_extra["reasoning_content"]


def test_the_async_stream_helper_joins_every_thinking_block(gw: RunningGateway) -> None:
    async def run() -> tuple[Any, list[list[dict[str, Any]]]]:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
            sent = []
            async with sdk.chat.completions.stream(**ask(TWICE)) as stream:
                async for event in stream:
                    if event.type == "chunk" and event.chunk.choices:
                        found = (event.chunk.choices[0].delta.model_extra or {}).get("reasoning_blocks")
                        if found is not None:
                            sent.append(found)
                final = await stream.get_final_completion()
            return final.choices[0].message, sent

    check_blocks(*asyncio.run(run()), ["thinking", "thinking"])


@pytest.mark.parametrize("keep_index", [True, False], ids=["as-the-sdk-joined-them", "without-index"])
def test_the_joined_blocks_go_back_to_claude(client: openai.OpenAI, claude_mock: MockAnthropic,
                                            keep_index: bool) -> None:
    """The next turn sends the helper's message back (its thinking before its tool call, as Claude requires with
    thinking on): the mock refuses a block whose signature does not match its text."""
    tools = [openai.pydantic_function_tool(Echo, name="echo")]
    question = {"role": "user", "content": f"{TWICE} {REDACTED_TRIGGER}"}
    with client.chat.completions.stream(model="claude-tool", max_tokens=2000, messages=[question], tools=tools,
                                        extra_body=THINK) as stream:
        message, sent = streamed_entries(stream)
    check_blocks(message, sent, ["thinking", "redacted_thinking", "thinking"])
    blocks = message.model_extra["reasoning_blocks"]
    if not keep_index:
        blocks = [{k: v for k, v in entry.items() if k != "index"} for entry in blocks]
    call = message.tool_calls[0]
    reply = {"role": "assistant", "content": message.content, "reasoning_content": message.model_extra[
        "reasoning_content"], "reasoning_blocks": blocks, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "echo", "arguments": call.function.arguments}}]}
    claude_mock.clear()
    answer = client.chat.completions.create(
        model="claude-tool", max_tokens=2000, tools=tools, extra_body=THINK,
        messages=[question, reply, {"role": "tool", "tool_call_id": call.id, "content": "done"}])
    assert answer.choices[0].message.model_extra["reasoning_blocks"]
    sent_back = claude_mock.requests[-1].json["messages"][1]["content"]
    assert [block["type"] for block in sent_back] == ["thinking", "redacted_thinking", "thinking", "tool_use"]
    assert [block.get("signature") for block in sent_back[:3]] == [
        entry.get("signature") for entry in message.model_extra["reasoning_blocks"]]
    assert all("index" not in block for block in sent_back)
