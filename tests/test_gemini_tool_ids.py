"""Gemini's tool calls across turns, through a real gateway: their ids, their signatures elsewhere, broken calls.

A mock of Google's Generative Language API (tests/support/mock_gemini.py, plus
the few answers below it has no fault for, each checked against `google-genai`'s
types) and the OpenAI mock stand behind one gateway, reached by the official
`openai` SDK, which also keeps each turn's assistant message as a client would.

* The gateway makes the tool call ids (Gemini sends none): they were `call_0`,
  `call_1`... in every answer, so a conversation's second tool turn reused its
  first's ids. An old history with such ids still reaches Gemini turn by turn.
* A tool call's `extra_content` (Gemini's thought signature) reached an OpenAI
  target as it was, a field such a server may refuse.
* `MALFORMED_FUNCTION_CALL` was a `stop` with an empty answer: now a 502, which
  routing falls back on.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web
from google.genai import types as genai

from gateway.policy import compile_text
from gateway.providers import build_provider
from gateway.providers.base import Call
from gateway.schemas.endpoints import Endpoint
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import SIGNATURE, MockGemini, _sse
from tests.support.mock_upstream import _RECORD, MockUpstream, SseAnswer, _deliver_stream, _send

GEMINI_KEY = "gemini-tool-ids-key"
ID = re.compile(r"call_[0-9a-f]{12}_(\d+)")
TOOLS: Any = [{"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}}}}]
USAGE = {"promptTokenCount": 5, "candidatesTokenCount": 0, "totalTokenCount": 5}
TRIED = "Malformed function call: print(default_api.echo(text='hi'))"


def _call(name: str, args: dict[str, Any], signed: bool = False) -> dict[str, Any]:
    return {"functionCall": {"name": name, "args": args}, **({"thoughtSignature": SIGNATURE} if signed else {})}


def _event(parts: list[dict[str, Any]] | None, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts} if parts else {}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
        if finish == "MALFORMED_FUNCTION_CALL":
            candidate["finishMessage"] = TRIED
    return {"candidates": [candidate], "usageMetadata": USAGE, "modelVersion": "gemini-mock"}


# Answers the mock has no fault for, as the events of a stream (one event: the whole answer too).
ODD: dict[str, list[dict[str, Any]]] = {
    # Two calls in one answer (Gemini signs the first).
    "two-calls": [_event([_call("weather", {"city": "Paris"}, signed=True)]),
                  _event([_call("weather", {"city": "London"})]), _event([{"text": ""}], "STOP")],
    # The model's call was not valid: Gemini leaves it out, the content empty.
    "malformed-call": [_event(None, "MALFORMED_FUNCTION_CALL")],
    # ... after some text, in a stream.
    "malformed-after-text": [_event([{"text": "Let me look that up."}]), _event(None, "MALFORMED_FUNCTION_CALL")],
}


def _whole(events: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [part for event in events for part in event["candidates"][0]["content"].get("parts") or ()]
    return {**events[-1], "candidates": [{**events[-1]["candidates"][0], "content": {
        "role": "model", "parts": parts} if parts else {}}]}


class OddGemini(MockGemini):
    """The Gemini mock, with the answers of `ODD` for those model names."""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if model not in ODD:
            return await super()._generate(request)
        request[_RECORD].model = model
        events = ODD[model]
        if method == "streamGenerateContent":
            return await _deliver_stream(request, SseAnswer([_sse(event) for event in events], 0), None)
        return await _send(request, web.json_response(_whole(events)))


class Mocks:
    def __init__(self, upstream: MockUpstream, gemini: MockUpstream) -> None:
        self.openai = upstream
        self.gemini = gemini


def _policy(mocks: Mocks) -> str:
    from gateway.auth.keys import hash_key

    timeouts = "{connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 20}"
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          openai: {{kind: openai, base_url: {mocks.openai.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                    timeouts: {timeouts}}}
          gemini: {{kind: gemini, base_url: {mocks.gemini.base_url}, api_key_env: GEMINI_KEY, timeouts: {timeouts}}}
        models:
          gemini-tool: {{provider: gemini, model: fault-echo-tool}}
          gemini-two-calls: {{provider: gemini, model: two-calls}}
          gemini-text: {{provider: gemini, model: mock-model}}
          gemini-malformed: {{provider: gemini, model: malformed-call}}
          gemini-malformed-after-text: {{provider: gemini, model: malformed-after-text}}
          openai-chat: {{provider: openai, model: mock-model}}
          failing-gemini-then-openai:
            targets: [{{provider: gemini, model: fault-status-500}}, {{provider: openai, model: mock-model}}]
          malformed-then-openai:
            targets: [{{provider: gemini, model: malformed-call}}, {{provider: openai, model: mock-model}}]
        """)


@pytest.fixture(scope="module")
def mocks(upstream: MockUpstream) -> Iterator[Mocks]:
    with OddGemini(GEMINI_KEY) as gemini:
        yield Mocks(upstream, gemini)


@pytest.fixture(scope="module")
def gw(mocks: Mocks) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(mocks), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GEMINI_KEY": GEMINI_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, mocks: Mocks) -> Iterator[openai.OpenAI]:
    mocks.openai.clear()
    mocks.gemini.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def _turn(client: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    """The assistant's message, from a complete answer or a whole stream (the SDK's own accumulation)."""
    if stream:
        with client.chat.completions.stream(**kwargs) as events:
            return events.get_final_completion().choices[0].message
    return client.chat.completions.create(**kwargs).choices[0].message


def _with_results(history: list[Any], message: Any) -> list[Any]:
    """`history`, the assistant's `message` as the SDK gives it (its `extra_content` kept), and a result per call."""
    return [*history, message.model_dump(exclude_none=True),
            *({"role": "tool", "tool_call_id": call.id, "content": f'{{"done": "{call.id}"}}'}
              for call in message.tool_calls)]


# -- tool call ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_ids_are_not_repeated_by_the_next_turn(stream: bool, client: openai.OpenAI, mocks: Mocks) -> None:
    """Turn after turn, Gemini calls a function: each answer's call had the id `call_0`, so the second turn's call
    (and its result) had the first's id. Each answer's ids are its own now; Gemini still gets each result as the
    answer to its own turn's call, signed as it was."""
    history: list[Any] = [{"role": "user", "content": "say hi, then again"}]
    ids = []
    for _ in range(2):
        message = _turn(client, stream, model="gemini-tool", messages=history, tools=TOOLS)
        (call,) = message.tool_calls
        assert ID.fullmatch(call.id), call.id
        assert (call.model_extra or {}).get("extra_content") == {"google": {"thought_signature": SIGNATURE}}
        ids.append(call.id)
        history = _with_results(history, message)
    assert ids[0] != ids[1]
    _turn(client, stream, model="gemini-text", messages=history, tools=TOOLS)
    contents = mocks.gemini.requests[-1].json["contents"]
    assert [content["role"] for content in contents] == ["user", "model", "user", "model", "user"]
    assert [part["thoughtSignature"] for part in contents[1]["parts"] + contents[3]["parts"]] == [SIGNATURE] * 2
    assert [content["parts"][0]["functionResponse"]["response"] for content in contents[2::2]] == [
        {"done": ids[0]}, {"done": ids[1]}]


@pytest.mark.parametrize("stream", [False, True])
def test_the_calls_of_one_answer_share_its_prefix(stream: bool, client: openai.OpenAI) -> None:
    """Two calls of one answer: numbered 0 and 1 after the answer's own random part (the same in every chunk of a
    stream); another answer's have another."""
    answers = [_turn(client, stream, model="gemini-two-calls", messages=[{"role": "user", "content": "weather?"}],
                     tools=TOOLS) for _ in range(2)]
    ids = [[call.id for call in message.tool_calls] for message in answers]
    for pair in ids:
        matched = [ID.fullmatch(one) for one in pair]
        assert all(matched) and [m[1] for m in matched if m] == ["0", "1"], pair
        assert pair[0][:-1] == pair[1][:-1]
    assert not set(ids[0]) & set(ids[1])
    if stream:  # every chunk of a call carries its id, which is the id of the call in the accumulated answer
        chunks = list(client.chat.completions.create(model="gemini-two-calls", stream=True, tools=TOOLS,
                                                     messages=[{"role": "user", "content": "weather?"}]))
        streamed = [(call.index, call.id) for chunk in chunks for choice in chunk.choices
                    for call in choice.delta.tool_calls or ()]
        assert [index for index, _ in streamed] == [0, 1] and len({id_ for _, id_ in streamed}) == 2


def test_an_old_history_with_repeated_ids_reaches_gemini_turn_by_turn(client: openai.OpenAI, mocks: Mocks) -> None:
    """A history from before the ids were unique: `call_0` in both turns, for other functions. Each result is named
    by its own turn's call and sent in the place of that call, even when a user message follows a turn's results
    (which joins their content: its results were then left in the order the client sent them)."""
    def calls(*named: tuple[str, str]) -> dict[str, Any]:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}
            for n, (name, city) in enumerate(named)]}

    history = [{"role": "user", "content": "weather?"}, calls(("weather", "Paris"), ("weather", "London")),
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 11}'},
               {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 24}'},
               {"role": "user", "content": "and the time there?"}, calls(("clock", "Paris")),
               {"role": "tool", "tool_call_id": "call_0", "content": '{"time": "10:00"}'}]
    client.chat.completions.create(model="gemini-text", messages=history)  # type: ignore[arg-type]
    contents = mocks.gemini.requests[-1].json["contents"]
    assert contents[2]["parts"] == [{"functionResponse": {"name": "weather", "response": {"temp_c": 24}}},
                                    {"functionResponse": {"name": "weather", "response": {"temp_c": 11}}},
                                    {"text": "and the time there?"}]
    assert contents[3]["parts"] == [{"functionCall": {"name": "clock", "args": {"city": "Paris"}}}]
    assert contents[4]["parts"] == [{"functionResponse": {"name": "clock", "response": {"time": "10:00"}}}]


# -- Gemini's thought signature at another target ------------------------------------------------------


def _gemini_history(client: openai.OpenAI) -> list[Any]:
    history: list[Any] = [{"role": "user", "content": "say hi"}]
    return _with_results(history, _turn(client, False, model="gemini-tool", messages=history, tools=TOOLS))


@pytest.mark.parametrize("model", ["openai-chat", "failing-gemini-then-openai"])
def test_an_openai_target_gets_the_tool_calls_without_extra_content(model: str, client: openai.OpenAI,
                                                                    mocks: Mocks) -> None:
    """A client that goes on with another model, or a fallback from Gemini: the OpenAI-compatible target got the
    tool call's `extra_content` (a field such servers may refuse). It gets the call without it; Gemini, tried first,
    still got its signature."""
    history = _gemini_history(client)
    mocks.gemini.clear()
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS)
    assert answer.choices[0].message.content == mocks.openai.reply_text
    sent = mocks.openai.requests[-1]
    assert b"extra_content" not in sent.body and b"thought_signature" not in sent.body, sent.body
    expected = {key: value for key, value in history[1]["tool_calls"][0].items() if key != "extra_content"}
    assert sent.json["messages"][1]["tool_calls"] == [expected]
    assert sent.json["messages"][2] == history[2]
    if model == "failing-gemini-then-openai":
        tried = mocks.gemini.requests[-1].json["contents"][1]["parts"]
        assert [part.get("thoughtSignature") for part in tried] == [SIGNATURE]


def test_extra_content_is_kept_for_googles_own_openai_compatible_api() -> None:
    """`kind: openai` in front of Google's OpenAI-compatible endpoint: it reads the signature, which stays. A body
    without any is sent as it is, not copied."""
    from gateway.translate.cache_control import without_extra_content

    providers = {}
    for name, url in (("google", "https://generativelanguage.googleapis.com/v1beta/openai"),
                      ("vertex", "https://us-central1-aiplatform.googleapis.com/v1/projects/p/endpoints/openapi"),
                      ("other", "https://api.openai.com/v1")):
        policy = compile_text(f"version: 1\nauth: none\nproviders: {{p: {{kind: openai, base_url: '{url}', "
                              "api_key_env: K}}\nmodels: {m: {provider: p, model: x}}\n", "p.yaml", {"K": "k"})
        providers[name] = build_provider(policy.providers["p"], TokenCounter())
    signed = {"id": "call_1", "type": "function", "function": {"name": "echo", "arguments": "{}"},
              "extra_content": {"google": {"thought_signature": SIGNATURE}}}
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": None, "tool_calls": [signed]}]}
    sent = {name: json.loads(provider._payload(Call(Endpoint.CHAT, body, False, "r")))  # type: ignore[attr-defined]
            for name, provider in providers.items()}
    assert sent["google"] == sent["vertex"] == body
    assert sent["other"]["messages"][1]["tool_calls"] == [{k: v for k, v in signed.items() if k != "extra_content"}]
    assert body["messages"][1]["tool_calls"] == [signed]  # (the request itself is left for a Gemini fallback)
    plain = {"model": "x", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {k: v for k, v in signed.items() if k != "extra_content"}]}]}
    assert without_extra_content(plain) is plain


# -- MALFORMED_FUNCTION_CALL -------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(ODD))
def test_the_odd_answers_are_geminis_own(model: str, mocks: Mocks) -> None:
    for event in [*ODD[model], _whole(ODD[model])]:
        genai.GenerateContentResponse.model_validate(event)
    malformed = genai.GenerateContentResponse.model_validate(ODD["malformed-call"][0]).candidates
    assert malformed and malformed[0].finish_reason == genai.FinishReason.MALFORMED_FUNCTION_CALL


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_function_call_is_an_upstream_error(stream: bool, client: openai.OpenAI) -> None:
    """It was an empty answer with `finish_reason: stop`, which a client takes for the model's last word."""
    with pytest.raises(openai.APIError) as caught:
        if stream:
            list(client.chat.completions.create(model="gemini-malformed", stream=True, tools=TOOLS,
                                                messages=[{"role": "user", "content": "say hi"}]))
        else:
            client.chat.completions.create(model="gemini-malformed", tools=TOOLS,
                                           messages=[{"role": "user", "content": "say hi"}])
    assert "MALFORMED_FUNCTION_CALL" in caught.value.message and "valid function call" in caught.value.message
    assert TRIED not in caught.value.message  # (the model's own attempt is not an error message)
    if isinstance(caught.value, openai.APIStatusError):
        assert caught.value.status_code == 502


@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_function_call_falls_back(stream: bool, client: openai.OpenAI, mocks: Mocks) -> None:
    asked = [{"role": "user", "content": "say hi"}]
    if stream:
        chunks = list(client.chat.completions.create(model="malformed-then-openai", stream=True, messages=asked,
                                                     tools=TOOLS))
        text = "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices)
    else:
        text = client.chat.completions.create(model="malformed-then-openai", messages=asked,  # type: ignore[arg-type]
                                              tools=TOOLS).choices[0].message.content or ""
    assert text == mocks.openai.reply_text
    assert [request.model for request in mocks.gemini.requests] == ["malformed-call"]


def test_a_malformed_function_call_after_text_ends_the_stream_with_an_error(client: openai.OpenAI) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="gemini-malformed-after-text", stream=True, tools=TOOLS,
                                                    messages=[{"role": "user", "content": "say hi"}]):
            received.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(received) == "Let me look that up." and "MALFORMED_FUNCTION_CALL" in caught.value.message


def test_malformed_function_calls_do_not_open_the_targets_breaker(mocks: Mocks) -> None:
    """The endpoint answered and the model misbehaved: however many such answers, the breaker every alias of the target
    shares stays closed (as for a client error), where as many 500s open it."""
    breaker = "routing: {retry: {attempts: 0}, breaker: {failures: 2, cooldown_s: 60}}"
    failing = "  gemini-500: {provider: gemini, model: fault-status-500}\n  gemini-text:"
    policy = _policy(mocks).replace("routing: {breaker: {enabled: false}}", breaker).replace("  gemini-text:", failing)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GEMINI_KEY": GEMINI_KEY}).start()
    try:
        with openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
            asked = [("gemini-malformed", True), ("gemini-malformed", False)] * 2 + [("gemini-500", False)] * 2
            for model, stream in asked:
                with pytest.raises(openai.APIError):
                    answer = sdk.chat.completions.create(model=model, stream=stream, tools=TOOLS,
                                                         messages=[{"role": "user", "content": "say hi"}])
                    if stream:
                        list(answer)  # type: ignore[arg-type]
        state = dict(re.findall(r'^gateway_breaker_state\{target="([^"]+)"\} (\S+)$', running.metrics(), re.M))
        assert (state["gemini/malformed-call"], state["gemini/fault-status-500"]) == ("0.0", "2.0"), state
    finally:
        running.stop()
