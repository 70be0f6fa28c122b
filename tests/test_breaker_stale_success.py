"""An answer from an attempt that began before its breaker opened leaves the breaker open for its cooldown.

README: the breaker "stays open `cooldown_s`, then one request probes it". An attempt already under way when
another request's failure opened the breaker is neither that probe nor news of the target's recovery: its
failure does not put the probe off, and its success must not close the breaker, here nor (through the shared
close) on every replica. End to end with one gateway and with two sharing Redis (GATEWAY_TEST_REDIS_URL, or a
private server; a key prefix of each test's own, deleted after), and the pure logic of `Breakers` at the end:
within the cooldown the forced try of an alias whose targets are all open and an active health check still
close the breaker.
"""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from gateway.policy.schema import BreakerSpec
from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from tests.conftest import UPSTREAM_KEY
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_routing import Make, chat, routing_policy, target
from tests.test_routing_faults import Answer, Scripted, metric, scripted_provider

MODELS = """\
    m:
      targets: [{provider: s, model: x}, {provider: b, model: mock-model}]
    """
BREAKER = "routing: {breaker: {failures: 1, cooldown_s: 30, sync_interval_s: 0.2}}\n"


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    name = f"gwtest:{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=name + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _in_background(work: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[httpx.Response]]:
    answers: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answers.append(work()))
    thread.start()
    return thread, answers


def test_a_stale_success_does_not_end_the_cooldown(make_gateway: Make, upstream: MockUpstream,
                                                   upstream_b: MockUpstream) -> None:
    # Request 1 reaches s first and is answered slowly (200 after 1.5 s); meanwhile request 2's 500 opens s's
    # breaker (failures: 1, cooldown 30 s).
    with Scripted(Answer(200, delay_s=1.5), Answer(500)) as s:
        running = make_gateway(routing_policy(upstream, upstream_b, MODELS, extra=BREAKER,
                                              providers=scripted_provider(s)))
        slow, answers = _in_background(lambda: chat(running, "m"))
        time.sleep(0.3)
        assert target(chat(running, "m")) == "b/mock-model"  # s's 500 opened its breaker
        assert metric(running, "gateway_breaker_state", target="s/x") == OPEN
        slow.join(10)
        assert answers and target(answers[0]) == "s/x"  # it began before the opening
        # still within the cooldown: s stays open and skipped
        assert metric(running, "gateway_breaker_state", target="s/x") == OPEN
        before = len(s.times)
        assert target(chat(running, "m")) == "b/mock-model" and len(s.times) == before


def test_a_stale_success_on_one_replica_does_not_close_the_breaker_of_another(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, redis_url: str, prefix: str,
) -> None:
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}"}}\n'
    with Scripted(Answer(200, delay_s=1.5), Answer(500)) as s:
        text = routing_policy(upstream, upstream_b, MODELS, extra=BREAKER, state=state,
                              providers=scripted_provider(s))
        one = make_gateway(text, env={"GW_TEST_REDIS": redis_url})
        two = make_gateway(text, env={"GW_TEST_REDIS": redis_url})
        slow, answers = _in_background(lambda: chat(one, "m"))
        time.sleep(0.3)
        assert target(chat(two, "m")) == "b/mock-model"  # replica two's 500 opens the breaker, shared
        time.sleep(0.5)
        assert metric(one, "gateway_breaker_state", target="s/x") == OPEN  # replica one learnt it
        slow.join(10)
        assert answers and target(answers[0]) == "s/x"  # replica one's attempt began before the opening
        time.sleep(0.5)  # (a shared close would have reached replica two by now)
        assert metric(two, "gateway_breaker_state", target="s/x") == OPEN
        assert metric(one, "gateway_breaker_state", target="s/x") == OPEN


# -- the logic --------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _opened_by_another_request(breakers: Breakers, clock: Clock) -> contextvars.Context:
    """This request's attempt of `t` is admitted (closed); another request's failure then opens the breaker.
    Returns this request's context (a request runs in a task of its own)."""
    request = contextvars.copy_context()
    assert request.run(breakers.allow, "t")
    contextvars.Context().run(lambda: (breakers.allow("t"), breakers.failure("t")))
    assert breakers.state("t") == OPEN
    return request


def test_only_an_attempt_begun_after_the_opening_closes_the_breaker_within_its_cooldown() -> None:
    clock = Clock()
    breakers = Breakers(BreakerSpec(failures=1, cooldown_s=30), ["t", "u"], None, clock=clock)
    request = _opened_by_another_request(breakers, clock)
    request.run(breakers.success, "t")  # began before the opening: nothing
    request.run(breakers.opened, "t")  # (a stream of it opening: nothing either)
    assert breakers.state("t") == OPEN and not breakers.allow("t")
    contextvars.Context().run(breakers.success, "t")  # an active health check (its own task): closes
    assert breakers.state("t") == CLOSED

    request = _opened_by_another_request(breakers, clock)
    contextvars.Context().run(lambda: (breakers.allow("u"), breakers.failure("u")))  # every target open
    assert request.run(breakers.least_recently_failed, ["t", "u"]) == "t"
    request.run(breakers.success, "t")  # this request's forced try, made after the opening: closes
    assert breakers.state("t") == CLOSED

    request = _opened_by_another_request(breakers, clock)
    clock.now += 30  # past the cooldown, no probe taken yet: any answer closes, as any failure opens again
    assert breakers.state("t") == HALF_OPEN
    request.run(breakers.success, "t")
    assert breakers.state("t") == CLOSED
