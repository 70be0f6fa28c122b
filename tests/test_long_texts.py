"""Texts that are hard to count, through the gateway: every path that counts tokens answers, none blocks the loop.

A run of a million spaces made tiktoken's Rust core panic (`pyo3_runtime.PanicException`, a BaseException
that passes `except Exception`): uvicorn's plain-text 500 and a Rust backtrace on stderr, from
`/v1/messages/count_tokens`, `/v1/messages`, token limits and `prompt_tokens_over` rules. Counting a large
`count_tokens` body on the event loop held every other request up for seconds.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.probe import healthz_probe

SPACES = " " * 1_000_000  # one more than tiktoken's regex survives


def long_text_policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          demo: {{kind: demo}}
        models:
          gpt: {{provider: mock, model: mock-model}}
          limited: {{provider: mock, model: mock-model, limits: {{tpm: 100000000}}}}
          nousage: {{provider: mock, model: fault-no-usage}}
          ruled: {{provider: mock, model: mock-model}}
          demo: {{provider: demo, model: demo-1}}
        rules:
          - name: long-prompts
            when: {{alias: [ruled], prompt_tokens_over: 100000000}}
            deny: "too long"
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(long_text_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def test_count_tokens_of_a_million_spaces(gw: RunningGateway) -> None:
    with anthropic.Anthropic(base_url=gw.url, api_key="unused", max_retries=0, timeout=60) as sdk:
        counted = sdk.messages.count_tokens(model="gpt", messages=[{"role": "user", "content": SPACES}])
    assert 7813 < counted.input_tokens < 7830  # 1,000,000 spaces are 7,813 tokens, plus the chat format's


@pytest.mark.parametrize(("path", "alias"), [
    ("/v1/messages", "limited"),
    ("/v1/messages", "nousage"),
    ("/v1/chat/completions", "limited"),  # a token limit reserves the prompt's tokens
    ("/v1/chat/completions", "nousage"),  # the upstream reports no usage: the gateway counts
    ("/v1/chat/completions", "ruled"),  # a rule on the prompt's tokens
    ("/v1/chat/completions", "demo"),  # the demo model counts its usage
])
def test_a_million_spaces_through_every_path_that_counts(gw: RunningGateway, path: str, alias: str) -> None:
    body = {"model": alias, "max_tokens": 16, "messages": [{"role": "user", "content": SPACES}]}
    response = httpx.post(gw.url + path, content=json.dumps(body), timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    if alias != "nousage":  # the gateway counts that one itself, for its own accounting
        usage = response.json()["usage"]
        assert (usage.get("prompt_tokens") or usage.get("input_tokens")) > 0
    assert 'status="500"' not in gw.metrics()


def test_a_large_count_does_not_hold_up_other_requests(gw: RunningGateway) -> None:
    body = json.dumps({"model": "gpt", "messages": [{"role": "user", "content": "a" * 3_000_000}]}).encode()
    with healthz_probe(gw.url) as slowest:
        started = time.monotonic()
        response = httpx.post(gw.url + "/v1/messages/count_tokens", content=body, timeout=120)
        took = time.monotonic() - started
    assert response.status_code == 200 and response.json()["input_tokens"] > 300_000
    assert took > 0.3, took  # long enough for the probe to have seen a blocked loop
    assert slowest[0] < max(0.25, took / 3), (slowest[0], took)
