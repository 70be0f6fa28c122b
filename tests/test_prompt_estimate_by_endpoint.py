"""The prompt estimate counts the fields of the API a request came in by, whatever else its body carries
(`accounting.prompt.PromptEstimator.estimate_body`).

A completion or an embedding with an extra `"messages": []` (which its upstream ignores) was estimated from
those messages, at 3 tokens: it passed a tokens-per-minute limit it must not, a `prompt_tokens_over` rule did
not match it, and an upstream that reported no usage got it billed for 3 prompt tokens.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

HEADERS = {"Authorization": f"Bearer {FULL_KEY}"}
LONG = "word " * 2000  # about 2,000 tokens in every API's count
FOREIGN = {"messages": []}  # a chat's field, which the other APIs' upstreams ignore


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 1, output_per_mtok: 2}}
          text-embedding-3-small: {{input_per_mtok: 1, output_per_mtok: 1}}
          fault-no-usage: {{input_per_mtok: 1, output_per_mtok: 2}}
          big-model: {{input_per_mtok: 1, output_per_mtok: 2}}
        models:
          # each case its own window (one admitted before the fix fills it with what it really used)
          lim-completion: {{provider: mock, model: mock-model, limits: {{tpm: 500}}}}
          lim-responses: {{provider: mock, model: mock-model, limits: {{tpm: 500}}}}
          lim-embed: {{provider: mock, model: text-embedding-3-small, limits: {{tpm: 500}}}}
          lim-embed-2: {{provider: mock, model: text-embedding-3-small, limits: {{tpm: 500}}}}
          chat: {{provider: mock, model: mock-model}}
          embed: {{provider: mock, model: text-embedding-3-small}}
          big: {{provider: mock, model: big-model}}
          quiet: {{provider: mock, model: fault-no-usage}}
        accounting: {{default_max_tokens: 16}}
        rules:
          - {{name: long-prompts, when: {{alias: [chat, embed], prompt_tokens_over: 1000}}, alias: big}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, headers=HEADERS, timeout=30)


@pytest.mark.parametrize(("path", "body"), [
    ("/completions", {"model": "lim-completion", "prompt": LONG, "max_tokens": 5, **FOREIGN}),
    ("/embeddings", {"model": "lim-embed", "input": LONG, **FOREIGN}),
    ("/embeddings", {"model": "lim-embed-2", "input": LONG, "prompt": "x"}),  # a completion's field
    ("/responses", {"model": "lim-responses", "input": LONG, "max_output_tokens": 5, **FOREIGN}),
])
def test_a_token_limit_counts_the_prompt_of_the_requests_own_api(
    gw: RunningGateway, upstream: MockUpstream, path: str, body: dict[str, Any],
) -> None:
    response = _post(gw, path, body)
    assert response.status_code == 429, response.text
    assert "tokens per minute" in response.json()["error"]["message"]
    assert not upstream.requests


@pytest.mark.parametrize(("path", "body"), [
    ("/completions", {"model": "chat", "prompt": LONG, "max_tokens": 5, **FOREIGN}),
    ("/embeddings", {"model": "embed", "input": LONG, **FOREIGN}),
])
def test_a_prompt_size_rule_reads_the_prompt_of_the_requests_own_api(
    gw: RunningGateway, path: str, body: dict[str, Any],
) -> None:
    response = _post(gw, path, body)
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-target"] == "mock/big-model"  # the rule's alias


@pytest.mark.parametrize(("path", "body"), [
    ("/completions", {"model": "quiet", "prompt": LONG, "max_tokens": 5, **FOREIGN}),
    ("/embeddings", {"model": "quiet", "input": LONG, **FOREIGN}),
])
def test_usage_an_upstream_did_not_report_bills_the_prompt_of_the_requests_own_api(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any],
) -> None:
    with caplog.at_level("INFO", logger="gateway.access"):
        response = _post(gw, path, body)
    assert response.status_code == 200, response.text
    (record,) = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert record["tokens_estimated"] is True
    assert record["prompt_tokens"] >= 2000, record
