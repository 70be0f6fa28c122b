"""The `x-ratelimit-*` headers describe the caller's window with the fewest left (requests among the request windows,
tokens among the token windows), which is what a client paces itself by. They were ranked by share of the limit: a
key of `rpm: 2` with 1 left lost to its tenant's `rpm: 10` with 3 left, the client read 3, and its third request met
a 429. Real gateway and mock upstream, on the in-process store (both of its admission paths) and on the suite's
Redis; the tie between windows with as many left, which no two real windows of a key and its tenant make
differently, as a unit test of the ranking."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.accounting.headers import tighter, tightest
from gateway.auth.keys import hash_key
from gateway.store.base import WindowReservation
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_accounting_hop_limits import store_states

MAIN = "gw-fewest-left-main-key-000000000000000000"
OTHER = "gw-fewest-left-other-key-11111111111111111"


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """(Named first by a test, so that its gateway, stopped before this ends, writes nothing after the clean-up.)"""
    yield from store_states(request.param)


def _policy(upstream: MockUpstream, state_line: str, key_limits: str, tenant_limits: str) -> str:
    return state_line + textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(MAIN)}", limits: {key_limits}}}
          - {{name: other, tenant: acme, hash: "{hash_key(OTHER)}"}}
        tenants:
          acme: {{limits: {tenant_limits}}}
        providers:
          a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: mock-model}}
        """)


def _call(running: RunningGateway, key: str, text: str = "hello", max_tokens: int = 5) -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", timeout=20, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})


@pytest.mark.parametrize("key_limits", ["{rpm: 2}", "{rpm: 2, concurrent: 5}"])  # (in memory: both admission paths)
def test_the_request_headers_show_the_window_with_the_fewest_requests_left(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
    key_limits: str,
) -> None:
    running = make_gateway(_policy(upstream, state[0], key_limits, "{rpm: 10}"), state[1])
    for _ in range(6):  # the tenant's other key: 6 of the tenant's 10
        assert _call(running, OTHER).status_code == 200
    first = _call(running, MAIN)  # the key: 1 of 2 left (half); the tenant: 3 of 10 left (less than half)
    assert first.status_code == 200, first.text
    assert (first.headers["x-ratelimit-limit-requests"], first.headers["x-ratelimit-remaining-requests"]) == ("2", "1")
    second = _call(running, MAIN)
    assert second.status_code == 200, second.text
    assert (second.headers["x-ratelimit-limit-requests"],
            second.headers["x-ratelimit-remaining-requests"]) == ("2", "0")
    refused = _call(running, MAIN)  # as the headers said
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-requests"] == "2"


def test_the_token_headers_show_the_window_with_the_fewest_tokens_left(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, state[0], "{tpm: 1000}", "{tpm: 3000}"), state[1])
    long = " ".join(["word"] * 1200)  # the other key's prompt: about 1200 of the tenant's 3000 tokens
    assert _call(running, OTHER, long, max_tokens=50).status_code == 200
    answer = _call(running, MAIN, max_tokens=400)  # the key: about 590 of 1000 left; the tenant: about 1350 of 3000
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-limit-tokens"] == "1000"
    assert 500 < int(answer.headers["x-ratelimit-remaining-tokens"]) < 600


def _window(left: int, limit: int, reset: float, ok: bool = True) -> WindowReservation:
    return WindowReservation(ok, float(limit - left), float(limit), reset)


def test_the_fewest_left_is_tightest_whatever_the_limits() -> None:
    key, tenant = _window(1, 2, 50.0), _window(3, 10, 40.0)
    assert tighter(key, tenant) and not tighter(tenant, key)
    assert tightest([tenant, key]) is key and tightest([key, tenant]) is key


def test_of_two_with_as_many_left_the_later_reset_is_tightest() -> None:
    """The client that spends what is left may send again only when the later one resets."""
    early, late = _window(2, 5, 10.0), _window(2, 3, 55.0)
    assert tighter(late, early) and not tighter(early, late)
    assert tightest([early, late]) is late and tightest([late, early]) is late
    spent_early, spent_late = _window(0, 3, 10.0, ok=False), _window(0, 100, 30.0)
    assert tightest([spent_early, spent_late]) is spent_late


def test_a_window_over_its_limit_counts_as_none_left() -> None:
    """Tokens settled past the limit (an answer longer than reserved) read 0 left, as the header says."""
    over, empty = WindowReservation(True, 1200.0, 1000.0, 10.0), _window(0, 500, 20.0)
    assert tightest([over, empty]) is empty and tightest([empty, over]) is empty
