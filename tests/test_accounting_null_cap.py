"""`max_completion_tokens: null` beside `max_tokens: N` is a request capped at N: through a real gateway and the
OpenAI mock, under a hard budget.

The upstreams honour `max_tokens` there (OpenAI reads a null field as absent; the gateway's Anthropic and Gemini
translations send `max_tokens`), but the reservation read the null and reserved `accounting.default_max_tokens`, and
took the request for uncapped: concurrent such requests passed the hard budget, which docs/accounting.md says never
happens for requests that set a cap their upstream honours.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.accounting.outright import requested_cap
from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-null-cap-key-00000000000000000000000000"
ADMIN = "admin-null-cap"
BUDGET = 0.02  # one answer of 20 tokens at $1,000 per million output tokens; the prompt is free
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    # A slow first byte: the four requests are in flight together, each reserved before any is settled.
    price = "{input_per_mtok: 0, output_per_mtok: 1000}"
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: {BUDGET}}}}}
        accounting: {{default_max_tokens: 5}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          slow:
            targets:
              - {{provider: mock, model: fault-slow-first-byte-500, price: {price}}}
        """)
    running = RunningGateway(text, {"ADMIN_TOK": ADMIN, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


async def _together(gw: RunningGateway, body: dict[str, Any], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as http:
        return list(await asyncio.gather(*(
            http.post(gw.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            for _ in range(n))))


def _spent(gw: RunningGateway, requests: int) -> float:
    for _ in range(100):
        response = httpx.get(gw.url + "/admin/usage", params={"scope": "key", "name": "main"},
                             headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        rows = response.json()["usage"]
        if rows and rows[0]["requests"] >= requests:
            return float(rows[0]["cost_usd"])
        time.sleep(0.1)
    raise AssertionError("the requests were not counted")


def test_a_null_max_completion_tokens_beside_max_tokens_holds_a_hard_budget(gw: RunningGateway) -> None:
    body = {"model": "slow", "messages": MESSAGES, "max_tokens": 20, "max_completion_tokens": None}
    responses = asyncio.run(_together(gw, body, 4))
    codes = [response.status_code for response in responses]
    assert codes.count(200) == 1 and codes.count(429) == 3, codes  # each reserved its 20 tokens: only one fits
    assert _spent(gw, 1) <= BUDGET + 1e-9


@pytest.mark.parametrize(("body", "cap"), [
    ({"messages": [], "max_tokens": 20, "max_completion_tokens": None}, 20),
    ({"prompt": "x", "max_tokens": 7, "max_completion_tokens": None, "n": 2}, 14),  # a completion's, times `n`
])
def test_the_cap_reserved_reads_a_null_max_completion_tokens_as_absent(body: dict[str, Any], cap: int | None) -> None:
    assert requested_cap(body) == cap
