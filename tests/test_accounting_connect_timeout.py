"""A request no upstream got is billed nothing: one whose upstream could not even be connected to within `connect_s`
(alone, or when every target of an alias timed out connecting alike), and one whose client left while the gateway
was still connecting or waiting out a Retry-After before a retry (a request that timed out waiting for its answer,
or whose client left while its upstream had it, is billed its prompt: tests/test_accounting_early_endings.py).

The upstream that never connects is a real listening socket whose accept queue is full (nothing accepts from it), so
the kernel leaves new connections unanswered and aiohttp's `sock_connect` timeout fires, as against a dead host.
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
from gateway.errors import UpstreamConnectTimeout, UpstreamTimeout
from gateway.routing.attempts import aggregate
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-connect-timeout-key-00000000000000000000"
ADMIN = "admin-connect-timeout"


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
    timeouts = "{connect_s: 0.3, first_byte_s: 0.5, idle_s: 2, total_s: 10}"
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          dead: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                  timeouts: {timeouts}}}
          dead2: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                   timeouts: {timeouts}}}
          dead-slow: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                       timeouts: {{connect_s: 3, first_byte_s: 5, idle_s: 5, total_s: 10}}}}
          slow: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                  timeouts: {timeouts}}}
        prices:
          m: {{input_per_mtok: 1000, output_per_mtok: 1000}}
          fault-slow-first-byte-3000: {{input_per_mtok: 1000, output_per_mtok: 1000}}
          fault-retry-after-3: {{input_per_mtok: 1000, output_per_mtok: 1000}}
        models:
          connecting-left: {{provider: dead-slow, model: m}}
          limited-left:
            targets:
              - {{provider: slow, model: fault-retry-after-3, retry: {{attempts: 1}}}}
            retry_on: [rate_limit]
          limited-waited:
            targets:
              - {{provider: slow, model: fault-retry-after-3, retry: {{attempts: 1}}}}
            retry_on: [rate_limit]
          lone: {{provider: dead, model: m}}
          both:
            targets:
              - {{provider: dead, model: m}}
              - {{provider: dead2, model: m}}
          mixed:
            targets:
              - {{provider: dead, model: m}}
              - {{provider: slow, model: fault-slow-first-byte-3000}}
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


def _ask(gw: RunningGateway, alias: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=20,
                      json={"model": alias, "max_tokens": 5, "messages": [{"role": "user", "content": "hello " * 50}]})


@pytest.mark.parametrize("alias", ["lone", "both"])
def test_a_request_never_sent_is_billed_nothing(gw: RunningGateway, alias: str) -> None:
    answer = _ask(gw, alias)
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "upstream_timeout", answer.text
    row = _row(gw, alias)
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row


def test_a_request_one_target_had_is_billed_its_prompt(gw: RunningGateway) -> None:
    """One target never connected, the next had the request and timed out answering: the upstream has the prompt."""
    answer = _ask(gw, "mixed")
    assert answer.status_code == 504, answer.text
    row = _row(gw, "mixed")
    assert row["prompt_tokens"] > 50 and row["cost_usd"] > 0, row


def test_only_timeouts_connecting_everywhere_aggregate_to_a_connect_timeout() -> None:
    class Target:
        def __init__(self, name: str) -> None:
            self.name = name

    connect = UpstreamConnectTimeout("upstream `a` timed out (waiting for the response: connecting)")
    waiting = UpstreamTimeout("upstream `b` timed out (waiting for the response)")
    both: Any = [(Target("a"), connect, "timeout"), (Target("b"), connect, "timeout")]
    assert type(aggregate("x", both)) is UpstreamConnectTimeout
    mixed: Any = [(Target("a"), connect, "timeout"), (Target("b"), waiting, "timeout")]
    assert type(aggregate("x", mixed)) is UpstreamTimeout


def _left(gw: RunningGateway, alias: str, after_s: float) -> None:
    """The request, its client gone after `after_s`."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=after_s,
                   json={"model": alias, "max_tokens": 5, "messages": [{"role": "user", "content": "hello " * 50}]})


def test_a_client_that_waits_for_the_429_is_billed_nothing(gw: RunningGateway) -> None:
    answer = _ask(gw, "limited-waited")
    assert answer.status_code == 429, answer.text
    row = _row(gw, "limited-waited")
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row


@pytest.mark.parametrize("alias", ["limited-left", "connecting-left"])
def test_a_client_that_left_before_any_upstream_had_the_request_is_billed_nothing(gw: RunningGateway,
                                                                                   alias: str) -> None:
    """Left while the gateway waited out the upstream's Retry-After (3 s) before its retry, or while it still
    connected (3 s to a port that never answers)."""
    _left(gw, alias, 1.0)
    row = _row(gw, alias)
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row

