"""A health check sent before its target's breaker opened does not close it within the cooldown.

README: an attempt that began before the breaker opened changes nothing within the cooldown; within it only the
forced try and a health check close the breaker. A health check is an attempt too: one sent while the breaker was
closed, answered after other requests' failures opened it, is no news of a recovery, and closed the breaker (on
every replica, through the shared close) as if it were. A check sent after the opening still closes it.

End to end: a served gateway whose target `h` answers each health check (its `x-request-id`) after `HOLD_S` and
fails every other request with a 500; then the pure logic of `Breakers`, with a clock of the test's own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from aiohttp import web

from gateway.policy.schema import BreakerSpec
from gateway.routing.breaker import CLOSED, OPEN, Breakers
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp
from tests.test_routing import chat, routing_policy, target
from tests.test_routing_faults import metric

Make = Callable[..., RunningGateway]
HOLD_S = 2.0
H = "h/x"


class HeldChecks(ThreadedApp):
    """An OpenAI chat upstream: a health check is answered (200) after `HOLD_S`, any other request with a 500.
    `check_arrived` is set when a check comes in."""

    def __init__(self) -> None:
        super().__init__()
        self.check_arrived = threading.Event()
        self.checks = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.json()
        if request.headers.get("x-request-id") != "health-check":
            error = {"error": {"message": "scripted 500", "type": "server_error", "code": None}}
            return web.json_response(error, status=500)
        self.checks += 1
        self.check_arrived.set()
        await asyncio.sleep(HOLD_S)
        message = {"role": "assistant", "content": "ok", "refusal": None}
        return web.json_response({
            "id": "chatcmpl-held", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_check_sent_before_the_opening_leaves_the_breaker_open(make_gateway: Make, upstream: MockUpstream) -> None:
    with HeldChecks() as held:
        providers = f'  h: {{kind: openai, base_url: "{held.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}\n'
        running = make_gateway(routing_policy(upstream, upstream, f"""\
            m:
              targets:
                - {{provider: h, model: x, health_check: {{interval_s: 1, timeout_s: {HOLD_S + 3}}}}}
                - {{provider: a, model: mock-model}}
            """, providers=providers, extra="routing: {breaker: {failures: 1, cooldown_s: 60}}\n"))
        assert held.check_arrived.wait(5), "no health check came"
        assert metric(running, "gateway_breaker_state", target=H) == CLOSED  # the check is on its way: closed
        assert target(chat(running, "m")) == "a/mock-model"  # h's 500 opens its breaker (for a minute)
        assert metric(running, "gateway_breaker_state", target=H) == OPEN
        # The check sent before the opening answers 200 (after HOLD_S): the breaker stays open.
        _wait(lambda: metric(running, "gateway_upstream_attempts_total", target=H, outcome="health_ok") >= 1,
              HOLD_S + 3, "the first health check did not answer")
        assert metric(running, "gateway_breaker_state", target=H) == OPEN
        assert target(chat(running, "m")) == "a/mock-model"  # skipped: no request reached h
        # The next check, sent after the opening (1 s later, answered HOLD_S after that), closes it.
        _wait(lambda: metric(running, "gateway_breaker_state", target=H) == CLOSED, 1 + HOLD_S + 3,
              "a health check sent after the opening did not close the breaker")
        assert held.checks >= 2


# -- the logic --------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _breakers(clock: Clock) -> Breakers:
    return Breakers(BreakerSpec(failures=1, cooldown_s=30), ["t"], None, clock=clock)


def test_a_check_begun_while_closed_does_not_close_a_breaker_opened_since() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    began = breakers.check_began("t")
    breakers.allow("t")
    breakers.failure("t")  # another request's failure opens it
    breakers.checked("t", began)
    assert breakers.state("t") == OPEN and not breakers.allow("t")
    began = breakers.check_began("t")  # a check sent after the opening closes it
    breakers.checked("t", began)
    assert breakers.state("t") == CLOSED


def test_a_check_begun_before_a_reopening_does_not_close_it() -> None:
    """Sent within one cooldown; the probe after it failed and opened the breaker again: stale for the new one."""
    clock = Clock()
    breakers = _breakers(clock)
    breakers.allow("t")
    breakers.failure("t")
    began = breakers.check_began("t")  # sent while open
    clock.now += 31
    assert breakers.allow("t")  # the probe
    breakers.failure("t")  # opens it again, for a fresh cooldown
    breakers.checked("t", began)
    assert breakers.state("t") == OPEN


def test_a_check_begun_before_another_replicas_opening_does_not_close_it() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    began = breakers.check_began("t")
    breakers.apply(b"open %.3f t" % (time.time() + 30))  # another replica opened it
    assert breakers.state("t") == OPEN
    breakers.checked("t", began)
    assert breakers.state("t") == OPEN


def test_past_the_cooldown_any_check_closes_it() -> None:
    clock = Clock()
    breakers = _breakers(clock)
    began = breakers.check_began("t")
    breakers.allow("t")
    breakers.failure("t")
    clock.now += 31
    breakers.checked("t", began)
    assert breakers.state("t") == CLOSED
