"""Empty text sent to Gemini, through a running gateway reached by the official `openai` SDK.

Gemini refuses a part whose text is empty: proto3 reads "" as unset, and a part must set its `data` ("required
oneof field 'data' must have one initialized field"), and it refuses `contents: []` ("contents is not specified").
The translator sent `{"text": ""}` for an empty system prompt (apps with none configured send `""`), for the empty
caption of an image, and for an assistant tool-call turn whose content is `[{"type": "text", "text": ""}]`: the
client got Gemini's 400 where OpenAI (and an Anthropic alias, whose translator leaves empty text out) answered. A
request of system messages only went as `contents: []`, a 400 read as the client's, so routing never tried a next
target that answers it. Empty text is now left out (and a turn, or `systemInstruction`, left with no part), and a
request with no turn left is `Unsupported`: the next target is tried.

The Gemini mock (tests/support/mock_gemini.py) refuses both as the real API does.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream

GEMINI_KEY = "gemini-empty-text-key"
REPLY = MockUpstream(None).reply_text
IMAGE = ("data:image/png;base64,"
         "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[MockUpstream]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def client(gemini: MockGemini, openai_upstream: MockUpstream) -> Iterator[openai.OpenAI]:
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY}}
          openai: {{kind: openai, base_url: {openai_upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          gem: {{provider: gemini, model: gemini-mock}}
          gem-then-openai:
            targets: [{{provider: gemini, model: gemini-mock}}, {{provider: openai, model: mock-model}}]
        """)
    gateway = RunningGateway(text, {"GEMINI_KEY": GEMINI_KEY, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    try:
        with openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
            yield sdk
    finally:
        gateway.stop()


def _answer(client: openai.OpenAI, model: str, messages: list[dict[str, Any]], stream: bool) -> str:
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=messages, stream=True) if chunk.choices)  # type: ignore[arg-type]
    return client.chat.completions.create(model=model, messages=messages).choices[0].message.content or ""  # type: ignore[arg-type]


CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    # an app with no system prompt configured sends it empty: no `systemInstruction` at all
    "empty-system": ([{"role": "system", "content": ""}, {"role": "user", "content": "Say hello"}],
                     {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}),
    # an image sent without a caption: the UI's text part is empty
    "empty-caption": ([{"role": "user", "content": [{"type": "text", "text": ""},
                                                    {"type": "image_url", "image_url": {"url": IMAGE}}]}],
                      {"contents": [{"role": "user", "parts": [{"inlineData": {
                          "mimeType": "image/png", "data": IMAGE.partition(",")[2]}}]}]}),
    # an assistant tool-call turn whose content is one empty text part
    "empty-assistant-part": (
        [{"role": "user", "content": "ping"},
         {"role": "assistant", "content": [{"type": "text", "text": ""}],
          "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "echo", "arguments": "{}"}}]},
         {"role": "tool", "tool_call_id": "c1", "content": "pong"}],
        {"contents": [{"role": "user", "parts": [{"text": "ping"}]},
                      {"role": "model", "parts": [{"functionCall": {"name": "echo", "args": {}}}]},
                      {"role": "user", "parts": [{"functionResponse": {"name": "echo",
                                                                       "response": {"result": "pong"}}}]}]}),
    # an empty user message between two turns, and an empty developer message beside a real system prompt
    "empty-turn-and-developer": (
        [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [{"type": "text", "text": ""}]},
         {"role": "user", "content": "Hi"}, {"role": "user", "content": ""}],
        {"contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
         "systemInstruction": {"parts": [{"text": "Be brief."}]}}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("case", list(CASES))
def test_empty_text_is_left_out_of_what_gemini_gets(case: str, stream: bool, client: openai.OpenAI,
                                                    gemini: MockGemini) -> None:
    messages, sent = CASES[case]
    gemini.clear()
    assert _answer(client, "gem", messages, stream) == REPLY  # was Gemini's 400 "required oneof field 'data' ..."
    body = gemini.requests[-1].json
    assert {key: body[key] for key in ("contents", "systemInstruction") if key in body} == sent


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Say hello"}],
    [{"role": "system", "content": "Say hello"}, {"role": "user", "content": ""}],
], ids=["system-only", "system-and-empty-user"])
def test_a_request_with_no_turn_for_gemini_goes_to_the_next_target(messages: list[dict[str, Any]], stream: bool,
                                                                   client: openai.OpenAI, gemini: MockGemini,
                                                                   openai_upstream: MockUpstream) -> None:
    gemini.clear()
    openai_upstream.clear()
    assert _answer(client, "gem-then-openai", messages, stream) == REPLY  # was Gemini's 400, with no fallback
    assert gemini.requests == []  # never sent as `contents: []`
    assert openai_upstream.requests[-1].json["messages"] == messages


def test_with_no_target_left_the_client_is_told_what_gemini_lacks(client: openai.OpenAI, gemini: MockGemini) -> None:
    gemini.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gem", messages=[{"role": "system", "content": "Say hello"}])
    error: Any = caught.value.body
    assert error["code"] == "unsupported_parameter" and error["param"] == "messages"
    assert "Gemini" in error["message"]
    assert gemini.requests == []
