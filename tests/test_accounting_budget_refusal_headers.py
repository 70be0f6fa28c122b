"""A budget's refusal: what its `x-ratelimit-remaining-*` headers say, and whether a client is told to retry it.

A request a hard budget refuses gives back the request and the tokens its limits took, before its 429 is answered,
as a request a limit refuses does; its headers showed those windows counting it (a key of `rpm: 10` refused by its
tenant's budget on its first request read 9 requests left, and a later admitted one 9 again). A request whose
reservation alone is more than a hard budget's whole amount is refused on an empty counter too, in every period:
it is told so (`x-should-retry: false`, which the OpenAI and Anthropic SDKs obey: they sent it three times), as a
request larger than a whole `tpm` window is. Real gateway and mock upstream, on the in-process store, the suite's
Redis and a Redis Cluster (where the limits and the budget are each taken alone); the requests reaching the gateway
counted by `gateway_limit_rejections_total`."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_rate_limit_429_remaining import _states, cluster  # noqa: F401  (`cluster`: the fixture `_states` asks for)

MAIN = "gw-budget-refusal-main-key-000000000000000"
OTHER = "gw-budget-refusal-other-key-11111111111111"
# Only output tokens cost, $0.001 each: a request's reservation is its `max_tokens` in thousandths of a dollar, and
# every mock answer (20 words, 20 completion tokens) at `max_tokens: 20` costs exactly what it reserved.
OUT_PER_MTOK = 1000.0


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """(Named first by a test, so that its gateway, stopped before this ends, writes nothing after the clean-up.)"""
    yield from _states(request)


@pytest.fixture(params=["memory", "redis", "cluster"])
def any_state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """`state`, and a Redis Cluster: every way a refused request's reservations are given back."""
    yield from _states(request)


def _policy(upstream: MockUpstream, state_line: str, key: str, tenant: str = "{}") -> str:
    return state_line + textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(MAIN)}", {key}}}
          - {{name: other, tenant: acme, hash: "{hash_key(OTHER)}"}}
        tenants:
          acme: {tenant}
        providers:
          a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
        models:
          chat: {{provider: a, model: mock-model}}
        """)


def _call(running: RunningGateway, max_tokens: int, key: str = MAIN) -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", timeout=30, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})


def _window(answer: httpx.Response, kind: str) -> tuple[str, str]:
    return answer.headers[f"x-ratelimit-limit-{kind}"], answer.headers[f"x-ratelimit-remaining-{kind}"]


def _rejections(running: RunningGateway, scope: str) -> float:
    series = f'gateway_limit_rejections_total{{kind="budget",scope="{scope}"}} '
    found = re.search("^" + re.escape(series) + r"(\S+)$", running.metrics(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_budget_429_shows_the_windows_without_the_refused_request(
    any_state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """The tenant's $0.05 spent to $0.04 by the other key: main's first request ($0.02) is refused by it, after
    main's own windows took it; they show as they stand, untouched (10 requests, 100000 tokens left)."""
    running = make_gateway(_policy(upstream, any_state[0], "limits: {rpm: 10, tpm: 100000}",
                                   "{budget: {usd: 0.05, period: day}}"), any_state[1])
    for _ in range(2):
        assert _call(running, 20, OTHER).status_code == 200
    refused = _call(running, 20)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert _window(refused, "requests") == ("10", "10")
    assert _window(refused, "tokens") == ("100000", "100000")
    assert "x-should-retry" not in refused.headers  # (the tenant's next period has room for it)
    admitted = _call(running, 5)  # $0.005 fits: the first request the windows count
    assert admitted.status_code == 200, admitted.text
    assert _window(admitted, "requests") == ("10", "9")
    assert _rejections(running, "tenant") == 1


def test_a_budget_429_after_admitted_requests_shows_only_those(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """The key's own $0.05 budget: two requests of $0.02 are admitted, the third refused (the windows show the
    two, 8 requests left); the in-process store's tight path (requests-per-minute limits only) too."""
    running = make_gateway(_policy(upstream, state[0], "limits: {rpm: 10}, budget: {usd: 0.05, period: day}"),
                           state[1])
    for left in ("9", "8"):
        assert _window(_call(running, 20), "requests") == ("10", left)
    refused = _call(running, 20)
    assert refused.status_code == 429, refused.text
    assert _window(refused, "requests") == ("10", "8")
    assert "x-should-retry" not in refused.headers and "retry-after" not in refused.headers


def test_a_request_dearer_than_the_whole_budget_is_not_to_be_retried(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """`max_tokens: 100` reserves $0.10, more than the key's whole $0.05 budget: refused in every period, however
    long it waits. Its windows show as they stand, untouched."""
    running = make_gateway(_policy(upstream, state[0], "limits: {rpm: 10, tpm: 100000}, "
                                                       "budget: {usd: 0.05, period: day}"), state[1])
    refused = _call(running, 100)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "budget_exceeded")
    assert "request too large for the budget of this key" in error["message"]
    assert "up to 0.1 USD" in error["message"] and "whole budget of 0.05 USD" in error["message"]
    assert "max_tokens" in error["message"] and "shorter prompt" in error["message"]
    assert "retry-after" not in refused.headers and refused.headers["x-should-retry"] == "false"
    assert _window(refused, "requests") == ("10", "10")
    assert _window(refused, "tokens") == ("100000", "100000")
    assert _rejections(running, "key") == 1

    sdk = openai.OpenAI(base_url=running.base_url, api_key=MAIN, max_retries=2, timeout=30)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "budget_exceeded" and "request too large" in str(caught.value)
    assert _rejections(running, "key") == 2  # one request: not retried

    with anthropic.Anthropic(base_url=running.url, api_key=MAIN, max_retries=2, timeout=30) as messages:
        with pytest.raises(anthropic.RateLimitError) as refused_messages:
            messages.messages.create(model="chat", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    body: Any = refused_messages.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "request too large" in body["error"]["message"]
    headers = refused_messages.value.response.headers
    assert "retry-after" not in headers and headers["x-should-retry"] == "false"
    assert _rejections(running, "key") == 3  # one request: not retried

    assert _call(running, 50).status_code == 200  # exactly the whole budget fits an empty counter


def test_a_budget_the_request_could_never_fit_is_the_refusal_it_gets(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """`max_tokens: 50` ($0.05): the key's $0.05 budget, spent to $0.04, refuses it first (its next period has room
    for it), the tenant's whole $0.045 too: that refusal is the one told, not to be retried, as a request larger
    than a whole `tpm` window is when another limit refused it as well."""
    running = make_gateway(_policy(upstream, state[0], "budget: {usd: 0.05, period: day}",
                                   "{budget: {usd: 0.045, period: day}}"), state[1])
    for _ in range(2):
        assert _call(running, 20).status_code == 200
    refused = _call(running, 50)
    assert refused.status_code == 429, refused.text
    assert "request too large for the budget of this tenant" in refused.json()["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert _rejections(running, "tenant") == 1 and _rejections(running, "key") == 0
