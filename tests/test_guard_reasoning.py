"""Output guards read the texts beside an answer's content: a reasoning model's reasoning and a refusal.

OpenAI-compatible servers of reasoning models (vLLM, DeepSeek, OpenRouter, Groq) return the model's
reasoning in `reasoning_content` or `reasoning`, and the Responses API in `reasoning` items; a refusal is
text too. The reasoning often repeats what the prompt held, so an output guard that read only `content`
let it out. The mock upstream echoes the prompt as the reasoning (`fault-echo-reasoning`) or as the
refusal (`fault-echo-refusal`), complete and streamed; the clients are httpx and the openai SDK.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_reasoning import ANSWER
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
EMAIL = "jane.doe@mailbox.org"
SECRET = "AKIAIOSFODNN7EXAMPLQ"
PROMPT = f"Think about writing to {EMAIL} about the report today"
REDACTED = PROMPT.replace(EMAIL, "<EMAIL_ADDRESS>")


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          thinks: {{provider: mock, model: fault-echo-reasoning}}
          refuses: {{provider: mock, model: fault-echo-refusal}}
          thinks-open: {{provider: mock, model: fault-echo-reasoning}}
        guards:
          stream: {{window_chars: 32, step_chars: 8}}
          models:
            thinks: &out
              pii: {{kind: pii, places: [output], entities: {{EMAIL_ADDRESS: {{}}}}}}
              secrets: {{kind: secrets, places: [output], action: block}}
            refuses: *out
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + path, headers=AUTH, json=body, timeout=20)


def _events(gw: RunningGateway, path: str, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The raw stream and its JSON events (`[DONE]` left out)."""
    with httpx.stream("POST", gw.base_url + path, headers=AUTH, json={**body, "stream": True},
                      timeout=20) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    payloads = [line.removeprefix("data: ") for line in raw.split("\n") if line.startswith("data: ")]
    return raw, [json.loads(p) for p in payloads if p != "[DONE]"]


def _chat(model: str, text: str = PROMPT) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def _deltas(chunks: list[dict[str, Any]], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c.get("choices"))


# -- chat completions ------------------------------------------------------------------------------


def test_a_chat_answers_reasoning_is_guarded(gw: RunningGateway) -> None:
    message = _post(gw, "/chat/completions", _chat("thinks")).json()["choices"][0]["message"]
    assert message["content"] == ANSWER
    assert message["reasoning_content"] == REDACTED and message["reasoning"] == REDACTED
    assert "reasoning_details" not in message  # a copy the guards do not read: dropped
    unguarded = _post(gw, "/chat/completions", _chat("thinks-open")).json()["choices"][0]["message"]
    assert unguarded["reasoning_content"] == PROMPT and unguarded["reasoning_details"]  # (the upstream's, as sent)


def test_a_streamed_chat_answers_reasoning_is_guarded_and_leaves_before_the_answer(gw: RunningGateway) -> None:
    raw, chunks = _events(gw, "/chat/completions", _chat("thinks"))
    assert EMAIL not in raw and "reasoning_details" not in raw
    assert _deltas(chunks, "reasoning_content") == REDACTED and _deltas(chunks, "reasoning") == REDACTED
    assert _deltas(chunks, "content") == ANSWER
    answering = next(i for i, c in enumerate(chunks) if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert not _deltas(chunks[answering + 1:], "reasoning_content")  # all of it came before the answer
    assert len([c for c in chunks[:answering] if _deltas([c], "reasoning_content")]) > 2  # piece by piece
    _, unguarded = _events(gw, "/chat/completions", _chat("thinks-open"))
    assert _deltas(unguarded, "reasoning_content") == PROMPT


def test_a_refusal_is_guarded_whole_and_streamed(gw: RunningGateway) -> None:
    message = _post(gw, "/chat/completions", _chat("refuses")).json()["choices"][0]["message"]
    assert message["refusal"] == REDACTED and message["content"] is None
    raw, chunks = _events(gw, "/chat/completions", _chat("refuses"))
    assert EMAIL not in raw and _deltas(chunks, "refusal") == REDACTED


def test_a_blocking_finding_in_the_reasoning_blocks_the_answer(gw: RunningGateway) -> None:
    text = f"Remember the key {SECRET} for later use"
    choice = _post(gw, "/chat/completions", _chat("thinks", text)).json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and choice["message"]["content"] is None
    assert SECRET not in json.dumps(choice) and "reasoning_content" not in choice["message"]
    raw, chunks = _events(gw, "/chat/completions", _chat("thinks", text))
    assert SECRET not in raw and "AKIA" not in raw
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "content_filter"


def test_the_sdk_reads_a_guarded_reasoning_stream(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0)
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="thinks", messages=_chat("thinks")["messages"], stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
    assert (reasoning, content) == (REDACTED, ANSWER)


# -- the Responses API -----------------------------------------------------------------------------


def _texts(output: list[dict[str, Any]]) -> dict[str, str]:
    """Each kind of text of a response's output, joined."""
    found: dict[str, str] = {}
    for item in output:
        for field in ("summary", "content"):
            for part in item.get(field) or ():
                key = "refusal" if part["type"] == "refusal" else "text"
                found[part["type"]] = found.get(part["type"], "") + part[key]
    return found


def test_a_responses_answers_reasoning_and_refusal_are_guarded(gw: RunningGateway) -> None:
    answer = _post(gw, "/responses", {"model": "thinks", "input": PROMPT}).json()
    assert _texts(answer["output"]) == {"summary_text": REDACTED, "reasoning_text": REDACTED, "output_text": ANSWER}
    answer = _post(gw, "/responses", {"model": "refuses", "input": PROMPT}).json()
    assert _texts(answer["output"]) == {"refusal": REDACTED}
    blocked = _post(gw, "/responses", {"model": "thinks", "input": f"the key {SECRET} here"}).json()
    assert blocked["status"] == "incomplete" and SECRET not in json.dumps(blocked)


@pytest.mark.parametrize(("model", "kinds"), [
    ("thinks", {"response.reasoning_summary_text.delta": "summary_text",
                "response.reasoning_text.delta": "reasoning_text", "response.output_text.delta": "output_text"}),
    ("refuses", {"response.refusal.delta": "refusal"}),
])
def test_a_responses_stream_is_guarded_in_every_text(gw: RunningGateway, model: str, kinds: dict[str, str]) -> None:
    raw, events = _events(gw, "/responses", {"model": model, "input": PROMPT})
    assert EMAIL not in raw
    streamed: dict[str, str] = {}
    for event in events:
        if event["type"] in kinds:
            streamed[kinds[event["type"]]] = streamed.get(kinds[event["type"]], "") + event["delta"]
    final = next(e for e in events if e["type"] == "response.completed")["response"]
    assert streamed == _texts(final["output"]) == ({"refusal": REDACTED} if model == "refuses" else {
        "summary_text": REDACTED, "reasoning_text": REDACTED, "output_text": ANSWER})
    numbers = [e["sequence_number"] for e in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    client = openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0)
    with client.responses.stream(model=model, input=PROMPT) as stream:  # the SDK's own reading of the events
        final_sdk = stream.get_final_response()
    assert EMAIL not in final_sdk.model_dump_json()


def test_a_blocked_responses_stream_leaks_nothing_of_its_reasoning(gw: RunningGateway) -> None:
    raw, events = _events(gw, "/responses", {"model": "thinks", "input": f"Remember the key {SECRET} for later"})
    assert SECRET not in raw and "AKIA" not in raw
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "content_filter"}
