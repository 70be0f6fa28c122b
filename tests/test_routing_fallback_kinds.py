"""Routing on failures that are neither the client's nor the upstream's health: an upstream that refuses the
gateway's own credential, every target's local pool full, and which reason a walk of several hops reports.

End to end: a served gateway, the suite's mock upstreams (`a`, `b`) with fault injection, and the Anthropic and
Gemini mocks given a key they do not accept (each provider's own answer to a bad key: Anthropic's 401
`authentication_error`, Google's 400 `API_KEY_INVALID`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream
from tests.test_routing import AUTH, MESSAGES, chat, routing_policy, stream, target
from tests.test_routing_faults import metric

Make = Callable[..., RunningGateway]
WRONG_ANTHROPIC = "sk-ant-rotated-away-7f3a9c"
WRONG_GEMINI = "AIza-rotated-away-5d81e2"


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def claude() -> Iterator[MockAnthropic]:
    with MockAnthropic("sk-ant-the-right-one") as mock:
        yield mock


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini("AIza-the-right-one") as mock:
        yield mock


@pytest.fixture(autouse=True)
def _clear(upstream: MockUpstream, upstream_b: MockUpstream) -> Iterator[None]:
    upstream.clear()
    upstream_b.clear()
    yield
    upstream.override = upstream_b.override = None


def refusing(claude: MockAnthropic, gemini: MockGemini) -> str:
    """Providers `c` (Anthropic) and `g` (Gemini) configured with keys their upstreams refuse."""
    return (f'  c: {{kind: anthropic, base_url: "{claude.base_url}", api_key_env: ANT_KEY}}\n'
            f'  g: {{kind: gemini, base_url: "{gemini.base_url}", api_key_env: GEM_KEY}}\n')


WRONG_KEYS = {"ANT_KEY": WRONG_ANTHROPIC, "GEM_KEY": WRONG_GEMINI}
FIRST = {"openai-401": "{provider: a, model: fault-status-401}", "openai-403": "{provider: a, model: fault-status-403}",
         "anthropic-401": "{provider: c, model: claude-x}", "gemini-400-bad-key": "{provider: g, model: gemini-x}"}


def access_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    line: dict[str, Any] = [getattr(r, "fields", {}) for r in caplog.records if r.name == "gateway.access"][-1]
    return line


# -- the gateway's own credential refused -------------------------------------------------------------------------


@pytest.mark.parametrize("first", sorted(FIRST))
def test_a_refused_gateway_credential_falls_back_without_a_retry(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, claude: MockAnthropic, gemini: MockGemini,
    first: str, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, f"""\
        m:
          targets: [{FIRST[first]}, {{provider: b, model: mock-model}}]
          retry: {{attempts: 2, backoff_s: 0.01}}
        """, providers=refusing(claude, gemini)), env=WRONG_KEYS)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = chat(running, "m")
    assert response.status_code == 200, response.text
    assert target(response) == "b/mock-model"
    # the same key would be refused again: one attempt, then the next target
    assert response.headers["x-gateway-attempts"] == "2"
    assert response.headers["x-gateway-fallback-reason"] == "credentials"
    assert [a["outcome"] for a in access_line(caplog)["attempts"]] == ["credentials", "ok"]
    assert 'gateway_fallbacks_total{model="m",reason="credentials"} 1.0' in running.metrics()


def test_a_streamed_request_falls_back_on_a_refused_credential(make_gateway: Make, upstream: MockUpstream,
                                                                upstream_b: MockUpstream) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets: [{provider: a, model: fault-status-401}, {provider: b, model: mock-model}]
        """))
    headers, events = stream(running, "m")
    assert events[-1] == "[DONE]"
    assert headers["x-gateway-target"] == "b/mock-model"
    assert headers["x-gateway-fallback-reason"] == "credentials"


def test_every_target_refusing_its_credential_is_a_502_that_names_no_key(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, claude: MockAnthropic, gemini: MockGemini,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets: [{provider: c, model: claude-x}, {provider: g, model: gemini-x}]
          retry: {attempts: 2, backoff_s: 0.01}
        """, providers=refusing(claude, gemini)), env=WRONG_KEYS)
    response = chat(running, "m")
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "all_targets_failed"
    assert "upstream `c` rejected the gateway's credentials (HTTP 401)" in error["message"]
    assert "upstream `g` rejected the gateway's credentials (HTTP 400: its API key is not valid" in error["message"]
    assert response.headers["x-gateway-attempts"] == "2"
    for secret in (WRONG_ANTHROPIC, WRONG_GEMINI, "rotated-away"):
        assert secret not in response.text and secret not in str(response.headers)


def test_refused_credentials_open_the_targets_breaker(make_gateway: Make, upstream: MockUpstream,
                                                      upstream_b: MockUpstream) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets: [{provider: a, model: mock-model}, {provider: b, model: mock-model}]
        """, extra="routing: {breaker: {failures: 2, cooldown_s: 30}}\n"))
    upstream.override = "fault-status-401"
    for _ in range(2):
        assert target(chat(running, "m")) == "b/mock-model"
    assert len(upstream.requests) == 2
    assert metric(running, "gateway_breaker_state", target="a/mock-model") == 2  # open
    skipped = chat(running, "m")
    assert target(skipped) == "b/mock-model" and skipped.headers["x-gateway-attempts"] == "1"
    assert skipped.headers["x-gateway-fallback-reason"] == "breaker_open"
    assert len(upstream.requests) == 2  # not asked again with the key it refuses



def test_a_forced_try_of_the_only_open_target_is_no_fallback(make_gateway: Make, upstream: MockUpstream,
                                                             upstream_b: MockUpstream) -> None:
    """Every target's circuit open (`when_all_open: try_least_recent`, the default): the target tried anyway is
    the one passed over, so nothing fell back; with another target closed, passing over the open one is one."""
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        dead: {provider: a, model: fault-status-500}
        m:
          targets: [{provider: a, model: fault-status-500}, {provider: b, model: mock-model}]
        """, extra="routing: {breaker: {failures: 2, cooldown_s: 30}}\n"))
    for _ in range(2):
        assert chat(running, "dead").status_code == 502
    assert metric(running, "gateway_breaker_state", target="a/fault-status-500") == 2  # open
    forced = chat(running, "dead")
    assert forced.status_code == 502 and forced.headers["x-gateway-attempts"] == "1"
    assert "x-gateway-fallback-reason" not in forced.headers
    assert metric(running, "gateway_fallbacks_total", model="dead", reason="breaker_open") == 0
    skipped = chat(running, "m")
    assert target(skipped) == "b/mock-model" and skipped.headers["x-gateway-fallback-reason"] == "breaker_open"
    assert metric(running, "gateway_fallbacks_total", model="m", reason="breaker_open") == 1


# -- every local pool full ----------------------------------------------------------------------------------------


def test_every_targets_full_pool_is_a_503_gateway_busy(make_gateway: Make, upstream: MockUpstream,
                                                       upstream_b: MockUpstream) -> None:
    narrow = "".join(f'  {name}: {{kind: openai, base_url: "{mock.base_url}", api_key_env: MOCK_UPSTREAM_KEY, '
                     "pool_size: 1, pool_timeout_s: 0.2}\n" for name, mock in (("n1", upstream), ("n2", upstream_b)))
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        held1: {provider: n1, model: fault-slow-stream-100}
        held2: {provider: n2, model: fault-slow-stream-100}
        m:
          targets: [{provider: n1, model: mock-model}, {provider: n2, model: mock-model}]
        """, providers=narrow))
    body = {"messages": MESSAGES, "stream": True}
    with httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                      json={"model": "held1", **body}) as one, \
            httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                         json={"model": "held2", **body}) as two:
        pieces = one.iter_raw(), two.iter_raw()  # kept: a dropped iterator would close its stream
        for held in pieces:
            next(held)  # the one slot of each provider is taken
        response = chat(running, "m")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "gateway_busy"
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-gateway-fallback-reason"] == "busy"


# -- the reason a walk reports ------------------------------------------------------------------------------------


def test_the_fallback_reason_is_why_the_first_choice_was_left(make_gateway: Make, upstream: MockUpstream,
                                                              upstream_b: MockUpstream,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets: [{provider: a, model: fault-status-500}, {provider: b, model: fault-status-429},
                    {provider: a, model: mock-model}]
          retry: {attempts: 0}
        """))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = chat(running, "m")
    assert response.status_code == 200 and target(response) == "a/mock-model"
    assert response.headers["x-gateway-fallback-reason"] == "server_error"
    assert access_line(caplog)["fallback_reason"] == "server_error"
    metrics = running.metrics()  # each hop is still counted by its own reason
    assert 'gateway_fallbacks_total{model="m",reason="server_error"} 1.0' in metrics
    assert 'gateway_fallbacks_total{model="m",reason="rate_limit"} 1.0' in metrics
