"""OpenAI's `x-ratelimit-*` headers describe the caller's own limits (its key's, its tenant's), never an alias-wide
window shared by every tenant (`models.<alias>.limits`): when that window was the tightest, tenant `acme` read in
its own answers how many requests and tokens tenant `globex` had spent on the alias that minute. An alias's window
shows only in the 429 it causes, with its `Retry-After`. Real gateway, mock upstream, the official OpenAI SDK."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_accounting_hop_limits import store_states

ACME = "gw-b9-headers-acme-key-000000000000000000"
GLOBEX = "gw-b9-headers-globex-key-1111111111111111"


def _policy(upstream: MockUpstream, alias_limits: str, acme_limits: str = "", state_line: str = "") -> str:
    return state_line + textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: acme-key, tenant: acme, hash: "{hash_key(ACME)}"{acme_limits}}}
          - {{name: globex-key, tenant: globex, hash: "{hash_key(GLOBEX)}"}}
        providers:
          a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: mock-model, limits: {alias_limits}}}
        """)


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    yield from store_states(request.param)


def _call(running: RunningGateway, key: str) -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", timeout=20, headers={"Authorization": f"Bearer {key}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5})


def test_a_tenant_cannot_read_another_tenants_traffic_from_its_headers(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(upstream, "{rpm: 1000, tpm: 1000000}"))
    answer = _call(running, ACME)
    assert answer.status_code == 200
    assert not [name for name in answer.headers if name.startswith("x-ratelimit-")]  # acme has no limit of its own
    for _ in range(3):  # the other tenant's traffic
        assert _call(running, GLOBEX).status_code == 200
    later = _call(running, ACME)
    assert later.status_code == 200
    assert not [name for name in later.headers if name.startswith("x-ratelimit-")]


def test_the_headers_read_the_callers_own_limit_and_the_alias_window_only_in_its_429(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """acme's key has `rpm: 500`, the alias `rpm: 7` (tighter): acme's headers count acme's requests alone, until the
    alias's window refuses it: that 429 shows the alias's window, full, and when to retry."""
    running = make_gateway(_policy(upstream, "{rpm: 7}", ", limits: {rpm: 500}", state[0]), state[1])
    first = _call(running, ACME)
    assert first.headers["x-ratelimit-limit-requests"] == "500"
    assert first.headers["x-ratelimit-remaining-requests"] == "499"
    for _ in range(5):
        assert _call(running, GLOBEX).status_code == 200
    second = _call(running, ACME)  # the alias's seventh request of the minute
    assert second.status_code == 200
    assert second.headers["x-ratelimit-limit-requests"] == "500"
    assert second.headers["x-ratelimit-remaining-requests"] == "498"  # globex's five are not acme's
    client = openai.OpenAI(base_url=running.base_url, api_key=ACME, max_retries=0)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}], max_tokens=5)
    headers = refused.value.response.headers
    assert refused.value.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "7"  # the window that refused: the alias's, full
    assert headers["x-ratelimit-remaining-requests"] == "0"
