"""A streamed attempt is judged by its whole stream: breakers, `gateway_upstream_attempts_total` and the access log.

End to end through two mock upstreams (`a`, the suite's, and `b`) with fault injection, as `test_routing` does:
an upstream that fails every stream after its first chunk (a reset, a read timeout, an error event, a body cut
before its end) trips its breaker; a stream's opening neither counts nor resets the consecutive failures; a
streamed probe closes the breaker when it opens and its stream's failure counts afterwards; a client that leaves
gives no verdict; across a reload a stream's verdict counts on the breaker of the policy in force; and through
Redis another replica learns of a breaker a stream opened. The pure logic (`Breakers.opened`/`ended`, the
hand-over between reloads, `stream_outcome`) is unit-tested at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import (
    BudgetExceeded,
    ContentPolicyViolation,
    InternalError,
    RateLimited,
    ShuttingDown,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
)
from gateway.pipeline.streams import StreamEnd
from gateway.policy.schema import BreakerSpec
from gateway.routing.attempts import DeadlineExceeded
from gateway.routing.breaker import CLOSED, HALF_OPEN, OPEN, Breakers
from gateway.routing.verdicts import stream_outcome
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_reload import reload_now
from tests.test_routing import chat, routing_policy, target

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]
Make = Callable[..., RunningGateway]
GUARDED = "guarded:\n  targets: [{provider: a, model: mock-model}, {provider: b, model: mock-model}]\n"
A = "a/mock-model"


def patient(provider: str, model: str) -> str:
    """A target whose stream may stall for 3 s before it times out: longer than what a test does meanwhile."""
    timeouts = "{connect_s: 1, first_byte_s: 1, idle_s: 3, total_s: 20}"
    return f"{{provider: {provider}, model: {model}, timeouts: {timeouts}}}"


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


def breaker(failures: int, cooldown_s: float) -> str:
    return f"routing: {{breaker: {{failures: {failures}, cooldown_s: {cooldown_s}, sync_interval_s: 0.2}}}}\n"


def metric(running: RunningGateway, name: str, **labels: str) -> float:
    """A sample's value from the gateway's /metrics (0 when it has none)."""
    for family in text_string_to_metric_families(running.metrics()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def breaker_state(running: RunningGateway, name: str) -> float:
    return metric(running, "gateway_breaker_state", target=name)


def attempts(running: RunningGateway, name: str, outcome: str) -> float:
    return metric(running, "gateway_upstream_attempts_total", target=name, outcome=outcome)


class OpenStream:
    """A streamed chat request read event by event (the `data:` payloads), and left whenever the test likes."""

    def __init__(self, running: RunningGateway, model: str) -> None:
        self._stack = contextlib.ExitStack()
        client = self._stack.enter_context(httpx.Client(timeout=30))
        self.response = self._stack.enter_context(client.stream(
            "POST", running.base_url + "/chat/completions", headers=AUTH,
            json={"model": model, "messages": MESSAGES, "stream": True}))
        assert self.response.status_code == 200
        self._lines = self.response.iter_lines()
        self.events: list[str] = []

    def read(self, count: int) -> OpenStream:
        while count and (event := self._next()) is not None:
            self.events.append(event)
            count -= 1
        return self

    def rest(self) -> list[str]:
        while (event := self._next()) is not None:
            self.events.append(event)
        self.close()
        return self.events

    def close(self) -> None:
        self._stack.close()

    def _next(self) -> str | None:
        for line in self._lines:
            if line.startswith("data: "):
                return line.removeprefix("data: ")
        return None


def stream_once(running: RunningGateway, model: str) -> tuple[str, list[str]]:
    opened = OpenStream(running, model)
    return opened.response.headers["x-gateway-target"], opened.rest()


def failed(events: list[str]) -> bool:
    return events[-1] != "[DONE]" and "error" in json.loads(events[-1])


def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- an upstream that fails its streams after it answered ---------------------------------------------------

MIDSTREAM = {  # a fault after the first content chunk -> the attempt's outcome
    "fault-reset-after-1": "server_error",  # the connection is reset
    "fault-stall-after-1": "timeout",  # no bytes for longer than `idle_s` (1 s here)
    "fault-end-after-1": "server_error",  # the body ends, cleanly, before the answer is complete
    "fault-echo-secrets-midstream": "server_error",  # an error event
}


@pytest.mark.parametrize("fault", sorted(MIDSTREAM))
@pytest.mark.parametrize("alias", ["guarded", "lone"])
def test_an_upstream_that_fails_every_stream_after_its_first_chunk_trips_its_breaker(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, fault: str, alias: str,
) -> None:
    """`guarded` peeks at a stream up to its first content (it could fall back); `lone` (one target, no retries)
    hands the stream over as it opens. Either way the stream's failure is the target's."""
    running = make_gateway(routing_policy(upstream, upstream_b, GUARDED + "lone: {provider: a, model: mock-model}\n",
                                          extra=breaker(2, 60)))
    upstream.override = fault
    for _ in range(2):
        answered_by, events = stream_once(running, alias)
        assert answered_by == A and failed(events) and len(events) >= 2  # it answered, then failed
    assert breaker_state(running, A) == OPEN
    assert attempts(running, A, MIDSTREAM[fault]) == 2 and attempts(running, A, "ok") == 0
    upstream.clear()
    if alias == "guarded":  # the next goes to b at once
        answered_by, events = stream_once(running, "guarded")
        assert answered_by == "b/mock-model" and events[-1] == "[DONE]" and not upstream.requests
        assert attempts(running, "b/mock-model", "ok") == 1


def test_the_access_log_lists_a_stream_that_failed_after_it_answered_as_failed(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, """\
        main:
          targets: [{provider: a, model: fault-status-500}, {provider: b, model: fault-reset-after-2}]
        """))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        answered_by, events = stream_once(running, "main")
        assert until(lambda: any(r.name == "gateway.access" for r in caplog.records))
    assert answered_by == "b/fault-reset-after-2" and failed(events)
    line = [getattr(r, "fields", {}) for r in caplog.records if r.name == "gateway.access"][-1]
    assert [(a["target"], a["outcome"]) for a in line["attempts"]] == [
        ("a/fault-status-500", "server_error"), ("b/fault-reset-after-2", "server_error")]
    assert line["status"] == 502
    assert attempts(running, "b/fault-reset-after-2", "server_error") == 1
    assert attempts(running, "b/fault-reset-after-2", "ok") == 0


# -- when the verdict comes: at the stream's end, once ------------------------------------------------------


def test_an_opened_stream_leaves_the_consecutive_failures_as_they_are_until_it_ends(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, GUARDED, extra=breaker(2, 60)))
    upstream.override = "fault-status-500"
    assert target(chat(running, "guarded")) == "b/mock-model"  # a failed once
    upstream.override = "fault-slow-stream-40"  # (read when the request comes: this stream stays slow)
    running_stream = OpenStream(running, "guarded").read(2)
    assert running_stream.response.headers["x-gateway-target"] == A
    assert attempts(running, A, "ok") == 0  # not counted while it runs
    upstream.override = "fault-status-500"
    assert target(chat(running, "guarded")) == "b/mock-model"  # a failed twice in a row: its opened stream is no
    assert breaker_state(running, A) == OPEN  # success yet
    events = running_stream.rest()
    assert events[-1] == "[DONE]"  # it finished, after the breaker opened: no verdict on the open breaker
    assert until(lambda: attempts(running, A, "ok") == 1)  # counted once, at its end
    assert breaker_state(running, A) == OPEN


def test_a_client_that_leaves_a_stream_gives_no_verdict(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    running = make_gateway(routing_policy(upstream, upstream_b, GUARDED, extra=breaker(2, 60)))
    upstream.override = "fault-status-500"
    assert target(chat(running, "guarded")) == "b/mock-model"
    upstream.override = "fault-slow-stream-200"  # its client gives up after two events
    OpenStream(running, "guarded").read(2).close()
    assert upstream.wait_for_disconnect()  # the gateway saw the client leave and let the upstream go
    assert until(lambda: attempts(running, A, "ok") == 1)  # the upstream did not fail it
    upstream.override = "fault-status-500"
    assert target(chat(running, "guarded")) == "b/mock-model"
    assert breaker_state(running, A) == OPEN  # the stream neither reset the count nor counted as a failure


def test_a_streamed_probe_closes_the_breaker_when_it_opens_and_its_failure_counts_afterwards(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream,
) -> None:
    guarded = f"guarded:\n  targets: [{patient('a', 'mock-model')}, {{provider: b, model: mock-model}}]\n"
    running = make_gateway(routing_policy(upstream, upstream_b, guarded, extra=breaker(1, 0.5)))
    upstream.override = "fault-status-500"
    assert target(chat(running, "guarded")) == "b/mock-model"
    assert breaker_state(running, A) == OPEN
    time.sleep(0.6)  # the cooldown ends: the next request probes a
    upstream.override = "fault-stall-after-2"  # the probe's stream will stall, and time out after 3 s
    probe = OpenStream(running, "guarded").read(2)
    assert probe.response.headers["x-gateway-target"] == A
    upstream.override = None
    assert breaker_state(running, A) == CLOSED  # its opening closed the breaker: traffic flows while it runs
    answered = chat(running, "guarded")
    assert target(answered) == A and "x-gateway-fallback-reason" not in answered.headers
    assert failed(probe.rest())  # a read timeout, mid-stream
    assert until(lambda: breaker_state(running, A) == OPEN)  # a failure of the closed breaker (failures: 1)
    assert attempts(running, A, "timeout") == 1


# -- reloads and replicas -----------------------------------------------------------------------------------


def test_a_stream_that_outlives_a_reload_is_judged_by_the_policy_in_force(
    upstream: MockUpstream, upstream_b: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its target stayed: its failure opens the breaker the new policy routes by. Its target left: no verdict (a
    breaker no policy has would stay open, its gauge at 2, for good)."""
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", UPSTREAM_KEY)  # (a reload reads the process's environment)
    kept = f"kept:\n  targets: [{patient('a', 'fault-stall-after-2')}, {{provider: b, model: mock-model}}]\n"
    dropped = f"dropped:\n  targets: [{patient('b', 'fault-stall-after-2')}]\n"
    running = RunningGateway(routing_policy(upstream, upstream_b, kept + dropped, extra=breaker(1, 60)),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, source=tmp_path / "gateway.yaml").start()
    try:
        staying, leaving = OpenStream(running, "kept").read(2), OpenStream(running, "dropped").read(2)
        assert staying.response.headers["x-gateway-target"] == "a/fault-stall-after-2"
        source = running.gateway.source
        assert source is not None
        source.write_text(routing_policy(upstream, upstream_b, kept, extra=breaker(1, 60)))
        assert reload_now(running)["result"] == "ok"
        assert failed(staying.rest()) and failed(leaving.rest())  # both time out, under the new policy
        assert until(lambda: breaker_state(running, "a/fault-stall-after-2") == OPEN)
        answered = chat(running, "kept")
        assert target(answered) == "b/mock-model" and answered.headers["x-gateway-fallback-reason"] == "breaker_open"
        assert breaker_state(running, "b/fault-stall-after-2") == CLOSED
        assert attempts(running, "b/fault-stall-after-2", "timeout") == 1  # counted all the same
    finally:
        running.stop()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def test_another_replica_learns_of_a_breaker_a_stream_opened(
    make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream, redis_url: str,
) -> None:
    state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "gwtest:{uuid.uuid4().hex}:"}}\n'
    policy = routing_policy(upstream, upstream_b, GUARDED, extra=breaker(1, 60), state=state)
    first, second = (make_gateway(policy, env={"GW_TEST_REDIS": redis_url}) for _ in range(2))
    upstream.override = "fault-reset-after-1"
    answered_by, events = stream_once(first, "guarded")
    assert answered_by == A and failed(events)
    assert until(lambda: breaker_state(second, A) == OPEN), "the other replica did not learn of it"
    upstream.clear()
    assert target(chat(second, "guarded")) == "b/mock-model" and not upstream.requests


# -- the pure logic ------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_opened_stream_resets_nothing_and_a_probes_opening_closes_the_breaker() -> None:
    clock = Clock()
    breakers = Breakers(BreakerSpec(failures=2, cooldown_s=30), ["t"], None, clock=clock)
    breakers.failure("t")
    breakers.opened("t")  # a stream of t opened: no verdict yet
    breakers.failure("t")  # the second failure in a row
    assert breakers.state("t") == OPEN
    breakers.ended("t", failed=False)  # the stream finished after the breaker opened: dropped
    assert breakers.state("t") == OPEN
    clock.now += 30
    assert breakers.allow("t") and breakers.state("t") == HALF_OPEN and not breakers.allow("t")
    breakers.opened("t")  # the probe's stream opened: closed at once, and anyone may try t
    assert breakers.state("t") == CLOSED and breakers.allow("t")
    breakers.ended("t", failed=True)  # its stream failed: the first failure of the closed breaker
    assert breakers.state("t") == CLOSED
    breakers.opened("t")
    breakers.ended("t", failed=True)
    assert breakers.state("t") == OPEN


def test_a_stream_counts_once_in_the_window() -> None:
    breakers = Breakers(BreakerSpec(failures=100, failure_ratio=0.5, min_requests=4, window_s=60), ["t"], None,
                        clock=Clock())
    for failed in (False, False, True):
        breakers.opened("t")
        breakers.ended("t", failed=failed)
    assert breakers.state("t") == CLOSED
    breakers.opened("t")
    breakers.ended("t", failed=True)  # 2 failures of 4 requests (counted at their opening too: of 8)
    assert breakers.state("t") == OPEN


def test_a_verdict_after_a_reload_counts_on_the_policy_in_force() -> None:
    spec = BreakerSpec(failures=1)
    old = Breakers(spec, ["kept", "gone", "left", "stays", "later"], None)
    new = Breakers(spec, ["kept", "stays", "later"], None, previous=old)
    old.ended("gone", failed=True)  # `new` has not started: `old`'s policy is still in force
    assert old.state("gone") == OPEN
    new.start()
    old.ended("left", failed=True)  # its target left the policy: no verdict
    old.ended("kept", failed=True)  # it stayed: the breaker the new policy routes by
    assert old.state("left") == CLOSED and new.state("kept") == OPEN
    failed_start = Breakers(spec, ["kept"], None, previous=new)
    failed_start.start()
    asyncio.run(failed_start.aclose())  # a reload that failed to start: `new` stays in force
    old.ended("stays", failed=True)
    assert new.state("stays") == OPEN
    newer = Breakers(spec, ["kept"], None, previous=new)
    newer.start()
    asyncio.run(new.aclose())  # retired: `newer` is in force, found through `new`
    old.ended("later", failed=True)
    assert new.state("later") == CLOSED


END_OUTCOMES: list[tuple[StreamEnd, str | None]] = [
    (StreamEnd("done"), "ok"),
    (StreamEnd("error", UpstreamError("upstream `a` connection failed (mid-stream)")), "server_error"),
    (StreamEnd("error", UpstreamTimeout("upstream `a` timed out (mid-stream)")), "timeout"),
    (StreamEnd("error", UpstreamOverloaded("upstream `a` is overloaded")), "server_error"),
    (StreamEnd("error", RateLimited("upstream `a` is rate limited")), "rate_limit"),
    (StreamEnd("error", DeadlineExceeded("the alias's deadline")), None),
    (StreamEnd("error", BudgetExceeded("the budget ran out during the answer")), None),
    (StreamEnd("error", ContentPolicyViolation("a guard blocked the answer")), None),
    (StreamEnd("error", InternalError("the gateway failed while streaming the answer")), None),
    (StreamEnd("shutdown", ShuttingDown("cut at the drain deadline")), None),
    (StreamEnd("client_gone"), None),
]


@pytest.mark.parametrize(("end", "outcome"), END_OUTCOMES)
def test_only_the_upstreams_failure_is_the_attempts(end: StreamEnd, outcome: str | None) -> None:
    assert stream_outcome(end) == outcome
