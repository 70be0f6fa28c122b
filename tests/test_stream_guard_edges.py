"""Output guards on streams, at three edges where part of a finding, or text no guard read, left with the chunks.

1. A `\\uXXXX` escape split across chunks of a tool call's arguments: the guards read the arguments with their escapes
   as the characters they stand for (`json_view`), but an escape still completing at the end of the held text
   (`Jaur\\`, `Jaur\\u00`) read as it is, and its backslash ended any finding before it. The window took the finding
   for over, released its start and never looked back: `{"address": "412 avenue Jean <STREET_ADDRESS>"}` (checked
   whole: `<STREET_ADDRESS>`), and a blocked stream had sent all of a deny-listed phrase but its last word. The same
   window serves the Responses API's `function_call_arguments` deltas and an Anthropic upstream's `input_json_delta`.
2. Some OpenAI-compatible servers (Perplexity) send the whole message so far in `choices[].message` beside `delta`:
   only the delta was read and rewritten, and the `message` carried the text out unguarded. It is now dropped.
3. A `/v1/messages` stream blocked after a tool call began still wrote that call, whole, at the end: a `tool_use`
   block whose input was the arguments cut short (`{"_raw_arguments": "{\\"note\\": \\"the "}`), beside
   `stop_reason: "refusal"`. A blocked stream now writes no held tool call (a complete answer blocked has none).

The upstream is scripted (raw SSE per requested model, for the OpenAI, Responses and Anthropic paths), the gateway
real, and each test reads what the client got.
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

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
EMAIL = "jane.doe@mailbox.org"
ADDRESS = '{"address": "412 avenue Jean Jaur\\u00e8s, 69007 Lyon"}'  # checked whole: `<STREET_ADDRESS>`
DENIED = '{"title": "Notes on Str\\u00f6me der Zeit for the team"}'  # the term: "Ströme der Zeit"
SCRIPTS: dict[str, list[bytes]] = {}  # model -> the upstream's SSE frames, each written in a read of its own


def _frame(data: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"


def _chat(model: str, deltas: list[dict[str, Any]], finish: str) -> str:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    frames = [_frame({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) for delta in deltas]
    frames.append(_frame({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    SCRIPTS[model] = [*frames, b"data: [DONE]\n\n"]
    return model


def _call(pieces: list[str]) -> list[dict[str, Any]]:
    """A chat stream's deltas of one tool call whose arguments come in `pieces`."""
    start = {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                  "function": {"name": "save", "arguments": ""}}]}
    return [start, *({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in pieces)]


def _split(text: str, *ends: str) -> list[str]:
    """`text` cut after the first occurrence of each of `ends` (in order)."""
    cuts = [0]
    for end in ends:
        cuts.append(text.index(end, cuts[-1]) + len(end))
    return [text[a:b] for a, b in zip(cuts, [*cuts[1:], len(text)], strict=True)]


def _responses(model: str, pieces: list[str]) -> str:
    """A Responses stream of one function call whose arguments come in `pieces`."""
    item = {"id": "fc_1", "type": "function_call", "status": "in_progress", "call_id": "call_1", "name": "save",
            "arguments": ""}
    done = {**item, "status": "completed", "arguments": "".join(pieces)}
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
                "output": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        *({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": piece}
          for piece in pieces),
        {"type": "response.function_call_arguments.done", "output_index": 0, "item_id": "fc_1",
         "arguments": done["arguments"]},
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed", "response": {**response, "status": "completed", "output": [done], "usage": {
            "input_tokens": 5, "output_tokens": 9, "total_tokens": 14}}}]
    SCRIPTS[model] = [_frame({**event, "sequence_number": i}, event["type"]) for i, event in enumerate(events)]
    return model


def _anthropic(model: str, pieces: list[str]) -> str:
    """An Anthropic stream of one tool_use block whose input comes in `pieces` (`input_json_delta`)."""
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "model": "m",
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": 5, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "save", "input": {}}},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": piece}}
          for piece in pieces),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"}]
    SCRIPTS[model] = [_frame(event, event["type"]) for event in events]
    return model


# 1. an escape split across chunks, cut after its backslash, its `u`, and each of its digits but the last
SPLIT_AT = ["Jaur\\", "Jaur\\u", "Jaur\\u0", "Jaur\\u00", "Jaur\\u00e"]
for _i, _end in enumerate(SPLIT_AT):
    _chat(f"address-{_i}", _call(_split(ADDRESS, _end)), "tool_calls")
_chat("denied", _call(_split(DENIED, "Str\\", "der ")), "tool_calls")
_responses("responses-address", _split(ADDRESS, "Jaur\\u0"))
_anthropic("anthropic-address", _split(ADDRESS, "Jaur\\"))
# 2. the whole message so far beside each delta (Perplexity's chunks)
_sofar = ""
_perplexity: list[bytes] = []
for _piece in ["Write to ", "jane.doe@", "mailbox.org", " today."]:
    _sofar += _piece
    _perplexity.append(_frame({"id": "c", "object": "chat.completion", "created": 1, "model": "sonar", "choices": [
        {"index": 0, "finish_reason": None, "message": {"role": "assistant", "content": _sofar},
         "delta": {"role": "assistant", "content": _piece}}]}))
_perplexity.append(_frame({"id": "c", "object": "chat.completion", "created": 1, "model": "sonar", "choices": [
    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": _sofar},
     "delta": {"role": "assistant", "content": ""}}]}))
SCRIPTS["perplexity"] = [*_perplexity, b"data: [DONE]\n\n"]
# 3. a tool call whose arguments go on to a deny-listed term
_chat("blocked-call", [{"role": "assistant", "content": "Saving it. "},
                       *_call(['{"note": "the ', 'plan is zorb', 'lax and more"}'])], "tool_calls")


class _Upstream(ThreadedApp):
    """Chat Completions, Responses and Messages: the frames of the request's model (`SCRIPTS`), one read each."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            try:
                for frame in SCRIPTS[(await request.json())["model"]]:
                    await response.write(frame)
                    await asyncio.sleep(0.003)
                await response.write_eof()
            except ConnectionResetError:  # a blocked answer: the gateway stopped reading
                pass
            return response

        for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
            app.router.add_post(path, handle)


def _policy(port: int) -> str:
    models = "\n".join(f"  {name}: {{provider: {'ant' if name.startswith('anthropic') else 'up'}, model: {name}}}"
                       for name in SCRIPTS)
    timeouts = "{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}"
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          ant: {{kind: anthropic, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
        guards:
          stream: {{window_chars: 48, step_chars: 24}}
          global:
            pii: {{kind: pii, places: [output], action: redact}}
            deny: {{kind: denylist, places: [output], terms: ["Ströme der Zeit", zorblax], action: block}}
        models:
        """) + models + "\n"


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _chunks(gw: RunningGateway, path: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The raw stream the client got, and its data frames (JSON)."""
    with httpx.stream("POST", gw.url + path, headers=AUTH, json={**body, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    return raw, [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]


def _chat_arguments(chunks: list[dict[str, Any]]) -> str:
    return "".join((call.get("function") or {}).get("arguments") or "" for chunk in chunks
                   for choice in chunk.get("choices") or () for call in choice["delta"].get("tool_calls") or ())


@pytest.mark.parametrize("model", [f"address-{i}" for i in range(len(SPLIT_AT))])
def test_an_escape_split_across_chunks_leaves_no_part_of_the_finding_before_it(gw: RunningGateway,
                                                                                model: str) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=FULL_KEY, max_retries=0)
    arguments = ""
    for chunk in client.chat.completions.create(model=model, stream=True,
                                                messages=[{"role": "user", "content": "save my address"}]):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                arguments += (call.function.arguments or "") if call.function else ""
    assert json.loads(arguments) == {"address": "<STREET_ADDRESS>"}, arguments  # as checked whole


def test_an_escape_split_before_a_denied_term_blocks_with_none_of_it_sent(gw: RunningGateway) -> None:
    _, chunks = _chunks(gw, "/v1/chat/completions", {"model": "denied", "messages": [{"role": "user",
                                                                                      "content": "a title"}]})
    assert chunks[-1]["choices"][0]["finish_reason"] == "content_filter"
    sent = _chat_arguments(chunks)
    assert "Str" not in sent, sent  # was `{"title": "Notes on Str\\u00f6me der `: all of the term but its last word


def test_an_escape_split_in_responses_function_call_arguments(gw: RunningGateway) -> None:
    raw, events = _chunks(gw, "/v1/responses", {"model": "responses-address", "input": "save my address"})
    deltas = "".join(e["delta"] for e in events if e.get("type") == "response.function_call_arguments.delta")
    assert json.loads(deltas) == {"address": "<STREET_ADDRESS>"}, deltas
    assert "avenue" not in raw


def test_an_escape_split_in_an_anthropic_upstreams_input_json_delta(gw: RunningGateway) -> None:
    raw, chunks = _chunks(gw, "/v1/chat/completions", {"model": "anthropic-address",
                                                       "messages": [{"role": "user", "content": "save my address"}]})
    arguments = _chat_arguments(chunks)
    assert json.loads(arguments) == {"address": "<STREET_ADDRESS>"}, arguments
    assert "avenue" not in raw


def test_a_choices_message_beside_its_delta_is_dropped(gw: RunningGateway) -> None:
    raw, chunks = _chunks(gw, "/v1/chat/completions", {"model": "perplexity",
                                                       "messages": [{"role": "user", "content": "hi"}]})
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert text == "Write to <EMAIL_ADDRESS> today."
    assert EMAIL not in raw and "mailbox" not in raw, raw  # `message.content` carried it out unredacted
    assert not any("message" in choice for chunk in chunks for choice in chunk["choices"])


def test_a_messages_stream_blocked_in_a_tool_call_writes_no_tool_use(gw: RunningGateway) -> None:
    raw, events = _chunks(gw, "/v1/messages", {"model": "blocked-call", "max_tokens": 64,
                                               "messages": [{"role": "user", "content": "save a note"}]})
    assert "tool_use" not in raw and "_raw_arguments" not in raw, raw
    stop = [e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta"]
    assert stop == ["refusal"]
    sdk = anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=30)
    with sdk.messages.stream(model="blocked-call", max_tokens=64,
                             messages=[{"role": "user", "content": "save a note"}]) as stream:
        message = stream.get_final_message()
    assert [(block.type, getattr(block, "text", None)) for block in message.content] == [("text", "Saving it. ")]
    assert message.stop_reason == "refusal"
