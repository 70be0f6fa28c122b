"""Routing under upstream faults: retries against an opening breaker, the status of a walk that was passed on,
a server error's Retry-After, the latency strategy's failing target, and what `x-gateway-attempts` counts.

End to end: a served gateway, the suite's mock upstreams (`a`, `b`) with fault injection, the Anthropic mock for
a target that cannot take `seed`, and `Scripted`, an OpenAI-shaped upstream whose answers (status, headers,
delay) a test lists in order and which records when each request came.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp
from tests.test_routing import chat, routing_policy, target

Make = Callable[..., RunningGateway]
A = "a/mock-model"


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(autouse=True)
def _clear(upstream: MockUpstream, upstream_b: MockUpstream) -> Iterator[None]:
    upstream.clear()
    upstream_b.clear()
    yield
    upstream.override = upstream_b.override = None


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class Scripted(ThreadedApp):
    """An OpenAI chat upstream answering each request with the next of `answers` (the last one repeats): a
    completion for a 200, else OpenAI's error envelope. `times` holds when each request arrived (monotonic)."""

    def __init__(self, *answers: Answer) -> None:
        super().__init__()
        self.answers = list(answers)
        self.times: list[float] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.times.append(time.monotonic())
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        await asyncio.sleep(answer.delay_s)
        if answer.status != 200:
            error = {"error": {"message": f"scripted {answer.status}", "type": "server_error", "code": None}}
            return web.json_response(error, status=answer.status, headers=answer.headers)
        message = {"role": "assistant", "content": "scripted", "refusal": None}
        return web.json_response({
            "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def scripted_provider(upstream: Scripted) -> str:
    return f'  s: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}\n'


def metric(running: RunningGateway, name: str, **labels: str) -> float:
    """A sample's value from the gateway's /metrics (0 when it has none)."""
    for family in text_string_to_metric_families(running.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def openings(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == "circuit breaker opened"
               and getattr(r, "fields", {}).get("target") == name)


# -- 1. retries and the breaker ---------------------------------------------------------------------------------


def test_retries_stop_once_their_failures_open_the_breaker(make_gateway: Make, upstream: MockUpstream,
                                                          upstream_b: MockUpstream,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets:
            - {provider: a, model: mock-model, retry: {attempts: 4, backoff_s: 0.01}}
            - {provider: b, model: mock-model}
        """, extra="routing: {breaker: {failures: 2, cooldown_s: 30}}\n"))
    upstream.override = "fault-status-500"
    with caplog.at_level(logging.WARNING, logger="gateway.routing"):
        response = chat(running, "m")
        assert response.status_code == 200 and target(response) == "b/mock-model"
        # the second failure opened the breaker: no third request (there were 5, each re-opening it)
        assert len(upstream.requests) == 2
        assert response.headers["x-gateway-attempts"] == "3"
        assert metric(running, "gateway_upstream_retries_total", target=A) == 1
        assert metric(running, "gateway_breaker_state", target=A) == 2  # open
        # while it is open, a failure of an attempt that began before it opened neither logs nor extends it;
        # here: the next request skips the target altogether
        assert target(chat(running, "m")) == "b/mock-model"
        assert len(upstream.requests) == 2
    assert openings(caplog, A) == 1


def test_a_half_open_probe_that_got_a_429_retries_only_if_no_other_request_probes(
        make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    # s: a 500 opens its breaker; after the cooldown, request 1 probes and gets a 429 (waits 1 s to retry); request
    # 2 probes meanwhile and its answer takes 2 s: request 1's retry must not run beside that probe.
    with Scripted(Answer(500), Answer(429, {"Retry-After": "1"}), Answer(200, delay_s=2.0)) as s:
        running = make_gateway(routing_policy(upstream, upstream_b, """\
            m:
              targets:
                - {provider: s, model: x, retry: {attempts: 1, retry_after_max_s: 1}}
                - {provider: b, model: mock-model}
            """, extra="routing: {breaker: {failures: 1, cooldown_s: 0.3}}\n", providers=scripted_provider(s)))
        assert target(chat(running, "m")) == "b/mock-model"  # s's 500 opened its breaker
        time.sleep(0.5)  # past the cooldown: half-open
        first: list[httpx.Response] = []
        prober = threading.Thread(target=lambda: first.append(chat(running, "m")))
        prober.start()
        time.sleep(0.3)  # request 1 got its 429 and waits to retry
        second = chat(running, "m")
        prober.join(10)
        assert target(second) == "s/x"  # the probe that answered
        assert target(first[0]) == "b/mock-model"  # its retry gave way: the breaker was another's probe
        assert len(s.times) == 3  # the 500, the 429, the probe; no retry beside it
        assert metric(running, "gateway_breaker_state", target="s/x") == 0  # the probe closed it


# -- 2. the status of a walk passed on by a context overflow or a field a target lacks ----------------------------


def test_a_context_fallback_that_is_rate_limited_answers_429_with_its_retry_after(
        make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          targets: [{provider: a, model: fault-context-length}]
          context_fallback: big
        big:
          targets: [{provider: b, model: fault-status-429}]
        slow:
          targets: [{provider: a, model: fault-context-length}]
          context_fallback: big-slow
        big-slow:
          targets: [{provider: b, model: fault-slow-first-byte-3000}]
        """))
    response = chat(running, "m")
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "7"
    assert "context window" in response.json()["error"]["message"]  # the overflow is still listed
    assert response.headers["x-gateway-fallback-reason"] == "context_length"
    assert len(upstream.requests) == 1 and len(upstream_b.requests) == 1
    response = chat(running, "slow")  # the fallback timed out: a timeout's 504, not a 502
    assert response.status_code == 504, response.text


def test_a_target_without_the_field_then_a_rate_limited_one_answers_429(
        make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    with MockAnthropic("sk-ant-test") as claude:
        providers = f'  c: {{kind: anthropic, base_url: "{claude.base_url}", api_key_env: ANT_KEY}}\n'
        running = make_gateway(routing_policy(upstream, upstream_b, """\
            m:
              targets: [{provider: c, model: claude-x}, {provider: a, model: fault-status-429}]
            """, providers=providers), env={"ANT_KEY": "sk-ant-test"})
        response = chat(running, "m", seed=1)
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "7"
        assert "seed" in response.json()["error"]["message"]
        assert not claude.requests and len(upstream.requests) == 1
        assert response.headers["x-gateway-attempts"] == "1"  # (5.) nothing was sent to `c`


# -- 3. a server error's Retry-After ------------------------------------------------------------------------------


def test_a_503s_retry_after_is_waited_for_and_passed_on(make_gateway: Make, upstream: MockUpstream,
                                                        upstream_b: MockUpstream) -> None:
    with Scripted(Answer(503, {"Retry-After": "2"})) as s:
        running = make_gateway(routing_policy(upstream, upstream_b, """\
            m:
              targets: [{provider: s, model: x, retry: {attempts: 1, retry_after_max_s: 5}}]
            capped:
              targets: [{provider: s, model: y, retry: {attempts: 1, retry_after_max_s: 0.2}}]
            """, providers=scripted_provider(s)))
        response = chat(running, "m")
        assert len(s.times) == 2
        assert 1.9 <= s.times[1] - s.times[0] < 4, s.times  # the upstream's 2 s, not the 0.25 s backoff's jitter
        assert response.status_code == 502 and response.headers["retry-after"] == "2"
        response = chat(running, "capped")
        assert len(s.times) == 4
        assert s.times[3] - s.times[2] < 1.5, s.times  # capped at 0.2 s by retry_after_max_s
        assert response.headers["retry-after"] == "2"  # the client is told the upstream's own figure


# -- 4. the latency strategy and a target that never answers -------------------------------------------------------


def test_latency_puts_a_target_that_keeps_failing_behind_one_that_answers(
        make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        m:
          strategy: latency
          explore: 0
          targets: [{provider: a, model: fault-status-429}, {provider: b, model: mock-model}]
        """))
    for _ in range(10):
        response = chat(running, "m")
        assert response.status_code == 200 and target(response) == "b/mock-model"
    # both unmeasured, `a` went first once; its 429 counted as a slow answer, and `b` has led since
    assert len(upstream.requests) == 1 and len(upstream_b.requests) == 10


# -- 5. what x-gateway-attempts counts ----------------------------------------------------------------------------


def test_a_target_that_refused_a_field_locally_is_no_attempt(make_gateway: Make, upstream: MockUpstream,
                                                             upstream_b: MockUpstream) -> None:
    with MockAnthropic("sk-ant-test") as claude:
        providers = f'  c: {{kind: anthropic, base_url: "{claude.base_url}", api_key_env: ANT_KEY}}\n'
        running = make_gateway(routing_policy(upstream, upstream_b, """\
            m:
              targets: [{provider: c, model: claude-x}, {provider: b, model: mock-model}]
            """, providers=providers), env={"ANT_KEY": "sk-ant-test"})
        response = chat(running, "m", seed=1)
        assert response.status_code == 200 and target(response) == "b/mock-model"
        assert not claude.requests
        assert response.headers["x-gateway-attempts"] == "1"  # attempts made: only `b` was sent anything
