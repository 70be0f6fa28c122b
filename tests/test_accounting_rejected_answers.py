"""Answers the gateway refuses are still paid for: through a real gateway, the Gemini mock answering the finish
reason the user's message names (tests/test_gemini_finish_reasons.py), and the OpenAI mock.

Gemini's `MALFORMED_RESPONSE` (as `MALFORMED_FUNCTION_CALL` and the like) is a 502 `UnusableAnswer` that routing
retries and falls back from. Google generated each such answer and reported its usage with it, and bills it: the
request's cost counts every one at its target's prices, whether another target answered or the request ended in
the 502, in the key's usage (/admin/usage, tokens included), the access log's `cost_usd`, the cost metric and
`x-gateway-cost-usd`. Gemini and OpenAI are priced differently here, so that each attempt's price shows.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_gemini_finish_reasons import GEMINI_KEY, TOOLS, USAGE, FinishingGemini

KEY = "gw-rejected-answers-key-00000000000000000000"
ADMIN = "admin-rejected-answers"
GEMINI_PRICE = (1000.0, 3000.0)  # input, output per million tokens
OPENAI_PRICE = (2000.0, 1000.0)
PROMPT, COMPLETION = USAGE["promptTokenCount"], USAGE["candidatesTokenCount"]  # each Gemini answer's usage
PER_REFUSAL = (PROMPT * GEMINI_PRICE[0] + COMPLETION * GEMINI_PRICE[1]) / 1e6  # $0.017


def _policy(openai: MockUpstream, gemini: MockUpstream) -> str:
    timeouts = "{connect_s: 1, first_byte_s: 2, idle_s: 2, total_s: 20}"
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
          finishes: {{input_per_mtok: {GEMINI_PRICE[0]}, output_per_mtok: {GEMINI_PRICE[1]}}}
          mock-model: {{input_per_mtok: {OPENAI_PRICE[0]}, output_per_mtok: {OPENAI_PRICE[1]}}}
        models:
          openai-only: {{provider: openai, model: mock-model}}
          gemini-finishes: {{provider: gemini, model: finishes}}
          finishes-then-openai:
            targets:
              - {{provider: gemini, model: finishes, retry: {{attempts: 1, backoff_s: 0.001, backoff_max_s: 0.001}}}}
              - {{provider: openai, model: mock-model}}
        """)


@pytest.fixture(scope="module")
def gemini() -> Iterator[FinishingGemini]:
    with FinishingGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture
def gw(upstream: MockUpstream, gemini: FinishingGemini) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream, gemini), {
        "MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GEMINI_KEY": GEMINI_KEY, "ADMIN_TOK": ADMIN}).start()
    gemini.clear()
    yield running
    running.stop()


def _usage(gw: RunningGateway) -> dict[str, Any]:
    response = httpx.get(gw.url + "/admin/usage", params={"scope": "key", "name": "main"},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert response.status_code == 200, response.text
    rows = response.json()["usage"]
    return dict(rows[0]) if rows else {"requests": 0, "cost_usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0}


def _counted(gw: RunningGateway, before: dict[str, Any]) -> dict[str, Any]:
    """What the key's usage grew by with one more request (a request that ends in an error is settled in a task
    beside the answer: waited for, up to 5 s, by its request count)."""
    for _ in range(100):
        after = _usage(gw)
        if after["requests"] > before["requests"]:
            break
        time.sleep(0.05)
    assert after["requests"] == before["requests"] + 1, (before, after)
    return {field: after[field] - before[field] for field in ("cost_usd", "prompt_tokens", "completion_tokens")}


def _cost_metric(gw: RunningGateway, model: str) -> float:
    prefix = f'gateway_cost_usd_total{{model="{model}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines() if line.startswith(prefix))


def _ask(gw: RunningGateway, model: str, words: str, stream: bool) -> tuple[int, httpx.Headers, str]:
    body = {"model": model, "messages": [{"role": "user", "content": words}], "tools": TOOLS, "max_tokens": 20,
            "stream": stream}
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=body, timeout=20) as response:
        return response.status_code, response.headers, response.read().decode()


def _logged(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    lines = [fields for record in caplog.records if record.name == "gateway.access"
             and (fields := getattr(record, "fields", {})).get("request_id") == request_id]
    assert len(lines) == 1, [record.getMessage() for record in caplog.records]
    return lines[0]


def _logged_eventually(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    """The request's access line (a stream's is written once its end hooks ran, just after its last byte)."""
    for _ in range(100):
        if any(getattr(record, "fields", {}).get("request_id") == request_id for record in caplog.records):
            break
        time.sleep(0.05)
    return _logged(caplog, request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_refused_answers_count_beside_the_answer_of_the_fallback(
    stream: bool, gw: RunningGateway, gemini: FinishingGemini, caplog: pytest.LogCaptureFixture,
) -> None:
    """Gemini refused twice (`retry.attempts: 1`), then OpenAI answered: the two refused answers' cost, at Gemini's
    prices, with the answer's at OpenAI's; their tokens with the answer's in the key's usage."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    status, headers, _ = _ask(gw, "openai-only", "MALFORMED_RESPONSE empty", stream)
    assert status == 200
    answer = _counted(gw, before)  # the OpenAI answer alone: the same prompt, the same answer
    assert answer["cost_usd"] > 0 and answer["prompt_tokens"] > 0
    spent_before, metric_before = _usage(gw), _cost_metric(gw, "finishes-then-openai")
    status, headers, _ = _ask(gw, "finishes-then-openai", "MALFORMED_RESPONSE empty", stream)
    assert status == 200 and headers["x-gateway-attempts"] == "3"
    assert len(gemini.requests) == 2  # two answers Google generated, and bills
    expected = answer["cost_usd"] + 2 * PER_REFUSAL
    counted = _counted(gw, spent_before)
    assert counted["cost_usd"] == pytest.approx(expected, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (
        answer["prompt_tokens"] + 2 * PROMPT, answer["completion_tokens"] + 2 * COMPLETION), counted
    if not stream:  # (a stream's headers leave before its cost is known)
        assert float(headers["x-gateway-cost-usd"]) == pytest.approx(expected, abs=1e-9)
    line = _logged_eventually(caplog, headers["x-request-id"])
    assert line["cost_usd"] == pytest.approx(expected, abs=1e-9), line
    assert [attempt["outcome"] for attempt in line["attempts"]] == ["server_error", "server_error", "ok"]
    assert _cost_metric(gw, "finishes-then-openai") - metric_before == pytest.approx(expected, abs=1e-9)


def test_a_request_that_ends_in_the_refusal_costs_the_refused_answer(
    gw: RunningGateway, gemini: FinishingGemini, caplog: pytest.LogCaptureFixture,
) -> None:
    """A lone Gemini target refused: the client gets the 502, and the key pays for the answer Google generated."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    status, headers, body = _ask(gw, "gemini-finishes", "MALFORMED_RESPONSE empty", False)
    assert status == 502 and "MALFORMED_RESPONSE" in json.loads(body)["error"]["message"]
    assert len(gemini.requests) == 1
    counted = _counted(gw, before)
    assert counted["cost_usd"] == pytest.approx(PER_REFUSAL, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (PROMPT, COMPLETION), counted
    line = _logged(caplog, headers["x-request-id"])
    assert line["status"] == 502 and line["cost_usd"] == pytest.approx(PER_REFUSAL, abs=1e-9), line
    assert _cost_metric(gw, "gemini-finishes") == pytest.approx(PER_REFUSAL, abs=1e-9)


@pytest.mark.parametrize("shape", ["empty", "text"])
def test_a_stream_that_ends_in_the_refusal_counts_the_upstreams_usage(
    shape: str, gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    """A lone target's stream is not held back: the refusal reaches the client as the stream's error event (after
    the text, if any). The bill is Gemini's usage, reported with the refused answer, not the gateway's estimate."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    before = _usage(gw)
    status, headers, body = _ask(gw, "gemini-finishes", f"MALFORMED_RESPONSE {shape}", True)
    assert status == 200 and "MALFORMED_RESPONSE" in body and "[DONE]" not in body
    counted = _counted(gw, before)
    assert counted["cost_usd"] == pytest.approx(PER_REFUSAL, abs=2e-6), counted
    assert (counted["prompt_tokens"], counted["completion_tokens"]) == (PROMPT, COMPLETION), counted
    line = _logged_eventually(caplog, headers["x-request-id"])
    assert line["cost_usd"] == pytest.approx(PER_REFUSAL, abs=1e-9) and line["tokens_estimated"] is False, line
