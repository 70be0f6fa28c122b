"""A connection that is never made is billed nothing (docs/accounting.md: "a connect timeout too"), also when the
target's `first_byte_s` is shorter than its `connect_s`: the first-byte timer, which runs while connecting too,
then fires first, and the request that never left the gateway is a connect timeout, not one that "timed out waiting
for the upstream's answer" (H53: it was billed its prompt estimate so), streamed or not."""
from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import usage_row

KEY = "gw-billing-connect-first-byte-key-000000000"
ADMIN = "admin-billing-connect-first-byte"
PROMPT = " ".join(["antidisestablishmentarianism"] * 60)


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
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          dead: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1", api_key_env: MOCK_UPSTREAM_KEY,
                  timeouts: {{connect_s: 0.3, first_byte_s: 0.8, idle_s: 2, total_s: 10}}}}
          dead-fast-first-byte: {{kind: openai, base_url: "http://127.0.0.1:{unanswered}/v1",
                                  api_key_env: MOCK_UPSTREAM_KEY,
                                  timeouts: {{connect_s: 2, first_byte_s: 0.8, idle_s: 2, total_s: 10}}}}
        prices:
          m: {{input_per_mtok: 1000, output_per_mtok: 1000}}
        models:
          connect-first: {{provider: dead, model: m}}
          first-byte-first: {{provider: dead-fast-first-byte, model: m}}
          first-byte-first-stream: {{provider: dead-fast-first-byte, model: m}}
          first-byte-first-retried:
            targets:
              - {{provider: dead-fast-first-byte, model: m, retry: {{attempts: 1, backoff_s: 0.01}}}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
    yield running
    running.stop()


@pytest.mark.parametrize("alias", ["connect-first", "first-byte-first", "first-byte-first-stream",
                                   "first-byte-first-retried"])
def test_a_request_never_connected_is_not_billed(gw: RunningGateway, alias: str) -> None:
    response = httpx.post(gw.base_url + "/chat/completions", timeout=10, headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": alias, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
                                "stream": alias.endswith("-stream")})
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout", error
    if alias.startswith("first-byte-first") and not alias.endswith("-retried"):
        assert "connecting" in error["message"], error
    row = usage_row(gw.url, ADMIN, alias)
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row
