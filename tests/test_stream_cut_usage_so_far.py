"""A Gemini stream cut short is billed the completion Gemini reported so far, when that is more than the estimate:
through a real gateway, the Gemini mock (tests/support) and a budget on the key, so that each request is billed.

Gemini's `usageMetadata` comes on every event of a stream, cumulative: its `candidatesTokenCount` grows by tens of
tokens an event (Gemini 2.5), its `thoughtsTokenCount` says the thinking. A stream that ended before its last event
(the upstream's connection reset, the client gone) was billed its prompt from there, but its completion from the
gateway's estimate for a provider that reports usage, about a token a chunk, plus the thinking: 10 events of 49
tokens were billed 11 + the thoughts where Gemini's own figure said 490 + the thoughts. It is now the larger of the
two (`telemetry.usage._after_prompt`), never their sum: the reasoning is counted once. The mock's
`fault-thinking-*` models report `EVENT_TOKENS` more candidates each event and `THOUGHTS` thinking tokens.
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
from tests.conftest import RunningGateway
from tests.support.mock_gemini import EVENT_TOKENS, THOUGHTS, MockGemini

KEY = "gw-stream-cut-so-far-key-00000000000000000"
ADMIN = "admin-stream-cut-so-far"
GEMINI_KEY = "gemini-stream-cut-so-far"
PROMPT = "one two three four"  # the mock's 4 prompt tokens (a word each)
IN, OUT = 1000.0, 2000.0  # USD per million tokens (reasoning at the output price)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockGemini(GEMINI_KEY) as gemini:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY}}
            prices:
              fault-thinking-reset-after-3: {{input_per_mtok: {IN}, output_per_mtok: {OUT}}}
              fault-thinking-slow-stream-300: {{input_per_mtok: {IN}, output_per_mtok: {OUT}}}
              fault-reset-after-3: {{input_per_mtok: {IN}, output_per_mtok: {OUT}}}
            models:
              thinking-reset: {{provider: gemini, model: fault-thinking-reset-after-3}}
              thinking-left: {{provider: gemini, model: fault-thinking-slow-stream-300}}
              plain-reset: {{provider: gemini, model: fault-reset-after-3}}
            """)
        running = RunningGateway(text, {"GEMINI_KEY": GEMINI_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _stream(gw: RunningGateway, alias: str, leave_after: int | None = None) -> str:
    """The stream's text, or the part of it read before leaving after `leave_after` content chunks."""
    lines: list[str] = []
    seen = 0
    with httpx.stream("POST", gw.base_url + "/chat/completions", timeout=20,
                      json={"model": alias, "stream": True, "messages": [{"role": "user", "content": PROMPT}]},
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
    """The alias's usage once its one request is counted (the ledger writes each second)."""
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


def _logged(caplog: pytest.LogCaptureFixture, alias: str) -> dict[str, Any]:
    for _ in range(100):
        lines = [fields for record in caplog.records if record.name == "gateway.access"
                 and (fields := getattr(record, "fields", {})).get("model") == alias]
        if lines:
            return lines[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {alias}")


def test_a_reset_stream_is_billed_geminis_completion_so_far(gw: RunningGateway,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    text = _stream(gw, "thinking-reset")
    assert "error" in text  # the reset, after three events
    row = _row(gw, "thinking-reset")
    assert row["prompt_tokens"] == 4, row
    # Gemini's figure after the third event: was 4 chunks (the role's and three words') + the thoughts
    assert row["completion_tokens"] == 3 * EVENT_TOKENS + THOUGHTS, row
    assert row["reasoning_tokens"] == THOUGHTS, row  # once, not twice
    assert row["cost_usd"] == pytest.approx((4 * IN + row["completion_tokens"] * OUT) / 1e6, abs=2e-6)
    line = _logged(caplog, "thinking-reset")  # the access log shows the bill's figures
    assert line["completion_tokens"] == row["completion_tokens"] and line["tokens_estimated"] is True, line


def test_a_stream_the_client_left_is_billed_geminis_completion_so_far(gw: RunningGateway) -> None:
    _stream(gw, "thinking-left", leave_after=2)
    row = _row(gw, "thinking-left")
    assert row["prompt_tokens"] == 4, row
    visible = row["completion_tokens"] - THOUGHTS  # the events the gateway had read when the client left
    assert visible >= 2 * EVENT_TOKENS and visible % EVENT_TOKENS == 0, row  # was ~3: a token a chunk
    assert visible < 20 * EVENT_TOKENS, row  # not the whole answer
    assert row["reasoning_tokens"] == THOUGHTS, row


def test_a_stream_whose_events_report_no_completion_is_still_billed_its_estimate(gw: RunningGateway) -> None:
    _stream(gw, "plain-reset")  # the mock's usual events: the prompt's figures only, until the last
    row = _row(gw, "plain-reset")
    assert row["prompt_tokens"] == 4, row
    assert 1 <= row["completion_tokens"] <= 5, row  # the chunks sent: a token each
    assert row["reasoning_tokens"] == 0, row
