"""`when_all_open: refuse` answers 503 `targets_unavailable` with the wait until the first breaker may be probed,
rounded up, in `Retry-After` and in `retry-after-ms` (which the openai SDK reads first): a client that waits exactly
that long comes back once the cooldown is over, and is served (H53: Retry-After was rounded to the nearest second,
2 for a cooldown of 2.4 s, and the openai SDK with one retry was refused again)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_routing import MESSAGES, chat, routing_policy

COOLDOWN_S = 2.4


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


def _opened(make_gateway, upstream: MockUpstream, upstream_b: MockUpstream) -> RunningGateway:
    """A gateway whose lone target's breaker was just opened (cooldown 2.4 s) by a 500; the upstream recovered."""
    running: RunningGateway = make_gateway(routing_policy(upstream, upstream_b, """\
        m: {provider: a, model: mock-model}
        """, extra=f"routing: {{breaker: {{failures: 1, cooldown_s: {COOLDOWN_S}, when_all_open: refuse}}}}\n"))
    upstream.override = "fault-status-500"
    try:
        assert chat(running, "m").status_code == 502  # opens the breaker
    finally:
        upstream.override = None
    return running


def test_a_client_that_waits_the_retry_after_finds_the_breaker_past_its_cooldown(
        make_gateway, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    running = _opened(make_gateway, upstream, upstream_b)
    refused = chat(running, "m")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "targets_unavailable", refused.text
    wait, wait_ms = int(refused.headers["retry-after"]), int(refused.headers["retry-after-ms"])
    assert COOLDOWN_S - 1 < wait_ms / 1000 <= COOLDOWN_S and wait == math.ceil(wait_ms / 1000), refused.headers
    time.sleep(wait)  # exactly what the server asked
    again = chat(running, "m")
    assert again.status_code == 200, again.text


def test_the_openai_sdk_with_one_retry_is_served(
        make_gateway, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    running = _opened(make_gateway, upstream, upstream_b)
    client = openai.OpenAI(api_key=FULL_KEY, base_url=running.base_url, max_retries=1)
    answer = client.chat.completions.create(model="m", messages=MESSAGES)
    assert answer.choices[0].message.content
