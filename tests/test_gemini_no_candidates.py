"""A Gemini answer with no candidates (and no `promptFeedback.blockReason`) is no answer, complete as streamed.

Gemini sends such answers (`candidates: []`, or no `candidates` key, beside its `usageMetadata`). Streamed, one
already counted as no answer (the stream ended before a finish reason): the next target, or an error event.
Complete, it was a 200 with `"choices": []`: the prompt billed, no fallback, the openai SDK's `choices[0]` an
IndexError, and on /v1/messages an empty `end_turn` message. It is now what an empty candidate is (an
`UnusableAnswer`, docs/providers.md): a 502 that routing retries and falls back from, whose usage (which Google bills)
counts in the request's cost (docs/accounting.md). Through a real gateway, a Gemini mock that answers so for its
models `nocand-<shape>` and the OpenAI mock behind it.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web
from google.genai import types as genai

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import MockGemini, _sse
from tests.support.mock_upstream import _RECORD, MockUpstream, SseAnswer, _deliver_stream, _send

GEMINI_KEY = "gemini-no-candidates-key"
KEY = "gw-no-candidates-key-000000000000000000000000"
ADMIN = "admin-no-candidates"
# What stands for the candidates in each answer.
SHAPES: dict[str, dict[str, Any]] = {"empty": {"candidates": []}, "missing": {}}
USAGE = {"promptTokenCount": 5, "totalTokenCount": 5}  # the prompt read, nothing generated
GEMINI_INPUT = 1000.0  # per million tokens
PER_REFUSAL = USAGE["promptTokenCount"] * GEMINI_INPUT / 1e6  # each candidateless answer's cost: $0.005


def answer(shape: str) -> dict[str, Any]:
    """Gemini's answer with no candidates (`shape`: `empty` or `missing`), as `google-genai` accepts it."""
    body = {**SHAPES[shape], "usageMetadata": USAGE, "modelVersion": "gemini-mock", "responseId": "resp-nocand"}
    genai.GenerateContentResponse.model_validate(body)
    return body


class CandidatelessGemini(MockGemini):
    """The Gemini mock; its models `nocand-<shape>` answer with no candidates, whole or as a one-event stream."""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if not model.startswith("nocand-"):
            return await super()._generate(request)
        request[_RECORD].model = model
        body = answer(model.removeprefix("nocand-"))
        if method == "streamGenerateContent":
            return await _deliver_stream(request, SseAnswer([_sse(body)], 0), None)
        return await _send(request, web.json_response(body))


def _policy(openai: MockUpstream, gemini: MockUpstream) -> str:
    timeouts = "{connect_s: 2, first_byte_s: 10, idle_s: 10, total_s: 30}"
    retry = "{attempts: 1, backoff_s: 0.001, backoff_max_s: 0.001}"
    models = "".join(f"""
  gemini-{shape}: {{provider: gemini, model: nocand-{shape}}}
  {shape}-then-openai:
    targets:
      - {{provider: gemini, model: nocand-{shape}, retry: {retry}}}
      - {{provider: openai, model: mock-model}}""" for shape in SHAPES)
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          openai: {{kind: openai, base_url: {openai.base_url}, api_key_env: MOCK_UPSTREAM_KEY, timeouts: {timeouts}}}
          gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY, timeouts: {timeouts}}}
        prices:
          nocand-empty: {{input_per_mtok: {GEMINI_INPUT}, output_per_mtok: 3000}}
          nocand-missing: {{input_per_mtok: {GEMINI_INPUT}, output_per_mtok: 3000}}
          mock-model: {{input_per_mtok: 2000, output_per_mtok: 1000}}
        models:
          openai-only: {{provider: openai, model: mock-model}}""") + models + "\n"


@pytest.fixture(scope="module")
def gemini() -> Iterator[CandidatelessGemini]:
    mock = CandidatelessGemini(GEMINI_KEY)
    with mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, gemini: CandidatelessGemini) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream, gemini), {
        "MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GEMINI_KEY": GEMINI_KEY, "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _cleared(upstream: MockUpstream, gemini: CandidatelessGemini) -> None:
    upstream.clear()
    gemini.clear()


def _usage(gw: RunningGateway) -> dict[str, Any]:
    response = httpx.get(gw.url + "/admin/usage", params={"scope": "key", "name": "main"},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert response.status_code == 200, response.text
    rows = response.json()["usage"]
    return dict(rows[0]) if rows else {"requests": 0, "cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0}


def _counted(gw: RunningGateway, before: dict[str, Any]) -> dict[str, Any]:
    """What the key's usage grew by with one more request (an error's is settled beside the answer: waited for)."""
    for _ in range(200):
        after = _usage(gw)
        if after["requests"] > before["requests"]:
            break
        time.sleep(0.05)
    assert after["requests"] == before["requests"] + 1, (before, after)
    return {field: after[field] - before[field] for field in ("cost_usd", "prompt_tokens", "completion_tokens")}


def _access_line(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    for _ in range(200):
        lines = [fields for record in caplog.records if record.name == "gateway.access"
                 and (fields := getattr(record, "fields", {})).get("request_id") == request_id]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def _chat(gw: RunningGateway, model: str, stream: bool = False) -> tuple[int, httpx.Headers, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=body, timeout=30) as response:
        return response.status_code, response.headers, response.read().decode()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_an_answer_without_candidates_is_retried_then_falls_back(
    shape: str, stream: bool, gw: RunningGateway, gemini: CandidatelessGemini, upstream: MockUpstream,
) -> None:
    """Gemini is asked twice (`retry.attempts: 1`), then the OpenAI target answers: whole as streamed (which did)."""
    status, headers, text = _chat(gw, f"{shape}-then-openai", stream)
    assert status == 200, text
    assert headers["x-gateway-target"] == "openai/mock-model", dict(headers)
    if not stream:
        assert json.loads(text)["choices"][0]["message"]["content"] == upstream.reply_text, text
    assert [request.model for request in gemini.requests] == [f"nocand-{shape}"] * 2
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_fallbacks_cost_counts_the_refused_answers(
    shape: str, stream: bool, gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """The request's cost: the OpenAI answer's, and the prompt Google read (and bills) for each refused answer
    (streamed too: its refused answers were not counted, the stream's end being taken for a cut stream's)."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    assert _chat(gw, "openai-only", stream)[0] == 200
    alone = _counted(gw, before)  # the same prompt, the same answer
    before = _usage(gw)
    status, headers, text = _chat(gw, f"{shape}-then-openai", stream)
    assert status == 200, text
    expected = alone["cost_usd"] + 2 * PER_REFUSAL
    counted = _counted(gw, before)
    assert counted["cost_usd"] == pytest.approx(expected, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (
        alone["prompt_tokens"] + 2 * USAGE["promptTokenCount"], alone["completion_tokens"]), counted
    if not stream:  # (a stream's headers leave before its cost is known)
        assert float(headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    line = _access_line(caplog, headers["x-request-id"])
    assert [attempt["outcome"] for attempt in line["attempts"]] == ["server_error", "server_error", "ok"], line


@pytest.mark.parametrize("shape", list(SHAPES))
def test_alone_an_answer_without_candidates_is_a_502(
    shape: str, gw: RunningGateway, gemini: CandidatelessGemini, caplog: pytest.LogCaptureFixture,
) -> None:
    """No target left: a 502 in OpenAI's error envelope (not a 200 with no choices), which costs the refused
    answer's usage (the prompt Google read) and carries no `x-gateway-cost-usd`."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    status, headers, text = _chat(gw, f"gemini-{shape}")
    assert status == 502, text
    error = json.loads(text)["error"]
    assert error["type"] == "upstream_error" and "no candidates" in error["message"], error
    assert {"message", "type", "param", "code"} <= error.keys(), error
    assert "x-gateway-cost-usd" not in headers
    assert len(gemini.requests) == 1  # (a lone target with no retry policy of its own: asked once)
    counted = _counted(gw, before)
    assert counted["cost_usd"] == pytest.approx(PER_REFUSAL, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (USAGE["promptTokenCount"], 0), counted
    line = _access_line(caplog, headers["x-request-id"])
    assert line["status"] == 502 and line["cost_usd"] == pytest.approx(PER_REFUSAL, abs=1e-9), line


@pytest.mark.parametrize("shape", list(SHAPES))
def test_on_messages_the_anthropic_client_gets_the_fallback_or_the_502(
    shape: str, gw: RunningGateway, upstream: MockUpstream,
) -> None:
    """/v1/messages: the OpenAI target's text (it was `content: []` with `end_turn`), and alone an `api_error` 502
    in Anthropic's envelope."""
    ask: Any = {"max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0, timeout=30) as sdk:
        message = sdk.messages.create(model=f"{shape}-then-openai", **ask)
        assert [block.type for block in message.content] == ["text"], message
        assert message.content[0].text == upstream.reply_text and message.stop_reason == "end_turn", message
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk.messages.create(model=f"gemini-{shape}", **ask)
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "api_error", body
    assert "no candidates" in body["error"]["message"], body



@pytest.mark.parametrize("shape", list(SHAPES))
def test_alone_a_stream_without_candidates_ends_with_the_same_error(
    shape: str, gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """A lone target's stream is not held back (a 200): it ends with the complete answer's error as its event, not
    with `[DONE]`, and costs the same (Gemini's usage, not the gateway's estimate)."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    status, headers, text = _chat(gw, f"gemini-{shape}", stream=True)
    assert status == 200 and "[DONE]" not in text, text
    events = [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")]
    error = events[-1]["error"]
    assert error["type"] == "upstream_error" and "no candidates" in error["message"], events
    counted = _counted(gw, before)
    assert counted["cost_usd"] == pytest.approx(PER_REFUSAL, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (USAGE["promptTokenCount"], 0), counted
    line = _access_line(caplog, headers["x-request-id"])
    assert line["cost_usd"] == pytest.approx(PER_REFUSAL, abs=1e-9) and line["tokens_estimated"] is False, line
