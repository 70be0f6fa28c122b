"""Every Gemini `finishReason`, through a real gateway: the finish reason a client gets, or the error.

A mock of Google's Generative Language API (tests/support/mock_gemini.py, with
the answers below, each checked against `google-genai`'s types) and the OpenAI
mock stand behind one gateway, reached by the official `openai` SDK. The user's
message names the answer the mock gives: `"<REASON> <shape>"`.

Gemini's newer reasons were all `stop`, so that a failed answer looked like a
good one: a model's failure (`UNEXPECTED_TOOL_CALL`, `TOO_MANY_TOOL_CALLS`,
`MALFORMED_RESPONSE`, `NO_IMAGE`) is now a 502 that routing retries and falls
back from (as `MALFORMED_FUNCTION_CALL` was already: tests/test_gemini_tool_ids.py);
a missing thought signature (`MISSING_THOUGHT_SIGNATURE`) is the request's fault:
the next target, not retried on Gemini, else a 400 `unsupported_parameter`; a
filter's or a policy's (`LANGUAGE`, the image filters, `ESCALATION`, `MODEL_ARMOR`)
`content_filter`; `CONTINUATION` `length`;
a limited account (`PUP_LIMITED_DISABLED`) a 502 that counts against the target;
an empty answer with a reason that says nothing of it (`OTHER`, a value Google
adds later) a 502, where one with content stays `stop`.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from google.genai import types as genai

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import MockGemini, _sse, _user_text
from tests.support.mock_upstream import _RECORD, MockUpstream, SseAnswer, _deliver_stream, _send

GEMINI_KEY = "gemini-finish-reasons-key"
TOOLS: Any = [{"type": "function", "function": {"name": "echo", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}}}}}]
TEXT = "Half of an answer."
SAID = "Unexpected tool call: print(default_api.secret_function())"  # a `finishMessage`: the model's words
UNKNOWN = "FUTURE_REASON"  # a value Google may add after google-genai's list
FAILED = {  # the model's failures new to the gateway, and what the error says of each
    "UNEXPECTED_TOOL_CALL": "called a function it was not given",
    "TOO_MANY_TOOL_CALLS": "too many tool calls",
    "MALFORMED_RESPONSE": "malformed answer",
    "NO_IMAGE": "no image",
}
FILTERED = ["LANGUAGE", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "ESCALATION", "MODEL_ARMOR"]
VAGUE = ["OTHER", "FINISH_REASON_UNSPECIFIED", UNKNOWN]
ERROR = "error"  # an outcome: the client got an error, not an answer
# What a client gets for each reason, for an answer with text and for an empty one.
EXPECTED: dict[str, tuple[str, str]] = {
    "STOP": ("stop", "stop"), "MAX_TOKENS": ("length", "length"), "CONTINUATION": ("length", "length"),
    **{reason: ("content_filter", "content_filter") for reason in (
        "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", *FILTERED)},
    **{reason: (ERROR, ERROR) for reason in ("MALFORMED_FUNCTION_CALL", "PUP_LIMITED_DISABLED",
                                             "MISSING_THOUGHT_SIGNATURE", *FAILED)},
    **{reason: ("stop", ERROR) for reason in VAGUE},
}
USAGE = {"promptTokenCount": 5, "candidatesTokenCount": 4, "totalTokenCount": 9}


def _event(parts: list[dict[str, Any]] | None, reason: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts} if parts else {}, "index": 0}
    if reason:
        candidate["finishReason"] = reason
        if reason != "STOP":
            candidate["finishMessage"] = SAID
    return {"candidates": [candidate], "usageMetadata": USAGE, "modelVersion": "gemini-mock",
            "responseId": "resp-finish"}


def events(reason: str, shape: str) -> list[dict[str, Any]]:
    """An answer that ends with `reason`, as the events of its stream (one event: the whole answer too). `shape`:
    `empty` (no content), `text` (text, then the reason), `whole` (text and the reason in one event), `call`."""
    if shape == "empty":
        return [_event(None, reason)]
    if shape == "whole":
        return [_event([{"text": TEXT}], reason)]
    if shape == "call":
        return [_event([{"functionCall": {"name": "echo", "args": {"text": "hi"}}}]), _event(None, reason)]
    return [_event([{"text": TEXT}]), _event(None, reason)]


def _whole(answer: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [part for event in answer for part in event["candidates"][0]["content"].get("parts") or ()]
    return {**answer[-1], "candidates": [{**answer[-1]["candidates"][0], "content": {
        "role": "model", "parts": parts} if parts else {}}]}


class FinishingGemini(MockGemini):
    """The Gemini mock; its models `finishes*` answer as the user's message says (`events`)."""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if not model.startswith("finishes"):
            return await super()._generate(request)
        request[_RECORD].model = model
        body = request[_RECORD].json
        assert isinstance(body, dict)
        reason, shape = _user_text(body).split()
        answer = events(reason, shape)
        if method == "streamGenerateContent":
            return await _deliver_stream(request, SseAnswer([_sse(event) for event in answer], 0), None)
        return await _send(request, web.json_response(_whole(answer)))


@dataclass
class Mocks:
    openai: MockUpstream
    gemini: MockUpstream


def _policy(mocks: Mocks, routing: str = "{breaker: {enabled: false}}") -> str:
    from gateway.auth.keys import hash_key

    timeouts = "{connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 20}"
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {routing}
        providers:
          openai: {{kind: openai, base_url: {mocks.openai.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                    timeouts: {timeouts}}}
          gemini: {{kind: gemini, base_url: {mocks.gemini.base_url}, api_key_env: GEMINI_KEY, timeouts: {timeouts}}}
        models:
          gemini-finishes: {{provider: gemini, model: finishes}}
          gemini-finishes-too: {{provider: gemini, model: finishes-too}}
          finishes-then-openai:
            targets:
              - {{provider: gemini, model: finishes, retry: {{attempts: 1, backoff_s: 0.001, backoff_max_s: 0.001}}}}
              - {{provider: openai, model: mock-model}}
        """)


@pytest.fixture(scope="module")
def mocks(upstream: MockUpstream) -> Iterator[Mocks]:
    with FinishingGemini(GEMINI_KEY) as gemini:
        yield Mocks(upstream, gemini)


def _start(policy: str) -> RunningGateway:
    return RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GEMINI_KEY": GEMINI_KEY}).start()


@pytest.fixture(scope="module")
def gw(mocks: Mocks) -> Iterator[RunningGateway]:
    running = _start(_policy(mocks))
    yield running
    running.stop()


@pytest.fixture
def client(gw: RunningGateway, mocks: Mocks) -> Iterator[openai.OpenAI]:
    mocks.openai.clear()
    mocks.gemini.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


@dataclass
class Outcome:
    finish: str  # the finish reason, or ERROR
    text: str  # the answer's text (a stream's: what came before an error)
    message: str = ""  # the error's
    status: int | None = None  # the error's HTTP status (none for a stream's error event: a lone target's stream
    # is not held back until its first content, as a stream that could fall back is)
    calls: int = 0


def ask(client: openai.OpenAI, stream: bool, reason: str, shape: str, model: str = "gemini-finishes") -> Outcome:
    messages: Any = [{"role": "user", "content": f"{reason} {shape}"}]
    text: list[str] = []
    try:
        if not stream:
            choice = client.chat.completions.create(model=model, messages=messages, tools=TOOLS).choices[0]
            return Outcome(choice.finish_reason, choice.message.content or "", calls=len(
                choice.message.tool_calls or ()))
        finishes, calls = [], 0
        for chunk in client.chat.completions.create(model=model, messages=messages, tools=TOOLS, stream=True):
            for one in chunk.choices:
                text.append(one.delta.content or "")
                calls += len(one.delta.tool_calls or ())
                finishes += [one.finish_reason] if one.finish_reason else []
        assert len(finishes) == 1, finishes
        return Outcome(finishes[0], "".join(text), calls=calls)
    except openai.APIError as exc:
        status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        return Outcome(ERROR, "".join(text), exc.message, status)


# -- the whole table ------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_every_finish_reason_has_its_outcome(stream: bool, client: openai.OpenAI) -> None:
    """Each of Gemini's reasons (every value google-genai knows, and one it does not yet), after some text and on an
    empty answer: the outcome in `EXPECTED` (a new google-genai with a value not in it fails here first)."""
    known = {reason.value for reason in genai.FinishReason}
    assert known | {UNKNOWN} == set(EXPECTED), "a Gemini finish reason the gateway has not placed"
    got = {}
    for reason in sorted(EXPECTED):
        for shape in ("text", "empty"):
            answer = events(reason, shape)
            if reason in known:  # the mock's answers are Gemini's own
                for event in [*answer, _whole(answer)]:
                    genai.GenerateContentResponse.model_validate(event)
            got[reason, shape] = ask(client, stream, reason, shape).finish
    wanted = {(reason, shape): EXPECTED[reason][shape == "empty"] for reason, shape in got}
    assert {key: value for key, value in got.items() if value != wanted[key]} == {}


# -- the model's failures: a 502 --------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reason", list(FAILED))
def test_a_models_failure_is_an_upstream_error(reason: str, stream: bool, client: openai.OpenAI) -> None:
    """It was an empty answer with `finish_reason: stop`: a client took it for the model's last word. Its message
    says what failed, not what the model said (`finishMessage`)."""
    got = ask(client, stream, reason, "empty")
    assert got.finish == ERROR and got.status in ((None, 502) if stream else (502,)), got
    assert reason in got.message and FAILED[reason] in got.message, got.message
    assert SAID not in got.message and "secret_function" not in got.message


@pytest.mark.parametrize("stream", [False, True])
def test_a_missing_thought_signature_is_the_requests_fault(stream: bool, client: openai.OpenAI,
                                                           mocks: Mocks) -> None:
    """The history lacks what Gemini needs back (`extra_content`): not retried on Gemini, where it fails again, but
    sent to the next target; a lone Gemini target's client gets a 400 that says what to send back."""
    got = ask(client, stream, "MISSING_THOUGHT_SIGNATURE", "empty")
    assert got.finish == ERROR and "extra_content" in got.message and "MISSING_THOUGHT_SIGNATURE" in got.message, got
    if not stream:
        assert got.status == 400, got
    mocks.gemini.clear()
    got = ask(client, stream, "MISSING_THOUGHT_SIGNATURE", "empty", model="finishes-then-openai")
    assert got == Outcome("stop", mocks.openai.reply_text), got
    assert [request.model for request in mocks.gemini.requests] == ["finishes"]  # (no retry on Gemini)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reason", list(FAILED))
def test_a_models_failure_after_text_is_an_error_too(reason: str, stream: bool, client: openai.OpenAI) -> None:
    """After some text: a complete answer is a 502 (the text is not an answer); a stream has sent it, and ends with
    the error's event instead of a finish reason."""
    got = ask(client, stream, reason, "text")
    assert got.finish == ERROR and reason in got.message, got
    assert (got.text, got.status) == ((TEXT, None) if stream else ("", 502)), got


# -- filters and policies: content_filter; CONTINUATION: length -------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reason", FILTERED)
def test_a_filter_or_a_policy_is_content_filter(reason: str, stream: bool, client: openai.OpenAI) -> None:
    """The answer was cut or withheld: `content_filter`, with what came before, not a `stop` that says it is whole."""
    for shape in ("text", "whole"):
        assert ask(client, stream, reason, shape) == Outcome("content_filter", TEXT), shape


@pytest.mark.parametrize("stream", [False, True])
def test_continuation_is_a_truncated_answer(stream: bool, client: openai.OpenAI) -> None:
    """`CONTINUATION`: cut at a per-request limit before its end, as `MAX_TOKENS` (a call so cut too)."""
    assert ask(client, stream, "CONTINUATION", "text") == Outcome("length", TEXT)
    assert ask(client, stream, "CONTINUATION", "call") == Outcome("length", "", calls=1)
    assert ask(client, stream, "STOP", "call") == Outcome("tool_calls", "", calls=1)  # (beside a whole call)


# -- reasons that say nothing of the answer --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reason", VAGUE)
def test_an_empty_answer_with_a_vague_reason_is_an_error(reason: str, stream: bool, client: openai.OpenAI) -> None:
    """`OTHER`, `FINISH_REASON_UNSPECIFIED` or a value Google adds later: an answer with content is kept (`stop`,
    `tool_calls`), in a stream whether its content came before the reason or with it; an empty one is no answer."""
    got = ask(client, stream, reason, "empty")
    assert got.finish == ERROR and got.status in ((None, 502) if stream else (502,)), got
    assert f"finish reason {reason}" in got.message, got.message
    assert "empty answer" in got.message and SAID not in got.message
    for shape in ("text", "whole"):
        assert ask(client, stream, reason, shape) == Outcome("stop", TEXT), shape
    assert ask(client, stream, reason, "call") == Outcome("tool_calls", "", calls=1)


# -- routing: retried, fallen back from; the breaker ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("reason", [*FAILED, "OTHER", "PUP_LIMITED_DISABLED"])
def test_an_unusable_answer_is_retried_then_falls_back(reason: str, stream: bool, client: openai.OpenAI,
                                                       mocks: Mocks) -> None:
    """Gemini's target is tried twice (`retry.attempts: 1`), then the OpenAI target answers."""
    got = ask(client, stream, reason, "empty", model="finishes-then-openai")
    assert got == Outcome("stop", mocks.openai.reply_text), got
    assert [request.model for request in mocks.gemini.requests] == ["finishes", "finishes"]
    assert len(mocks.openai.requests) == 1


def test_only_a_limited_account_opens_the_breaker(mocks: Mocks) -> None:
    """The model's failures say nothing of the endpoint (it answered): however many, the target's breaker stays
    closed. `PUP_LIMITED_DISABLED` says the key's account is limited, so that every request will fail: as many
    of those open it, as 500s would."""
    running = _start(_policy(mocks, "{retry: {attempts: 0}, breaker: {failures: 2, cooldown_s: 60}}"))
    try:
        with openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
            for stream in (False, True):
                for reason in FAILED:
                    assert ask(sdk, stream, reason, "empty").finish == ERROR
                assert ask(sdk, stream, UNKNOWN, "empty").finish == ERROR
                assert ask(sdk, stream, "PUP_LIMITED_DISABLED", "empty", model="gemini-finishes-too").finish == ERROR
        state = dict(re.findall(r'^gateway_breaker_state\{target="([^"]+)"\} (\S+)$', running.metrics(), re.M))
        assert (state["gemini/finishes"], state["gemini/finishes-too"]) == ("0.0", "2.0"), state
    finally:
        running.stop()
