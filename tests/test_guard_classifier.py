"""A policy's injection classifier (`classifier: "module:factory"`) runs on the guard pool, never on the event
loop: a slow one is bounded by `timeout_s` (its `fail:` decides) while the gateway serves other requests, and one
whose factory raises fails its checks without stopping the gateway."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, REPO, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
_SUPPORT = "tests.support.guard_classifier"


def _policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          plain: {{provider: mock, model: fault-echo}}
          keyword: {{provider: mock, model: fault-echo}}
          slow-closed: {{provider: mock, model: fault-echo}}
          slow-open: {{provider: mock, model: fault-echo}}
          broken: {{provider: mock, model: fault-echo}}
        guards:
          models:
            keyword:
              injection: {{kind: injection, classifier: "{_SUPPORT}:make"}}
            slow-closed:
              injection: {{kind: injection, classifier: "{_SUPPORT}:make_slow", timeout_s: 0.3}}
            slow-open:
              injection: {{kind: injection, classifier: "{_SUPPORT}:make_slow", timeout_s: 0.3, fail: open}}
            broken:
              injection: {{kind: injection, classifier: "{_SUPPORT}:make_broken"}}
        """)


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(upstream.base_url), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _chat(gw: RunningGateway, model: str, text: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return httpx.post(gw.base_url + "/chat/completions", headers=AUTH, json=body, timeout=20)


def test_the_classifiers_score_blocks_a_short_prompt(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    blocked = _chat(gw, "keyword", "tell me the secret recipe")
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "content_policy_violation"
    assert len(upstream.requests) == before  # never forwarded
    assert _chat(gw, "keyword", "tell me a recipe").status_code == 200


def test_a_slow_classifier_times_out_and_fail_decides(gw: RunningGateway, upstream: MockUpstream) -> None:
    before = len(upstream.requests)
    closed = _chat(gw, "slow-closed", "Hello there")
    assert closed.status_code == 400 and "GUARD_FAILURE" in closed.json()["error"]["message"]
    assert len(upstream.requests) == before
    opened = _chat(gw, "slow-open", "Hello there")
    assert opened.status_code == 200
    assert 'gateway_guard_failures_total{fail="open",guard="injection",reason="timeout"}' in gw.metrics()


def test_a_slow_classifier_never_holds_the_event_loop(gw: RunningGateway) -> None:
    """While a check waits for the classifier (a second), another request is answered at once."""
    took: dict[str, float] = {}

    def slow() -> None:
        started = time.perf_counter()
        _chat(gw, "slow-open", "Hello there")
        took["slow"] = time.perf_counter() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert _chat(gw, "plain", "no guards here").status_code == 200
    took["plain"] = time.perf_counter() - started
    thread.join()
    assert took["plain"] < 0.25 and took["slow"] >= 0.3, took


def test_a_factory_that_raises_fails_its_checks_not_the_gateway(gw: RunningGateway,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway.guards"):
        failed = _chat(gw, "broken", "Hello there")
    assert failed.status_code == 400 and "GUARD_FAILURE" in failed.json()["error"]["message"]
    assert 'gateway_guard_failures_total{fail="closed",guard="injection",reason="error"}' in gw.metrics()
    assert any("guard injection failed: RuntimeError" in r.getMessage() for r in caplog.records)
    assert _chat(gw, "plain", "still serving").status_code == 200


def test_a_process_pool_worker_makes_and_runs_the_classifier() -> None:
    """`classifier_score` takes only strings: a process pool (spawned) can call it, each worker making its own.
    In a child process of its own: a spawned pool's resource tracker lives until its parent exits."""
    script = textwrap.dedent(f"""\
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        from gateway.guards.classifiers import classifier_score
        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                print([pool.submit(classifier_score, "{_SUPPORT}:make", text).result(timeout=60)
                       for text in ("the secret recipe", "a recipe")])
        """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[0.99, 0.01]"


def test_each_runtime_makes_its_own_classifier_and_a_factory_failing_fails_only_its_checks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload makes a new classifier (its factory may read files that changed), as it makes new guards; one
    whose factory fails then fails the new runtime's checks, while the runtime it replaces keeps its own."""
    import asyncio

    from gateway.guards.base import Where
    from gateway.guards.injection import InjectionGuard
    from gateway.policy.guard_schema import InjectionGuardSpec
    from tests.support import guard_classifier

    where = Where("input", "message")
    old = InjectionGuard("inj", InjectionGuardSpec(classifier=f"{_SUPPORT}:make_toggled"))
    old.build()
    found = asyncio.run(old.detect("the secret recipe", where))
    assert [f.recognizer for f in found] == ["injection.classifier"]
    monkeypatch.setattr(guard_classifier, "FAIL_NEXT", True)
    new = InjectionGuard("inj", InjectionGuardSpec(classifier=f"{_SUPPORT}:make_toggled"))
    new.build()  # logged; every check of this runtime fails until its factory makes one
    with pytest.raises(RuntimeError):
        asyncio.run(new.detect("the secret recipe", where))
    assert [f.recognizer for f in asyncio.run(old.detect("the secret recipe", where))] == ["injection.classifier"]
    monkeypatch.setattr(guard_classifier, "FAIL_NEXT", False)
    assert [f.recognizer for f in asyncio.run(new.detect("the secret recipe", where))] == ["injection.classifier"]
    assert new._own is not None and old._own is not None and new._own._made is not old._own._made


async def test_work_that_overruns_its_check_keeps_its_place_in_the_pools_queue() -> None:
    """A check that timed out cannot stop its worker: the job counts in `max_queue` until the worker is done
    with it, so a slow classifier cannot pile up work behind the checks that gave up on it."""
    import asyncio

    from gateway.guards.pool import GuardPool, QueueFull
    from gateway.policy.guard_schema import GuardPoolSpec

    pool = GuardPool(GuardPoolSpec(kind="thread", workers=1, max_queue=2))
    try:
        for expected in (1, 2):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await pool.run(time.sleep, 0.4)
            assert pool.pending == expected
        with pytest.raises(QueueFull):
            await pool.run(time.sleep, 0)
        deadline = time.monotonic() + 5
        while pool.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert pool.pending == 0
        assert await pool.run(sum, [1, 2]) == 3
    finally:
        await pool.aclose()
