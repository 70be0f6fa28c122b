"""With output guards on a stream, the text a model writes before a tool call reaches the client before the call.

The window holds back the tail of a choice's text (a finding may still start in it: the trailing word, a key or an
address still being written). That tail was released only at the finish chunk, after the tool call's deltas: a
Chat Completions client got the text's last words after the call, and Anthropic's Messages stream (which holds any
text that follows a tool call) answered [tool_use, text] where the model wrote [text, tool_use]. Now the held tail
leaves whole when the choice's first tool call begins, in that chunk, ahead of the call, scanned as the text's end
is: a key or an address split between the held tail and the rest of the text is still redacted, or blocks.

The upstream is a scripted OpenAI server (the request's model names the script: the text split in pieces of some
size, its last piece in the call's first delta or before it, each chunk in a read of its own or all in one); the
clients are the openai and anthropic SDKs (and httpx, for the wire's order inside a chunk).
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

KEY = "AKIAIOSFODNN7EXAMPLQ"
EMAIL = "jane.doe@mailbox.org"
ARGS = json.dumps({"text": "hello"})
PLAIN = "Let me call the tool now"
KEYED = f"The key is {KEY}"
MAILED = f"I will write to {EMAIL} now"
REDACTED = {PLAIN: PLAIN, KEYED: "The key is <AWS_ACCESS_KEY>", MAILED: "I will write to <EMAIL_ADDRESS> now"}
TEXTS = {"plain": PLAIN, "keyed": KEYED, "mailed": MAILED}
MESSAGES: Any = [{"role": "user", "content": "call the tool"}]
OPENAI_TOOL: Any = {"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}}}}
ANTHROPIC_TOOL: Any = {"name": "echo", "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}
_START = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "echo",
                                                                                       "arguments": ""}}]}
_ARGUMENTS = {"tool_calls": [{"index": 0, "function": {"arguments": ARGS}}]}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _deltas(pieces: list[str], together: bool) -> list[dict[str, Any]]:
    """The text's pieces, then the tool call; `together`: the last piece in the call's first delta."""
    texts = [{"content": piece} for piece in pieces]
    if together:
        return [*texts[:-1], {**texts[-1], **_START}, _ARGUMENTS]
    return [*texts, _START, _ARGUMENTS]


def _split(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] if size else [text]


# model (the script's name) -> (its chunks, all in one read)
SCRIPTS: dict[str, tuple[list[dict[str, Any]], bool]] = {}
for _label, _text in TEXTS.items():
    for _size in (0, 1, 3, 7):
        for _together in (False, True):
            for _burst in (False, True):
                SCRIPTS[f"{_label}-{_size}-{int(_together)}-{int(_burst)}"] = (
                    _deltas(_split(_text, _size), _together), _burst)
# A key split between what the window holds and the text that completes it, at every offset inside it.
_AT = KEYED.index(KEY)
for _cut in range(_AT + 1, len(KEYED)):
    for _together in (False, True):
        SCRIPTS[f"split-{_cut}-{int(_together)}"] = (_deltas([KEYED[:_cut], KEYED[_cut:]], _together), False)
# Text that goes on after the call (a server may interleave them): a key that the call splits, and a clean text.
SCRIPTS["resumed-key"] = ([{"content": "The key is AKIAIOSFOD"}, _START, _ARGUMENTS, {"content": "NN7EXAMPLQ ok"}],
                          False)
SCRIPTS["resumed-clean"] = ([{"content": "Calling it. "}, _START, _ARGUMENTS,
                             {"content": f"Then mail {EMAIL} later."}], False)
ORDERED = sorted(name for name in SCRIPTS if name.split("-")[0] in TEXTS)
SPLITS = sorted(name for name in SCRIPTS if name.startswith("split-"))


class _Upstream(ThreadedApp):
    """`/v1/chat/completions`: the stream of the request's model (`SCRIPTS`), each chunk in a read of its own or all
    in one, with the role first, then the finish chunk and a usage chunk."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            deltas, burst = SCRIPTS[(await request.json())["model"]]
            chunks = [_chunk({"role": "assistant", "content": ""}), *map(_chunk, deltas), _chunk({}, "tool_calls"),
                      {**_chunk({}), "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9,
                                                              "total_tokens": 14}}]
            frames = [b"data: %s\n\n" % json.dumps(chunk).encode() for chunk in chunks] + [b"data: [DONE]\n\n"]
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                if burst:
                    await response.write(b"".join(frames))
                else:
                    for frame in frames:
                        await response.write(frame)
                        await asyncio.sleep(0.003)
                await response.write_eof()
            except ConnectionResetError:  # a blocked answer: the gateway stopped reading
                pass
            return response

        app.router.add_post("/v1/chat/completions", handle)


def _policy(port: int) -> str:
    """`r-<script>`: the output guards redact; `b-<script>`: a key blocks."""
    models = "".join(f"  {guard}-{name}: {{provider: up, model: {name}}}\n" for name in SCRIPTS for guard in "rb")
    blocking = "".join(f"    b-{name}: {{secrets: {{kind: secrets, places: [output], action: block}}}}\n"
                       for name in SCRIPTS)
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY,
                timeouts: {{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}}}}
        models:
        """) + models + textwrap.dedent("""\
        guards:
          stream: {window_chars: 32, step_chars: 8}
          global:
            pii: {kind: pii, places: [output], action: redact, entities: {EMAIL_ADDRESS: {}}}
            secrets: {kind: secrets, places: [output], action: redact}
          models:
        """) + blocking


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _chat(gw: RunningGateway, model: str) -> tuple[list[tuple[str, str]], str | None]:
    """The openai SDK's stream as the client reads it: ("text", piece) and ("call", arguments piece) in the order
    they come (in a chunk, its content first), and the finish reason."""
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=20)
    events: list[tuple[str, str]] = []
    finish = None
    for chunk in client.chat.completions.create(model=model, messages=MESSAGES, tools=[OPENAI_TOOL], stream=True):
        for choice in chunk.choices:
            if choice.delta.content:
                events.append(("text", choice.delta.content))
            for call in choice.delta.tool_calls or ():
                events.append(("call", (call.function.arguments or "") if call.function else ""))
            finish = choice.finish_reason or finish
    return events, finish


def _text_before_calls(events: list[tuple[str, str]]) -> tuple[str, str]:
    """The text and the arguments, asserting that no text comes after the first tool call piece."""
    kinds = [kind for kind, _ in events]
    assert "call" in kinds
    first = kinds.index("call")
    assert "text" not in kinds[first:], events
    return "".join(p for k, p in events if k == "text"), "".join(p for k, p in events if k == "call")


def _messages(gw: RunningGateway, model: str) -> tuple[list[str], anthropic.types.Message]:
    """The Messages stream through the anthropic SDK: its content blocks' types in the order they start, and the
    final message."""
    client = anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=20)
    starts: list[str] = []
    with client.messages.stream(model=model, max_tokens=64, messages=MESSAGES, tools=[ANTHROPIC_TOOL]) as stream:
        for event in stream:
            if event.type == "content_block_start":
                starts.append(event.content_block.type)
        return starts, stream.get_final_message()


def _texts_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


# -- chat completions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ORDERED)
def test_a_chat_streams_text_before_the_tool_call(gw: RunningGateway, script: str) -> None:
    events, finish = _chat(gw, f"r-{script}")
    text, arguments = _text_before_calls(events)
    assert (text, arguments, finish) == (REDACTED[TEXTS[script.split("-")[0]]], ARGS, "tool_calls")


def test_the_released_text_precedes_the_call_inside_its_chunk(gw: RunningGateway) -> None:
    """The call's first delta had no content (the upstream's JSON: `{"tool_calls": ...}`): the released tail is
    written before the calls there too, for a client that reads a delta's fields in order."""
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": "r-plain-0-0-0", "messages": MESSAGES, "stream": True}, timeout=20) as response:
        raw = response.read().decode()
    deltas = [json.loads(line.removeprefix("data: "))["choices"][0]["delta"] for line in raw.split("\n")
              if line.startswith("data: {") and '"tool_calls"' in line]
    assert list(deltas[0])[-2:] == ["content", "tool_calls"] and deltas[0]["content"]
    assert PLAIN.endswith(deltas[0]["content"])


@pytest.mark.parametrize("script", SPLITS)
def test_a_key_split_across_the_held_tail_is_redacted_before_the_call(gw: RunningGateway, script: str) -> None:
    events, finish = _chat(gw, f"r-{script}")
    text, arguments = _text_before_calls(events)
    assert (text, arguments, finish) == (REDACTED[KEYED], ARGS, "tool_calls")


@pytest.mark.parametrize("script", SPLITS + [name for name in ORDERED if name.startswith("keyed-")])
def test_a_key_split_across_the_held_tail_blocks_before_the_call(gw: RunningGateway, script: str) -> None:
    events, finish = _chat(gw, f"b-{script}")
    text = "".join(p for k, p in events if k == "text")
    assert finish == "content_filter" and "The key is ".startswith(text)  # none of the key left
    assert "call" not in [kind for kind, _ in events]  # nor the call that came after it


def test_text_after_the_call_is_scanned_with_what_left_before_it(gw: RunningGateway) -> None:
    events, finish = _chat(gw, "r-resumed-clean")
    assert events[0][0] == "text" and finish == "tool_calls"
    assert "".join(p for k, p in events if k == "text") == "Calling it. Then mail <EMAIL_ADDRESS> later."


def test_a_key_that_the_call_splits_blocks(gw: RunningGateway) -> None:
    """The text before the call left whole (`AKIAIOSFOD` was no key then); its rest, after the call, would finish a
    key whose start is out: only its rest could be redacted, so the answer is blocked, counted as the guard's."""
    before = _key_blocks(gw)
    events, finish = _chat(gw, "r-resumed-key")
    assert "".join(p for k, p in events if k == "text") == "The key is AKIAIOSFOD"
    assert finish == "content_filter" and _key_blocks(gw) == before + 1


def _key_blocks(gw: RunningGateway) -> float:
    """How many keys the secrets guard blocked so far (this module's requests all count)."""
    name = ('gateway_guard_findings_total{action="block",entity="AWS_ACCESS_KEY",guard="secrets",mode="enforce",'
            'place="output"} ')
    return next((float(line.removeprefix(name)) for line in gw.metrics().splitlines() if line.startswith(name)), 0.0)


# -- Anthropic's Messages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["plain-0-0-0", "plain-1-1-0", "plain-3-0-1", "mailed-7-1-0", "keyed-1-0-0"])
def test_a_messages_stream_has_the_text_block_before_the_tool_use(gw: RunningGateway, script: str) -> None:
    starts, message = _messages(gw, f"r-{script}")
    assert starts == ["text", "tool_use"] and [block.type for block in message.content] == starts
    assert _texts_of(message) == REDACTED[TEXTS[script.split("-")[0]]]
    assert message.content[1].type == "tool_use" and message.content[1].input == json.loads(ARGS)
    assert message.stop_reason == "tool_use"


@pytest.mark.parametrize("script", ["split-12-0", "split-12-1", "split-25-1"])
def test_a_messages_stream_redacts_or_blocks_a_key_split_across_the_held_tail(gw: RunningGateway,
                                                                               script: str) -> None:
    starts, message = _messages(gw, f"r-{script}")
    assert starts == ["text", "tool_use"] and _texts_of(message) == REDACTED[KEYED]
    starts, message = _messages(gw, f"b-{script}")
    assert "tool_use" not in starts and message.stop_reason == "refusal"
    assert "The key is ".startswith(_texts_of(message))
