"""An alias's `deadline_s` that cuts an attempt already sent bills the request its prompt estimate, as a timeout
waiting for the answer does: the upstream has the prompt and bills the operator for it. It was billed nothing.
A deadline that cuts a connection still being made, or that passes once an attempt has failed, bills nothing:
no upstream is at work on the request then.

Through a real gateway: the suite's mock upstream (`fault-slow-first-byte-3000` answers after 3 s,
`fault-status-500` at once), a port that takes no connection (its accept queue full: a connect that hangs), a
budget on the key so that each request goes through the bill, and the usage the admin API reports per alias.
"""

from __future__ import annotations

import socket
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b2-deadline-key-0000000000000000000000000"
ADMIN = "admin-b2-deadline"
PROMPT = "hello " * 50


@pytest.fixture(scope="module")
def unanswered() -> Iterator[int]:
    """A port whose connections are never taken: its accept queue is filled, and nothing accepts."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filling = []
    for _ in range(8):
        client = socket.socket()
        client.setblocking(False)
        try:
            client.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        filling.append(client)
    yield port
    for client in filling:
        client.close()
    server.close()


@pytest.fixture(scope="module")
def gw(unanswered: int, upstream: MockUpstream) -> Iterator[RunningGateway]:
    price = "{input_per_mtok: 1000, output_per_mtok: 1000}"
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          up: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                timeouts: {{connect_s: 3, first_byte_s: 5, idle_s: 5, total_s: 10}}}}
          dead: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                  timeouts: {{connect_s: 5, first_byte_s: 5, idle_s: 5, total_s: 10}}}}
        prices:
          m: {price}
          fault-slow-first-byte-3000: {price}
          fault-status-500: {price}
        models:
          sent: {{provider: up, model: fault-slow-first-byte-3000, deadline_s: 0.8}}
          sent-streamed: {{provider: up, model: fault-slow-first-byte-3000, deadline_s: 0.8}}
          failed-then-sent:
            deadline_s: 0.8
            targets:
              - {{provider: up, model: fault-status-500}}
              - {{provider: up, model: fault-slow-first-byte-3000}}
          connecting: {{provider: dead, model: m, deadline_s: 0.8}}
          failed-then-connecting:
            deadline_s: 0.8
            targets:
              - {{provider: up, model: fault-status-500}}
              - {{provider: dead, model: m}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    for _ in range(100):
        response = httpx.get(gw.url + "/admin/usage", params={"scope": "model", "name": alias},
                             headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
        assert response.status_code == 200, response.text
        rows = response.json()["usage"]
        if rows and rows[0]["requests"] >= 1:
            return dict(rows[0])
        time.sleep(0.1)
    raise AssertionError(f"no usage counted for {alias}")


def _ask(gw: RunningGateway, alias: str, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=20,
                      json={"model": alias, "max_tokens": 5, "stream": stream,
                            "messages": [{"role": "user", "content": PROMPT}]})


@pytest.mark.parametrize("alias", ["sent", "sent-streamed"])
def test_a_deadline_that_cuts_a_sent_attempt_bills_its_prompt(gw: RunningGateway, alias: str) -> None:
    answer = _ask(gw, alias, stream=alias.endswith("streamed"))
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "deadline_exceeded", answer.text
    row = _row(gw, alias)
    assert row["prompt_tokens"] > 50 and row["completion_tokens"] == 0 and row["cost_usd"] > 0, row


def test_a_deadline_that_cuts_a_sent_fallback_bills_its_prompt_once(gw: RunningGateway) -> None:
    """The first target's 500 (an error status: not billed), then the deadline cuts the second, which had it."""
    answer = _ask(gw, "failed-then-sent")
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "all_targets_failed", answer.text
    row = _row(gw, "failed-then-sent")
    assert 50 < row["prompt_tokens"] < 100 and row["cost_usd"] > 0, row  # (`PROMPT`'s ~51 tokens, once)


@pytest.mark.parametrize("alias", ["connecting", "failed-then-connecting"])
def test_a_deadline_that_cuts_a_connect_bills_nothing(gw: RunningGateway, alias: str) -> None:
    answer = _ask(gw, alias)
    assert answer.status_code in (502, 504), answer.text
    row = _row(gw, alias)
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row
