"""A field one target's API lacks is no reason to stop the walk: routing tries the next target.

The Anthropic translator refuses what Messages has no equivalent for (`seed`, `n` > 1, `logprobs`, a temperature
above 1...). That refusal was a client error, so the walk answered it at once: a fallback to an OpenAI target behind
a failed Claude never happened, and a `weighted` alias failed or served the same request by the luck of its draw. It
is now `unsupported`: nothing was sent, so the next target is tried, the breaker hears nothing of it, and only when
no target could is it the client's 400.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-unsupported-test-key-0000000000"
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]


def _policy(openai_url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{failures: 1, cooldown_s: 60}}}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
          claude-b: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude-then-gpt:
            targets: [{{provider: claude, model: claude-mock}}, {{provider: openai, model: mock-model}}]
          claude-twice:
            targets: [{{provider: claude, model: claude-mock}}, {{provider: claude-b, model: claude-mock}}]
          claude: {{provider: claude, model: claude-mock}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: MockAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, model: str, **fields: Any) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers=AUTH, timeout=15,
                      json={"model": model, "messages": MESSAGES, **fields})


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("fields", [{"seed": 7}, {"temperature": 1.5}, {"logprobs": True}])
def test_a_field_claude_lacks_falls_back_to_a_target_that_has_it(
    gw: RunningGateway, upstream: MockUpstream, claude_mock: MockAnthropic, fields: dict[str, Any], stream: bool,
) -> None:
    upstream.clear()
    claude_mock.clear()
    response = _post(gw, "claude-then-gpt", stream=stream, **fields)
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-target"] == "openai/mock-model"
    assert response.headers["x-gateway-fallback-reason"] == "unsupported"
    if stream:
        assert "chatcmpl-mock" in response.text and response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["choices"][0]["message"]["content"] == upstream.reply_text
    assert not claude_mock.requests  # nothing was sent to the target that could not take it
    assert upstream.requests[-1].json[next(iter(fields))] == fields[next(iter(fields))]


def test_when_no_target_supports_it_the_client_gets_one_400_naming_each(gw: RunningGateway) -> None:
    response = _post(gw, "claude-twice", seed=7)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_parameter" and error["param"] == "seed", error
    assert error["message"].startswith("no target of `claude-twice` supports this request (")
    assert "claude/claude-mock: `seed` is not supported" in error["message"]
    assert "claude-b/claude-mock: `seed` is not supported" in error["message"]
    single = _post(gw, "claude", seed=7)  # one target: its own refusal, as it was
    assert single.status_code == 400 and single.json()["error"]["message"].startswith("`seed` is not supported")


def test_a_refusal_is_no_verdict_on_the_targets_health(gw: RunningGateway) -> None:
    """Nothing reached the upstream: its breaker (one failure opens it here) neither opens nor closes, and the
    attempt is counted as `unsupported`."""
    for _ in range(3):
        assert _post(gw, "claude-then-gpt", seed=7).status_code == 200
    metrics = gw.metrics()
    state = dict(re.findall(r'^gateway_breaker_state\{target="([^"]+)"\} (\S+)$', metrics, re.M))
    assert state["claude/claude-mock"] == "0.0", state
    counted = re.search(r'^gateway_upstream_attempts_total\{outcome="unsupported",target="claude/claude-mock"\} (\S+)$',
                        metrics, re.M)
    assert counted is not None and float(counted.group(1)) >= 3, metrics
