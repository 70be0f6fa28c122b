"""A cached Claude answer with thinking is served in either form, through a real gateway with the cache on.

A Claude answer's thinking travels in the chat form as `reasoning_content` and `reasoning_blocks` (its blocks'
signatures, `translate/thinking.py`). `reasoning_blocks` was not among the fields a cache conversion carries
(`cache/assemble.py`), so a stored stream could not be served to a non-streamed request, nor a stored body to a
stream: on an alias with the cache on, `/v1/messages` with thinking went stream miss, stream hit, create miss,
create hit, stream miss, each form replacing the other's entry (and so for `/v1/chat/completions`). Now the list
converts both ways, exactly: a stream's entries (each at its `index`) are the complete message's list, and a
complete list streams in one delta, each entry at its place; what a hit serves is what the miss served, block for
block (a `/v1/messages` stream's thinking blocks each with their own text and signature). An entry that came
after a tool call does not stream from a complete answer (the one delta would put it before the call): a miss.
"""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from gateway.auth.keys import hash_key
from gateway.cache.entry import Entry
from gateway.cache.replay import ReplaySource, Unconvertible, assemble_body, split_body
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_anthropic import REDACTED_TRIGGER, MockAnthropic

ANTHROPIC_KEY = "sk-ant-cache-blocks"
THINKING = {"type": "enabled", "budget_tokens": 1024}
CHAT = Endpoint.CHAT


def cache_policy(anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          cclaude: {{provider: claude, model: claude-mock, cache: {{when: {{max_temperature: 1}}}}}}
        """)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        running = RunningGateway(cache_policy(mock.base_url), {"ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
        yield running
        running.stop()


def prompt() -> str:
    """A prompt of its own (the cache is shared by the module's tests) that makes the mock think in three blocks:
    thinking, redacted thinking, thinking."""
    return f"please think twice {REDACTED_TRIGGER} {uuid.uuid4().hex}"


# -- /v1/messages ---------------------------------------------------------------------------------------------------


def messages_sdk(gw: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15)


def streamed(sdk: anthropic.Anthropic, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    with sdk.messages.stream(model="cclaude", max_tokens=2000, thinking=THINKING,
                             messages=[{"role": "user", "content": text}]) as stream:
        for _ in stream:
            pass
        blocks = [block.model_dump() for block in stream.get_final_message().content]
        return stream.response.headers.get("x-gateway-cache"), blocks


def created(sdk: anthropic.Anthropic, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    raw = sdk.messages.with_raw_response.create(model="cclaude", max_tokens=2000, thinking=THINKING,
                                                messages=[{"role": "user", "content": text}])
    return raw.headers.get("x-gateway-cache"), [block.model_dump() for block in raw.parse().content]


def check_thinking(blocks: list[dict[str, Any]]) -> None:
    assert [block["type"] for block in blocks] == ["thinking", "redacted_thinking", "thinking", "text"]
    assert all(block["thinking"] and block["signature"] for block in blocks if block["type"] == "thinking")


@pytest.mark.parametrize("first", ["stream", "create"])
def test_messages_with_thinking_hit_in_either_form(gw: RunningGateway, first: str) -> None:
    """Whichever form comes first is stored; every later request, in either form, is a hit with its blocks."""
    ask = {"stream": streamed, "create": created}
    other = "create" if first == "stream" else "stream"
    text = prompt()
    with messages_sdk(gw) as sdk:
        state, blocks = ask[first](sdk, text)
        assert state == "miss"
        check_thinking(blocks)
        for form in (first, other, other, first):
            assert ask[form](sdk, text) == ("hit", blocks), form


# -- /v1/chat/completions -------------------------------------------------------------------------------------------


def chat_sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15)


def chat_streamed(sdk: openai.OpenAI, text: str) -> tuple[str | None, dict[str, Any]]:
    with sdk.chat.completions.stream(model="cclaude", max_tokens=2000, extra_body={"thinking": THINKING},
                                     messages=[{"role": "user", "content": text}]) as stream:
        for _ in stream:
            pass
        message = stream.get_final_completion().choices[0].message.model_dump(exclude_none=True)
        return stream._response.headers.get("x-gateway-cache"), message  # (the helper keeps the response private)


def chat_created(sdk: openai.OpenAI, text: str) -> tuple[str | None, dict[str, Any]]:
    raw = sdk.chat.completions.with_raw_response.create(model="cclaude", max_tokens=2000,
                                                        extra_body={"thinking": THINKING},
                                                        messages=[{"role": "user", "content": text}])
    return raw.headers.get("x-gateway-cache"), raw.parse().choices[0].message.model_dump(exclude_none=True)


def without_index(message: dict[str, Any]) -> dict[str, Any]:
    """A streamed message as a complete one has it: the helper leaves each entry's `index` on it."""
    return {**message, "reasoning_blocks": [{k: v for k, v in entry.items() if k != "index"}
                                            for entry in message["reasoning_blocks"]]}


@pytest.mark.parametrize("first", ["stream", "create"])
def test_chat_with_thinking_hits_in_either_form(gw: RunningGateway, first: str) -> None:
    text = prompt()
    with chat_sdk(gw) as sdk:
        if first == "stream":
            state, streamed_message = chat_streamed(sdk, text)
            assert state == "miss"
            state, message = chat_created(sdk, text)
        else:
            state, message = chat_created(sdk, text)
            assert state == "miss"
            state, streamed_message = chat_streamed(sdk, text)
        assert state == "hit"
        assert [entry["type"] for entry in message["reasoning_blocks"]] == [
            "thinking", "redacted_thinking", "thinking"]
        assert [entry["index"] for entry in streamed_message["reasoning_blocks"]] == [0, 1, 2]
        assert without_index(streamed_message) == message


# -- the conversions ------------------------------------------------------------------------------------------------

ENTRIES: list[dict[str, Any]] = [{"type": "thinking", "signature": "s1", "length": 3},
                                 {"type": "redacted_thinking", "data": "d"},
                                 {"type": "thinking", "signature": "s2", "length": 2}]


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}).encode()


def stored_stream(entries: list[Any], *extra: dict[str, Any]) -> Entry:
    pieces = [{"role": "assistant", "content": ""}, {"reasoning_content": "abc"}, {"reasoning_blocks": entries[:1]},
              {"reasoning_content": "de"}, {"reasoning_blocks": entries[1:]}, *extra, {"content": "hi"}]
    return Entry("stream", 0, chunks=[chunk(piece) for piece in pieces] + [chunk({}, "stop")])


def body(message: dict[str, Any]) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}).encode()


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "stored-before-index"])
def test_a_stored_stream_assembles_its_blocks_in_order(indexed: bool) -> None:
    entries = [{"index": i, **entry} if indexed else entry for i, entry in enumerate(ENTRIES)]
    message = json.loads(assemble_body(stored_stream(entries), CHAT))["choices"][0]["message"]
    assert message["reasoning_content"] == "abcde" and message["reasoning_blocks"] == ENTRIES


@pytest.mark.parametrize("entries", [
    [{"index": 0, **ENTRIES[0]}, {"index": 2, **ENTRIES[1]}],  # a place skipped
    [{"index": 0, **ENTRIES[0]}, {"index": 0, **ENTRIES[1]}],  # a place twice
    [{"index": "0", **ENTRIES[0]}],  # an index that is no number
    ["s1"],  # an entry that is no object
])
def test_blocks_out_of_place_do_not_assemble(entries: list[Any]) -> None:
    with pytest.raises(Unconvertible):
        assemble_body(stored_stream(entries), CHAT)


def test_a_stored_body_streams_its_blocks_at_their_places() -> None:
    message = {"role": "assistant", "content": "hi", "refusal": None, "reasoning_content": "abcde",
               "reasoning_blocks": ENTRIES}
    chunks, _ = split_body(body(message), CHAT)
    delta = json.loads(chunks[0])["choices"][0]["delta"]
    assert delta["reasoning_blocks"] == [{**entry, "index": i} for i, entry in enumerate(ENTRIES)]
    again = Entry("stream", 0, chunks=chunks)
    assert json.loads(assemble_body(again, CHAT))["choices"][0]["message"] == message  # exact, both ways


@pytest.mark.parametrize("entries", [
    [ENTRIES[0], {**ENTRIES[2], "after_tool_calls": 1}],  # after a tool call: would stream before it
    [ENTRIES[0], "d"],
    [{**ENTRIES[0], "index": 1}],
])
def test_a_stored_body_whose_blocks_would_not_stream_exactly_is_a_miss(entries: list[Any]) -> None:
    message = {"role": "assistant", "content": "hi", "reasoning_content": "abcde", "reasoning_blocks": entries,
               "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    with pytest.raises(Unconvertible):
        ReplaySource(Entry("body", 0, body=body(message)), CHAT)


def test_one_delta_of_thinking_streams_its_blocks_apart() -> None:
    """A stored body replayed to `/v1/messages` as a stream: its one delta holds the text and every entry; each
    thinking block gets its own text (its entry's length) and signature, as the complete answer has them."""
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent

    from gateway.translate.anthropic_answer import MessagesStream

    chunks, _ = split_body(body({"role": "assistant", "content": "hi", "reasoning_content": "abcde",
                                 "reasoning_blocks": ENTRIES}), CHAT)
    framer = MessagesStream("claude")
    raw = framer.frame([Chunk(payload) for payload in chunks]) + framer.frame([DONE])
    message, buffers = None, {}  # type: ignore[var-annotated]
    for frame in raw.decode().split("\n\n"):
        if frame:
            event = json.loads(frame.split("\n")[1].removeprefix("data: "))
            message = accumulate_event(event=pydantic.TypeAdapter(RawMessageStreamEvent).validate_python(event),
                                       current_snapshot=message, json_bufs=buffers)
    assert message is not None
    assert [block.model_dump() for block in message.content] == [
        {"type": "thinking", "thinking": "abc", "signature": "s1"}, {"type": "redacted_thinking", "data": "d"},
        {"type": "thinking", "thinking": "de", "signature": "s2"}, {"type": "text", "text": "hi", "citations": None}]
