"""An answer the upstream began to send (its 200 head came) and that was then cut is billed its prompt estimate,
whatever cut it: a stall (the idle timeout, 504) or a reset connection (502), a complete answer cut mid-body or a
stream cut before its first event (held back for a retry), on one attempt or on each of two. The upstream had the
request and generated the answer it started sending, as for a stream cut after its first chunk, which is billed
(H53: a reset complete answer was billed nothing where a stalled one was billed). A connection the upstream reset
before any answer's head is billed nothing, as an error status is."""
from __future__ import annotations

import asyncio
import socket
import struct
import textwrap
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import usage_row
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

KEY = "gw-billing-cut-body-key-00000000000000000000"
ADMIN = "admin-billing-cut-body"
PROMPT = " ".join(["antidisestablishmentarianism"] * 60)
PRICE = "{input_per_mtok: 1000, output_per_mtok: 2000}"


class _HeadThenReset(ThreadedApp):
    """Answers every chat request with a 200 event stream's head, then resets the connection before any event."""

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(0.05)  # the head leaves first, then the RST (SO_LINGER 0)
            assert request.transport is not None
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()
            return response

        app.router.add_post("/v1/chat/completions", handle)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock, _HeadThenReset() as heads:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100}}}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              openai: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY,
                        timeouts: {{connect_s: 1, first_byte_s: 2, idle_s: 0.5, total_s: 10}}}}
              heads: {{kind: openai, base_url: "http://127.0.0.1:{heads.port}/v1", api_key_env: MOCK_UPSTREAM_KEY}}
            prices:
              fault-stall-after-3: {PRICE}
              fault-reset-after-3: {PRICE}
              fault-stall-after-0: {PRICE}
              fault-reset-after-0: {PRICE}
              fault-reset-before: {PRICE}
              m: {PRICE}
            models:
              stalled: {{provider: openai, model: fault-stall-after-3}}
              reset: {{provider: openai, model: fault-reset-after-3}}
              reset-retried:
                targets:
                  - {{provider: openai, model: fault-reset-after-3, retry: {{attempts: 1, backoff_s: 0.01}}}}
              stream-stalled: {{provider: openai, model: fault-stall-after-0}}
              stream-reset: {{provider: openai, model: fault-reset-after-0}}
              stream-reset-before-content:
                targets:
                  - {{provider: heads, model: m, retry: {{attempts: 1, backoff_s: 0.01}}}}
              reset-before-head: {{provider: openai, model: fault-reset-before}}
            """)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _ask(gw: RunningGateway, alias: str, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", timeout=10, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": alias, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
                            "stream": stream})


@pytest.mark.parametrize(("alias", "status", "stream"), [
    ("stalled", 504, False), ("reset", 502, False), ("reset-retried", 502, False),
    ("stream-stalled", 200, True), ("stream-reset", 200, True), ("stream-reset-before-content", 502, True)])
def test_an_answer_cut_after_its_head_is_billed_its_prompt_whatever_cut_it(
        gw: RunningGateway, alias: str, status: int, stream: bool) -> None:
    response = _ask(gw, alias, stream)
    assert response.status_code == status, response.text
    row = usage_row(gw.url, ADMIN, alias)
    assert row["prompt_tokens"] > 60 and row["cost_usd"] > 0, row
    if status != 200:  # (a stream that started is billed the chunks it sent too: docs/accounting.md)
        assert row["completion_tokens"] == 0, row


def test_a_connection_reset_before_the_answers_head_is_not_billed(gw: RunningGateway) -> None:
    response = _ask(gw, "reset-before-head")
    assert response.status_code == 502, response.text
    row = usage_row(gw.url, ADMIN, "reset-before-head")
    assert (row["prompt_tokens"], row["cost_usd"]) == (0, 0), row
