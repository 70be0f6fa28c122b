"""A stream a hard budget cuts behind an output guard is cut where the upstream's chunks cross the budget, gets the
text the guard still held (checked), and is billed as the same stream without the guard.

The budget's cut read the guard's output: it could fall only where the guard released text, often many of the
upstream's chunks past the one that crossed, and the text the guard still held was dropped though billed. A stream
of " word" chunks was billed 121 tokens for 37 words sent (77 and 81 without the guard), well past the budget.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

ADMIN = "admin-token-for-guarded-cut-tests"
GUARDED_KEY = "gw-guarded-cut-key-000000000000000000000000"
PLAIN_KEY = "gw-plain-cut-key-00000000000000000000000000"
BUDGET_USD = 0.05  # 50 tokens at $0.001 a token (prompts cost nothing): a step of 10 tokens at a time
TOKEN_USD = 0.001
WORDS = 300  # the echoed answer: far past the budget, one word a chunk


@pytest.fixture
def gateway(upstream: MockUpstream) -> Iterator[RunningGateway]:
    """Two keys, each with the same hard budget; two aliases on the same echoing upstream, one behind an output
    guard (that finds nothing in the answer)."""
    policy = textwrap.dedent(f"""\
        version: 1
        auth: keys
        server: {{admin_token_env: CUT_ADMIN}}
        accounting: {{default_max_tokens: 10}}
        keys:
          - {{name: guarded, tenant: a, hash: "{hash_key(GUARDED_KEY)}", budget: {{usd: {BUDGET_USD}, period: day}}}}
          - {{name: plain, tenant: b, hash: "{hash_key(PLAIN_KEY)}", budget: {{usd: {BUDGET_USD}, period: day}}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          fault-echo: {{input_per_mtok: 0, output_per_mtok: {TOKEN_USD * 1_000_000}}}
        models:
          guarded: {{provider: mock, model: fault-echo}}
          plain: {{provider: mock, model: fault-echo}}
        guards:
          models:
            guarded: {{s: {{kind: secrets, action: redact, places: [output]}}}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "CUT_ADMIN": ADMIN}).start()
    try:
        yield running
    finally:
        running.stop()


def _stream(gateway: RunningGateway, path: str, alias: str, key: str) -> list[dict[str, Any]]:
    """The events of a stream of `WORDS` words, as the client got them."""
    text = " ".join(["word"] * WORDS)
    body = ({"messages": [{"role": "user", "content": text}]} if path == "/chat/completions" else {"input": text})
    with httpx.stream("POST", gateway.base_url + path, json={"model": alias, "stream": True, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30) as response:
        assert response.status_code == 200
        raw = response.read().decode()
    return [json.loads(frame.split("data: ", 1)[1]) for frame in raw.split("\n\n") if "data: {" in frame]


def _words(path: str, events: list[dict[str, Any]]) -> int:
    """The words of the answer's text the client got."""
    if path == "/chat/completions":
        text = "".join(choice["delta"].get("content") or "" for event in events
                       for choice in event.get("choices") or () if isinstance(choice, dict))
    else:
        text = "".join(str(event.get("delta", "")) for event in events
                       if event.get("type") == "response.output_text.delta")
    return len(text.split())


def _billed(gateway: RunningGateway, name: str) -> dict[str, object]:
    """The key's usage row, once the ledger has written it (once a second)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(gateway.url + "/admin/usage", params={"scope": "key", "name": name},
                             headers={"Authorization": f"Bearer {ADMIN}"})
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if rows:
            return dict(rows[0])
        assert time.monotonic() < deadline, f"no usage for key {name}"
        time.sleep(0.2)


@pytest.mark.parametrize("path", ["/chat/completions", "/responses"])
def test_a_guarded_stream_cut_by_a_budget_is_billed_for_what_its_client_got(gateway: RunningGateway,
                                                                             path: str) -> None:
    got = {}
    for alias, key in (("guarded", GUARDED_KEY), ("plain", PLAIN_KEY)):
        events = _stream(gateway, path, alias, key)
        error = events[-1].get("error")
        assert isinstance(error, dict) and error.get("code") == "budget_exceeded", events[-1]  # cut by the budget
        got[alias] = _words(path, events)
    guarded, plain = _billed(gateway, "guarded"), _billed(gateway, "plain")
    tokens = int(str(guarded["completion_tokens"]))
    # the guard held nothing back at the cut: its client got what the unguarded one did, and is billed the same
    assert got["guarded"] == got["plain"] and 0 < got["guarded"] < WORDS, got
    assert tokens == plain["completion_tokens"], (guarded, plain)
    assert got["guarded"] <= tokens <= got["guarded"] + 1, (got, guarded)  # (a chat stream's role chunk counts)
    # past the budget by no more than the chunk that crossed it
    assert float(str(guarded["cost_usd"])) <= BUDGET_USD + TOKEN_USD + 1e-9, guarded
