"""A request whose attempts all met an upstream's own HTTP 504 (an error status the upstream answered with, which
docs/accounting.md bills nothing) is billed nothing however many attempts met one: one, a retry, a fallback to a
second target answering 504 too, or a first target that could not even be connected to (a connect timeout) and a
second answering 504. Their 504 keeps that status (`upstream_status`) rather than read as the gateway's own timeout
waiting (H53: two such attempts were billed the prompt estimate, one nothing). And the other way round, a request
one attempt of which had the upstream at work (it timed out waiting for the answer) is billed its prompt whatever
the attempts after it met: a 500 (a 502 `all_targets_failed` for the client) as well as another timeout."""
from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.errors import UpstreamConnectTimeout, UpstreamTimeout
from gateway.routing.attempts import aggregate
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import usage_row
from tests.support.mock_upstream import MockUpstream

KEY = "gw-billing-upstream-504-key-000000000000000"
ADMIN = "admin-billing-upstream-504"
PROMPT = " ".join(["antidisestablishmentarianism"] * 60)
PRICE = "{input_per_mtok: 1000, output_per_mtok: 2000}"


@pytest.fixture(scope="module")
def unanswered() -> Iterator[int]:
    """A port whose connections are never taken (its accept queue is full): connecting there hangs."""
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
def gw(unanswered: int) -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              openai: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
              other: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
              slow: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                      timeouts: {{connect_s: 1, first_byte_s: 0.3, idle_s: 2, total_s: 10}}}}
              dead: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                      timeouts: {{connect_s: 0.3, first_byte_s: 1, idle_s: 2, total_s: 10}}}}
            prices:
              fault-status-504: {PRICE}
              fault-status-500: {PRICE}
              fault-slow-first-byte-2000: {PRICE}
              m: {PRICE}
            models:
              once: {{provider: openai, model: fault-status-504}}
              retried:
                targets:
                  - {{provider: openai, model: fault-status-504, retry: {{attempts: 1, backoff_s: 0.01}}}}
              fallback:
                targets:
                  - {{provider: openai, model: fault-status-504}}
                  - {{provider: other, model: fault-status-504}}
              connect-then-504:
                targets:
                  - {{provider: dead, model: m}}
                  - {{provider: openai, model: fault-status-504}}
              500-then-504:
                targets:
                  - {{provider: openai, model: fault-status-500}}
                  - {{provider: other, model: fault-status-504}}
              waited-then-500:
                targets:
                  - {{provider: slow, model: fault-slow-first-byte-2000}}
                  - {{provider: openai, model: fault-status-500}}
              waited-then-504:
                targets:
                  - {{provider: slow, model: fault-slow-first-byte-2000}}
                  - {{provider: openai, model: fault-status-504}}
            """)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _ask(gw: RunningGateway, alias: str) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", timeout=10, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": alias, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5})


@pytest.mark.parametrize(("alias", "attempts", "status"), [
    ("once", "1", 504), ("retried", "2", 504), ("fallback", "2", 504), ("connect-then-504", "2", 504),
    ("500-then-504", "2", 502)])
def test_an_upstream_504_is_not_billed_however_many_attempts_got_one(
        gw: RunningGateway, alias: str, attempts: str, status: int) -> None:
    response = _ask(gw, alias)
    assert response.status_code == status, response.text
    assert response.headers["x-gateway-attempts"] == attempts
    row = usage_row(gw.url, ADMIN, alias)
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (0, 0, 0), row


@pytest.mark.parametrize(("alias", "status", "code"), [
    ("waited-then-500", 502, "all_targets_failed"), ("waited-then-504", 504, "upstream_timeout")])
def test_an_attempt_that_timed_out_waiting_bills_the_prompt_whatever_came_after(
        gw: RunningGateway, alias: str, status: int, code: str) -> None:
    response = _ask(gw, alias)
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    row = usage_row(gw.url, ADMIN, alias)
    assert row["prompt_tokens"] > 60 and row["completion_tokens"] == 0 and row["cost_usd"] > 0, row


class _Target:
    def __init__(self, name: str) -> None:
        self.name = name


def _status_504(provider: str) -> UpstreamTimeout:
    error = UpstreamTimeout(f"upstream `{provider}` timed out (HTTP 504)")
    error.upstream_status = 504
    return error


def test_the_aggregate_of_timeouts_keeps_what_each_said_of_the_upstream() -> None:
    connect = UpstreamConnectTimeout("upstream `a` timed out (waiting for the response: connecting)")
    waited = UpstreamTimeout("upstream `b` timed out (waiting for the response)")

    def of(*errors: UpstreamTimeout) -> Any:
        failures: Any = [(_Target(str(n)), error, "timeout") for n, error in enumerate(errors)]
        return aggregate("x", failures)

    both_504 = of(_status_504("a"), _status_504("b"))
    assert type(both_504) is UpstreamTimeout and both_504.upstream_status == 504
    connect_504 = of(connect, _status_504("b"))
    assert type(connect_504) is UpstreamTimeout and connect_504.upstream_status == 504
    assert type(of(connect, connect)) is UpstreamConnectTimeout
    for at_work in (of(_status_504("a"), waited), of(connect, waited), of(waited, waited)):
        assert type(at_work) is UpstreamTimeout and at_work.upstream_status is None
