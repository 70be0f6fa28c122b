"""Requests that end before their usage came are billed what the upstream did: through a real gateway, the Anthropic,
Gemini and OpenAI mocks (tests/support) and a budget on the key, so that each request goes through the bill.

A stream whose upstream reported the prompt's usage on the way (Anthropic's `message_start`, with its cache reads and
writes; Gemini's `usageMetadata` on every event) and then ended early (an error event mid-stream, a body that ends
without its last event, the client leaving, a hard budget's cut) keeps those figures: the prompt as the upstream
counted it, its cache reads at the cached price, and only the completion estimated from what was sent. It was billed
the gateway's own re-count of the prompt at the full input price, about 10x a cached prompt's price. The mocks count
a prompt's words, the gateway's tokenizer many more tokens for each of these long words: the figures show whose.

A request not streamed whose client left (or that timed out waiting) after its upstream was called is billed its
prompt estimate, as a stream left early is; it was billed nothing. An upstream's own error status (a 400, a 504) is
not billed. The access log and the metrics show the figures the bill does.
"""

from __future__ import annotations

import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import CACHE_READ, CACHE_WRITE, MockAnthropic
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream

KEY = "gw-early-endings-key-000000000000000000000"
ADMIN = "admin-early-endings"
ANTHROPIC_KEY = "sk-ant-early-endings"
GEMINI_KEY = "gemini-early-endings"
WORDS = 60
PROMPT = " ".join(["antidisestablishmentarianism"] * WORDS)  # the mocks' 60 prompt tokens; the tokenizer's ~300
ANTHROPIC_PROMPT = WORDS + 3 + CACHE_READ + CACHE_WRITE  # message_start's: the mock's 3 a message, its cache figures
# USD per million tokens: input, cached input, cache write, output.
IN, CACHED, WRITE, OUT = 1000.0, 100.0, 1250.0, 2000.0


def _policy(claude: MockAnthropic, gemini: MockGemini, openai: MockUpstream) -> str:
    price = f"{{input_per_mtok: {IN}, cached_input_per_mtok: {CACHED}, cache_write_per_mtok: {WRITE}, " \
            f"output_per_mtok: {OUT}}}"
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        accounting: {{default_max_tokens: 2}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
          gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY}}
          openai: {{kind: openai, base_url: {openai.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          fault-overloaded-midstream: {price}
          fault-slow-stream-300: {price}
          fault-end-after-3: {price}
          fault-slow-first-byte-3000: {price}
          fault-status-400: {price}
          fault-status-504: {price}
        models:
          claude-error: {{provider: claude, model: fault-overloaded-midstream}}
          claude-left: {{provider: claude, model: fault-slow-stream-300}}
          claude-cut:
            targets:
              - {{provider: claude, model: fault-slow-stream-50, price: {{input_per_mtok: 0, output_per_mtok: 1000}}}}
            budget: {{usd: 0.003}}
          gemini-ended: {{provider: gemini, model: fault-end-after-3}}
          gemini-left: {{provider: gemini, model: fault-slow-stream-300}}
          openai-left: {{provider: openai, model: fault-slow-first-byte-3000}}
          openai-timeout:
            targets:
              - provider: openai
                model: fault-slow-first-byte-3000
                timeouts: {{connect_s: 1, first_byte_s: 0.5, idle_s: 2, total_s: 10}}
          openai-refused: {{provider: openai, model: fault-status-400}}
          openai-504: {{provider: openai, model: fault-status-504}}
        """)


@pytest.fixture(scope="module")
def claude() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def openai_mock() -> Iterator[MockUpstream]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(claude: MockAnthropic, gemini: MockGemini, openai_mock: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(claude, gemini, openai_mock), {
        "ANTHROPIC_KEY": ANTHROPIC_KEY, "GEMINI_KEY": GEMINI_KEY, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY,
        "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


def _body(alias: str, stream: bool, capped: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": alias, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}
    if capped:
        body["max_tokens"] = 50
    return body


def _stream(gw: RunningGateway, alias: str, leave_after: int | None = None, capped: bool = True) -> str:
    """The stream's text, or the part of it read before leaving after `leave_after` content chunks."""
    lines: list[str] = []
    seen = 0
    with httpx.stream("POST", gw.base_url + "/chat/completions", json=_body(alias, True, capped), timeout=20,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            lines.append(line)
            if '"content":"' in line and '"content":""' not in line:
                seen += 1
                if leave_after is not None and seen >= leave_after:
                    break
    return "\n".join(lines)


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    """The alias's usage once its one request is counted (settled at the stream's end, or in a task beside an
    error; the ledger writes each second)."""
    for _ in range(100):
        response = httpx.get(gw.url + "/admin/usage", params={"scope": "model", "name": alias},
                             headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if rows and rows[0]["requests"] >= 1:
            assert rows[0]["requests"] == 1, rows
            return dict(rows[0])
        time.sleep(0.1)
    raise AssertionError(f"no usage counted for {alias}")


def _metric(gw: RunningGateway, name: str, alias: str, kind: str | None = None) -> float:
    prefix = f'{name}{{model="{alias}",' if kind is None else f'{name}{{kind="{kind}",model="{alias}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines() if line.startswith(prefix))


def _logged(caplog: pytest.LogCaptureFixture, alias: str) -> dict[str, Any]:
    """The alias's one access line (written once the request's end hooks ran)."""
    for _ in range(100):
        lines = [fields for record in caplog.records if record.name == "gateway.access"
                 and (fields := getattr(record, "fields", {})).get("model") == alias]
        if lines:
            assert len(lines) == 1, lines
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {alias}")


def _same_in_telemetry(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, row: dict[str, Any]) -> None:
    """The access log and the metrics show the bill's figures."""
    line = _logged(caplog, alias)
    assert (line["prompt_tokens"], line["cached_tokens"], line["completion_tokens"]) == (
        row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]), (line, row)
    assert line["tokens_estimated"] is True
    assert line["cost_usd"] == pytest.approx(row["cost_usd"], abs=2e-6)
    assert _metric(gw, "gateway_tokens_total", alias, "prompt") == row["prompt_tokens"]
    assert _metric(gw, "gateway_tokens_total", alias, "cached_prompt") == row["cached_tokens"]
    assert _metric(gw, "gateway_cost_usd_total", alias) == pytest.approx(row["cost_usd"], abs=2e-6)


def _anthropic_cost(row: dict[str, Any]) -> float:
    """Anthropic's bill for `message_start`'s prompt (fresh, cache reads, cache writes) and the completion."""
    fresh = row["prompt_tokens"] - CACHE_READ - CACHE_WRITE
    return (fresh * IN + CACHE_READ * CACHED + CACHE_WRITE * WRITE + row["completion_tokens"] * OUT) / 1e6


# -- streams that end early keep the upstream's prompt figures ---------------------------------------------------


def test_an_anthropic_stream_ended_by_an_error_event_is_billed_message_start_s_prompt(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text = _stream(gw, "claude-error")
    assert "overloaded" in text
    row = _row(gw, "claude-error")
    assert row["prompt_tokens"] == ANTHROPIC_PROMPT, row  # message_start's, not a re-count
    assert row["cached_tokens"] == CACHE_READ, row
    assert 1 <= row["completion_tokens"] <= 6, row  # the three deltas sent (and the role chunk)
    assert row["cost_usd"] == pytest.approx(_anthropic_cost(row), abs=2e-6)
    _same_in_telemetry(gw, caplog, "claude-error", row)


def test_an_anthropic_stream_the_client_left_is_billed_message_start_s_prompt(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    _stream(gw, "claude-left", leave_after=2)
    row = _row(gw, "claude-left")
    assert row["prompt_tokens"] == ANTHROPIC_PROMPT, row
    assert row["cached_tokens"] == CACHE_READ, row
    assert 1 <= row["completion_tokens"] <= 6, row  # what was sent before the client left, not the 20 words
    assert row["cost_usd"] == pytest.approx(_anthropic_cost(row), abs=2e-6)
    _same_in_telemetry(gw, caplog, "claude-left", row)


def test_an_anthropic_stream_cut_by_a_hard_budget_is_billed_message_start_s_prompt(gw: RunningGateway) -> None:
    text = _stream(gw, "claude-cut", capped=False)  # reserved 2 tokens ($0.002 of $0.003): the next step is refused
    assert "budget_exceeded" in text and '"finish_reason":"length"' in text
    row = _row(gw, "claude-cut")
    assert row["prompt_tokens"] == ANTHROPIC_PROMPT, row
    assert row["cached_tokens"] == CACHE_READ, row
    assert row["completion_tokens"] <= 4, row  # up to the chunk that crossed the reservation
    assert row["cost_usd"] == pytest.approx(row["completion_tokens"] * 1000 / 1e6, abs=2e-6)


def test_a_gemini_stream_that_ends_without_a_finish_is_billed_its_reported_prompt(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text = _stream(gw, "gemini-ended")
    assert "error" in text
    row = _row(gw, "gemini-ended")
    assert row["prompt_tokens"] == WORDS, row  # the events' `promptTokenCount`, not a re-count
    assert 1 <= row["completion_tokens"] <= 5, row
    assert row["cost_usd"] == pytest.approx((WORDS * IN + row["completion_tokens"] * OUT) / 1e6, abs=2e-6)
    _same_in_telemetry(gw, caplog, "gemini-ended", row)


def test_a_gemini_stream_the_client_left_is_billed_its_reported_prompt(gw: RunningGateway) -> None:
    _stream(gw, "gemini-left", leave_after=2)
    row = _row(gw, "gemini-left")
    assert row["prompt_tokens"] == WORDS, row
    assert 1 <= row["completion_tokens"] <= 5, row
    assert row["cost_usd"] == pytest.approx((WORDS * IN + row["completion_tokens"] * OUT) / 1e6, abs=2e-6)


# -- a request not streamed that ended without an answer after its upstream was called ----------------------------


def _prompt_estimate(gw: RunningGateway) -> int:
    """The gateway's own estimate of the prompt: what a stream the client left at once is billed for."""
    response = httpx.post(gw.url + "/v1/messages/count_tokens", headers={"x-api-key": KEY},
                          json={"model": "openai-left", "messages": [{"role": "user", "content": PROMPT}]}, timeout=10)
    assert response.status_code == 200, response.text
    return int(response.json()["input_tokens"])


def test_a_request_the_client_left_before_its_answer_is_billed_its_prompt(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    with pytest.raises(httpx.TimeoutException):  # the upstream answers after 3 s
        httpx.post(gw.base_url + "/chat/completions", json=_body("openai-left", False), timeout=1.0,
                   headers={"Authorization": f"Bearer {KEY}"})
    row = _row(gw, "openai-left")
    assert row["prompt_tokens"] == _prompt_estimate(gw) > WORDS, row
    assert row["completion_tokens"] == 0, row
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * IN / 1e6, abs=2e-6)
    _same_in_telemetry(gw, caplog, "openai-left", row)
    assert _logged(caplog, "openai-left")["error"] == "client_closed_request"


def _ask(gw: RunningGateway, alias: str) -> int:
    response = httpx.post(gw.base_url + "/chat/completions", json=_body(alias, False), timeout=10,
                          headers={"Authorization": f"Bearer {KEY}"})
    return response.status_code


def test_a_request_that_timed_out_waiting_is_billed_its_prompt_and_an_upstream_s_error_status_nothing(
    gw: RunningGateway,
) -> None:
    """The gateway's own timeout (`first_byte_s`) leaves an upstream that has the prompt: billed as a request the
    client left. An upstream that answered with an error status (a 400, or its own 504) generated nothing."""
    assert _ask(gw, "openai-timeout") == 504
    row = _row(gw, "openai-timeout")
    assert row["prompt_tokens"] == _prompt_estimate(gw) and row["completion_tokens"] == 0, row
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * IN / 1e6, abs=2e-6)
    for alias, status in (("openai-refused", 400), ("openai-504", 504)):
        assert _ask(gw, alias) == status
        row = _row(gw, alias)
        assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (0, 0, 0), row
