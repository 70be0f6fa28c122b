"""The shadow policy decides a `/v1/messages` request from the chat body the live pipeline decided.

It decided the raw Anthropic body as if it were a chat body: its `system` (a string or text blocks) was no text the
guards read, so a candidate whose denylist blocks a word there (as the candidate, served, does) counted no
disagreement. `/v1/responses` requests (`instructions`) are decided from their own body as well. Real gateways in
front of the mock upstream: the live one with the candidate as its shadow, and the candidate served on its own."""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b23-shadow-messages-key-00000000000000"
WORD = "zebra"


def _policy(url: str, *, candidate: bool) -> str:
    server = "" if candidate else "server: {shadow_policy: candidate.yaml, shadow_queue: 1000}\n"
    guards = f"guards:\n  global:\n    words: {{kind: denylist, terms: [{WORD}]}}\n" if candidate else ""
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: team, tenant: team, hash: "{hash_key(KEY)}"}}
        providers:
          up: {{kind: openai, base_url: {url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: up, model: mock-model}}
        """) + server + guards


@pytest.fixture
def gateways(upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    candidate = _policy(upstream.base_url, candidate=True)
    (tmp_path / "candidate.yaml").write_text(candidate)
    live = RunningGateway(_policy(upstream.base_url, candidate=False), env, source=tmp_path / "gateway.yaml").start()
    served_candidate = RunningGateway(candidate, env).start()
    yield live, served_candidate
    live.stop()
    served_candidate.stop()


def _counter(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


def _compared(running: RunningGateway, count: int) -> str:
    deadline = time.monotonic() + 60
    while True:
        metrics = running.metrics()
        if _counter(metrics, "gateway_shadow_requests_total", result="compared") >= count:
            return metrics
        assert time.monotonic() < deadline, "the shadow policy did not compare the request"
        time.sleep(0.05)


def _send(running: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"} if path != "/messages" else \
        {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    return httpx.post(running.base_url + path, json=body, headers=headers, timeout=30)


_MESSAGES = [{"role": "user", "content": "hi"}]
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("system string", "/messages", {"model": "chat", "max_tokens": 16, "system": f"talk about the {WORD}",
                                    "messages": _MESSAGES}),
    ("system blocks", "/messages", {"model": "chat", "max_tokens": 16, "messages": _MESSAGES,
                                    "system": [{"type": "text", "text": f"a {WORD} here"}]}),
    ("user text block", "/messages", {"model": "chat", "max_tokens": 16, "messages": [
        {"role": "user", "content": [{"type": "text", "text": f"my {WORD}"}]}]}),
    ("responses instructions", "/responses", {"model": "chat", "instructions": f"the {WORD}", "input": "hi"}),
]


def test_the_shadow_decides_what_the_live_pipeline_decided(
    gateways: tuple[RunningGateway, RunningGateway], upstream: MockUpstream,
) -> None:
    live, served_candidate = gateways
    compared = 0
    for name, path, body in CASES:
        answered = _send(live, path, body)
        assert answered.status_code == 200, (name, answered.text[:300])  # the live policy has no guard
        blocked = _send(served_candidate, path, body)
        assert blocked.status_code == 400, (name, blocked.text[:300])  # the candidate, served, blocks it
        compared += 1
        metrics = _compared(live, compared)
        assert _counter(metrics, "gateway_shadow_disagreements_total", kind="outcome") == compared, name
        assert _counter(metrics, "gateway_shadow_disagreements_total", kind="guards") == compared, name
    # a body without the word: the same outcome on both sides (the candidate's guards allow it)
    before = _counter(live.metrics(), "gateway_shadow_disagreements_total", kind="outcome")
    assert _send(live, "/messages", {"model": "chat", "max_tokens": 16, "system": "plain", "messages": _MESSAGES}
                 ).status_code == 200
    metrics = _compared(live, compared + 1)
    assert _counter(metrics, "gateway_shadow_disagreements_total", kind="outcome") == before
    assert _counter(metrics, "gateway_shadow_requests_total", result="failed") == 0
