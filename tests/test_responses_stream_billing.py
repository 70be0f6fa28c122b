"""A `/v1/responses` stream that ends without the upstream's usage is billed its generated content, not its events.

Such a stream (its upstream's body ends early, its client leaves, a hard budget cuts it) is billed from its length,
about a token a content chunk. A Responses stream forwards every upstream event, and its lifecycle events
(`response.created`, `.in_progress`, `.output_item.added`, `.content_part.added`, ...) carry no tokens: they were
counted as completion tokens (a stream ended after 3 one-token deltas billed 7), and a budget's cut, which follows
the same length, fell 4 tokens early. Through a real gateway, the mock upstream speaking the Responses wire format
and the openai SDK as the client: each stream is billed its `*.delta` events exactly, in the ledger
(`GET /admin/usage`), the access log and the metrics alike, and the cut falls where its deltas reach the budget.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.providers.streaming import ResponsesEvents
from gateway.schemas.events import Chunk
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.mock_upstream import MockUpstream

KEY = "gw-responses-billing-key-00000000000000000"
ADMIN = "admin-responses-billing"
PRICE = "{input_per_mtok: 0, output_per_mtok: 1000}"  # $0.001 a completion token, the prompt free
TOKEN_USD = 0.001
BUDGET_USD = 0.015  # 15 tokens at that price


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 1000}}}}
            accounting: {{default_max_tokens: 2}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              oa: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
            models:
              resp-ended: {{targets: [{{provider: oa, model: fault-end-after-3, price: {PRICE}}}]}}
              resp-left: {{targets: [{{provider: oa, model: fault-stall-after-3, price: {PRICE}}}]}}
              resp-cut:
                targets: [{{provider: oa, model: fault-slow-stream-20, price: {PRICE}}}]
                budget: {{usd: {BUDGET_USD}}}
            """)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def _deltas(gw: RunningGateway, alias: str, leave_after: int | None = None) -> tuple[int, str | None]:
    """The `response.output_text.delta` events the client got, and the error that ended the stream (None: none, or
    the client left after `leave_after` deltas)."""
    seen = 0
    stream = _client(gw).responses.create(model=alias, input="hi", stream=True)
    try:
        for event in stream:
            if event.type == "response.output_text.delta":
                seen += 1
                if leave_after is not None and seen >= leave_after:
                    return seen, None
    except openai.APIError as exc:  # the Responses API's `error` event: the stream ended early
        return seen, exc.message
    finally:
        stream.close()
    return seen, None


def _row(gw: RunningGateway, alias: str) -> dict[str, Any]:
    return usage_row(gw.url, ADMIN, alias)


def _metric(gw: RunningGateway, name: str, alias: str, kind: str | None = None) -> float:
    prefix = f'{name}{{model="{alias}",' if kind is None else f'{name}{{kind="{kind}",model="{alias}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines() if line.startswith(prefix))


def _billed_exactly(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, deltas: int) -> None:
    """The ledger, the access log and the metrics: `deltas` completion tokens (estimated), at their price."""
    row = _row(gw, alias)
    assert row["completion_tokens"] == deltas, row
    assert row["cost_usd"] == pytest.approx(deltas * TOKEN_USD, abs=2e-6), row
    line = access_line(caplog, alias)
    assert line["completion_tokens"] == deltas, line
    assert line["tokens_estimated"] is True, line
    assert line["cost_usd"] == pytest.approx(deltas * TOKEN_USD, abs=2e-6), line
    assert _metric(gw, "gateway_tokens_total", alias, "completion") == deltas
    assert _metric(gw, "gateway_cost_usd_total", alias) == pytest.approx(deltas * TOKEN_USD, abs=2e-6)


def test_a_responses_stream_whose_upstream_ended_early_is_billed_its_deltas(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    deltas, error = _deltas(gw, "resp-ended")
    assert deltas == 3  # the upstream's body ended after 3 one-token deltas, before `response.completed`
    assert error is not None and "ended the stream before the response completed" in error, error
    _billed_exactly(gw, caplog, "resp-ended", 3)  # was 7: created, in_progress, output_item/content_part.added


def test_a_responses_stream_the_client_left_is_billed_its_deltas(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    deltas, error = _deltas(gw, "resp-left", leave_after=3)  # the upstream stalls after 3: the client leaves
    assert (deltas, error) == (3, None)
    _billed_exactly(gw, caplog, "resp-left", 3)  # was 7


def test_a_responses_stream_cut_by_a_hard_budget_is_cut_and_billed_by_its_deltas(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    deltas, error = _deltas(gw, "resp-cut")  # 50 one-token deltas; the budget holds 15 tokens
    assert error is not None and "budget" in error, error
    # Reserved 2 tokens, then steps of 2 up to 14 ($0.014): the step past it is refused, and the delta that crossed
    # it is the last one sent and billed. Was 11 deltas sent and 15 tokens billed: the 4 opening events counted.
    assert deltas == round(BUDGET_USD / TOKEN_USD), deltas
    _billed_exactly(gw, caplog, "resp-cut", deltas)


class _Host:
    """What `ResponsesEvents` asks of its provider (a name; its scrubbing, unused by these events)."""

    name = "oa"

    def release(self) -> None: ...

    def sanitize(self, message: object) -> str:
        return str(message)

    def unsecret(self, text: str) -> str:
        return text


@pytest.mark.parametrize(("kind", "content"), [
    ("response.output_text.delta", True),
    ("response.refusal.delta", True),
    ("response.function_call_arguments.delta", True),
    ("response.reasoning_text.delta", True),
    ("response.reasoning_summary_text.delta", True),
    ("response.created", False),
    ("response.in_progress", False),
    ("response.output_item.added", False),
    ("response.content_part.added", False),
    ("response.reasoning_summary_part.added", False),
    ("response.output_text.done", False),
    ("response.function_call_arguments.done", False),
    ("response.output_item.done", False),
    ("response.completed", False),
])
def test_only_a_responses_event_of_generated_content_counts_toward_the_stream_s_length(
    kind: str, content: bool,
) -> None:
    events = ResponsesEvents(_Host()).feed(b'{"type":"%b","sequence_number":1}' % kind.encode())
    chunks = [event for event in events if type(event) is Chunk]
    assert len(chunks) == 1
    assert chunks[0].content is content
