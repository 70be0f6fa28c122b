"""A Gemini 3 tool loop through `/v1/messages`: the function call's thought signature rides in the tool_use id.

Gemini 3 refuses its own function call sent back without the `thoughtSignature` it came with (the Gemini mock of
tests/support/ answers 400 as Gemini does). A Chat Completions client gets it on the tool call's `extra_content`;
Messages has no such field, so the answer's tool_use block lost it and every tool loop of the Anthropic SDK (or
Claude Code) on a Gemini 3 target failed at its second turn. The signature now rides in the tool_use id, which the
client sends back unchanged with the call and its result, and the ingress takes it out again.

A real gateway in front of the Gemini and OpenAI mocks, reached by the official `anthropic` SDK, streamed or not.
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from gateway.auth.keys import hash_key
from gateway.translate.anthropic_answer import messages_response
from gateway.translate.anthropic_ingress import chat_request
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import SIGNATURE, MockGemini
from tests.support.mock_upstream import MockUpstream

GEMINI_KEY = "gemini-signature-key"
TOOL: Any = {"name": "echo", "description": "Echo a text",
             "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
TAIL = base64.urlsafe_b64encode(SIGNATURE.encode()).rstrip(b"=").decode()
SIGNED_ID = re.compile(r"(call_[0-9a-f]{12}_\d+)__gts_" + re.escape(TAIL))
COLD = {"temperature": 0}  # cacheable (SDK 2.17 has no `temperature` argument of its own)
ANTHROPIC_ID = re.compile(r"[a-zA-Z0-9_-]+")  # Anthropic's own tool_use ids' alphabet


def _policy(gemini: str, openai: str) -> str:
    timeouts = "{connect_s: 1, first_byte_s: 3, idle_s: 3, total_s: 20}"
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          gemini: {{kind: gemini, base_url: {gemini}, api_key_env: GEMINI_KEY, timeouts: {timeouts}}}
          openai: {{kind: openai, base_url: {openai}, api_key_env: MOCK_UPSTREAM_KEY, timeouts: {timeouts}}}
        models:
          gem-tool: {{provider: gemini, model: fault-echo-tool}}
          gem-tool-cached: {{provider: gemini, model: fault-echo-tool, cache: {{}}}}
          gpt: {{provider: openai, model: mock-model}}
        """)


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(gemini: MockGemini, upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(gemini.base_url, upstream.base_url),
                             {"GEMINI_KEY": GEMINI_KEY, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def ant(gw: RunningGateway, gemini: MockGemini) -> Iterator[anthropic.Anthropic]:
    gemini.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def _create(ant: anthropic.Anthropic, stream: bool, **kwargs: Any) -> Any:
    """The answer, complete or accumulated from the stream by the SDK."""
    if stream:
        with ant.messages.stream(**kwargs) as events:
            return events.get_final_message()
    return ant.messages.create(**kwargs)


def _loop(first: Any, history: list[Any]) -> list[Any]:
    """`history`, the answer's blocks as the SDK's tool loop sends them back, and the result of its tool call."""
    use = first.content[-1]
    blocks = [block.model_dump(exclude_none=True) for block in first.content]
    return [*history, {"role": "assistant", "content": blocks},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "done"}]}]


@pytest.mark.parametrize("stream", [False, True])
def test_the_tool_loop_goes_on_with_the_calls_signature(stream: bool, ant: anthropic.Anthropic,
                                                        gemini: MockGemini) -> None:
    """The second turn (the call and its result sent back) was Gemini's 400 "Function call is missing a
    thought_signature": now a 200, Gemini getting the call signed and the result named after the call."""
    history: list[Any] = [{"role": "user", "content": "ping pong"}]
    first = _create(ant, stream, model="gem-tool", max_tokens=200, tools=[TOOL], messages=history)
    use = first.content[-1]
    assert use.type == "tool_use" and use.name == "echo"
    assert SIGNED_ID.fullmatch(use.id) and ANTHROPIC_ID.fullmatch(use.id), use.id
    second = _create(ant, stream, model="gem-tool", max_tokens=200, tools=[TOOL], messages=_loop(first, history))
    assert second.content[-1].type == "tool_use"
    contents = gemini.requests[-1].json["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user"]
    assert contents[1]["parts"] == [{"functionCall": {"name": "echo", "args": use.input},
                                     "thoughtSignature": SIGNATURE}]
    assert contents[2]["parts"][0]["functionResponse"]["name"] == "echo"


@pytest.mark.parametrize("stream", [False, True])
def test_another_target_gets_the_calls_own_id(stream: bool, ant: anthropic.Anthropic,
                                              upstream: MockUpstream) -> None:
    """A client that goes on with another model: the call and its result carry the call's own id (the same in
    both), and an OpenAI target gets no signature (`without_extra_content`)."""
    history: list[Any] = [{"role": "user", "content": "ping pong"}]
    first = _create(ant, stream, model="gem-tool", max_tokens=200, tools=[TOOL], messages=history)
    matched = SIGNED_ID.fullmatch(first.content[-1].id)
    assert matched, first.content[-1].id
    upstream.clear()
    _create(ant, stream, model="gpt", max_tokens=50, tools=[TOOL], messages=_loop(first, history))
    sent = upstream.requests[-1]
    messages = sent.json["messages"]
    assert messages[1]["tool_calls"][0]["id"] == matched[1] == messages[2]["tool_call_id"]
    assert b"thought_signature" not in sent.body and b"__gts_" not in sent.body


@pytest.mark.parametrize("stream", [False, True])
def test_a_cached_answer_keeps_the_signature(stream: bool, ant: anthropic.Anthropic, gemini: MockGemini) -> None:
    """A cache hit is the same answer: its tool_use id carries the signature too, and the loop goes on."""
    history: list[Any] = [{"role": "user", "content": f"cached ping {stream}"}]
    answers = [_create(ant, stream, model="gem-tool-cached", max_tokens=200, tools=[TOOL], messages=history,
                       extra_body=COLD)
               for _ in range(2)]
    assert len(gemini.requests) == 1  # the second came from the cache
    assert answers[0].content[-1].id == answers[1].content[-1].id
    assert SIGNED_ID.fullmatch(answers[1].content[-1].id)
    second = _create(ant, stream, model="gem-tool-cached", max_tokens=200, tools=[TOOL],
                     messages=_loop(answers[1], history), extra_body=COLD)
    assert second.content[-1].type == "tool_use"


def test_a_long_signature_goes_back_whole() -> None:
    """A signature of several KB (Gemini's can be long) and of any characters: the id grows with it (no bound:
    a cut signature would be refused), stays in Anthropic's alphabet, and comes back exactly."""
    signature = base64.b64encode(bytes(range(256)) * 24).decode() + "é+/="
    answer = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [{
            "id": "call_0", "type": "function", "function": {"name": "echo", "arguments": "{}"},
            "extra_content": {"google": {"thought_signature": signature}}}]}}]}
    use = json.loads(messages_response(json.dumps(answer).encode(), "gem"))["content"][0]
    assert ANTHROPIC_ID.fullmatch(use["id"]) and len(use["id"]) > 8000
    body = {"model": "gem", "max_tokens": 10, "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"], "content": "x"}]}]}
    chat, _ = chat_request(json.dumps(body).encode())
    assert chat["messages"][1]["tool_calls"][0]["id"] == "call_0" == chat["messages"][2]["tool_call_id"]
    assert chat["messages"][1]["tool_calls"][0]["extra_content"] == {"google": {"thought_signature": signature}}


def test_only_a_signature_encoded_after_the_mark_is_taken_out() -> None:
    """The mark with the exact encoding of a signature after it: the call's own id and its signature; an id with
    nothing, or anything else, after the mark is the client's own: it goes on as it is, unsigned."""
    ids = {f"call_x__gts_{TAIL}": ("call_x", SIGNATURE), "toolu_01__gts_": ("toolu_01__gts_", None),
           "toolu_01__gts_!!!": ("toolu_01__gts_!!!", None), "toolu_01__gts_A": ("toolu_01__gts_A", None),
           "call_x__gts_YWI=": ("call_x__gts_YWI=", None), "toolu_01ABC": ("toolu_01ABC", None)}
    for sent, (own, signature) in ids.items():
        body = {"model": "gem", "max_tokens": 10, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": sent, "name": "echo", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": sent, "content": "x"}]}]}
        chat, _ = chat_request(json.dumps(body).encode())
        call = chat["messages"][1]["tool_calls"][0]
        assert call["id"] == own == chat["messages"][2]["tool_call_id"], sent
        extra = {"google": {"thought_signature": signature}} if signature else None
        assert call.get("extra_content") == extra, sent


def test_a_refused_field_is_named_as_the_messages_client_sent_it(ant: anthropic.Anthropic) -> None:
    """Gemini has no way to forbid parallel calls: the 400 names `tool_choice.disable_parallel_tool_use`, the field
    the client sent, not `parallel_tool_calls`, the Chat Completions field the ingress wrote from it."""
    with pytest.raises(anthropic.BadRequestError) as refused:
        ant.messages.create(model="gem-tool", max_tokens=50, tools=[TOOL],
                            tool_choice={"type": "any", "disable_parallel_tool_use": True},
                            messages=[{"role": "user", "content": "echo hi"}])
    message = refused.value.body["error"]["message"]  # type: ignore[index]
    assert "`tool_choice.disable_parallel_tool_use`" in message and "parallel_tool_calls" not in message, message
