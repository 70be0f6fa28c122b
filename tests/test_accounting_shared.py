"""Limits and budgets shared through a real Redis: two `gateway serve` processes enforce one limit and one
budget exactly; a Redis that stops and comes back is handled as `on_unavailable` says, and spend made while
it was away is added to it afterwards. Every run uses its own key prefix."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer, suite_redis_url
from tests.test_accounting import ADMIN, KEY, MESSAGES, OTHER, accounting_policy
from tests.test_serve import serving

REQUESTS = 50
RPM = 20
COST = 0.02  # one answer: 20 output tokens at $1000 per million; `max_tokens: 20` reserves exactly this
BUDGET_FITS = 13


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def _state(url_env: str, prefix: str, on_unavailable: str = "open", op_timeout_s: float = 0.2) -> str:
    return (f'state: {{backend: redis, url_env: {url_env}, key_prefix: "{prefix}", op_timeout_s: {op_timeout_s}, '
            f"on_unavailable: {on_unavailable}}}")


async def _burst(urls: list[str], key: str) -> list[httpx.Response]:
    """REQUESTS at once, alternating between the replicas."""
    body = {"model": "chat", "messages": MESSAGES, "max_tokens": 20}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=REQUESTS)) as http:
        return list(await asyncio.gather(*(
            http.post(urls[i % len(urls)], json=body, headers={"Authorization": f"Bearer {key}"})
            for i in range(REQUESTS))))


def _usage(base: str, name: str) -> dict[str, float]:
    response = httpx.get(base + "/admin/usage", params={"scope": "key", "name": name},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json()["usage"][0])


def test_two_replicas_enforce_one_rpm_limit_and_one_budget_exactly(
    tmp_path: Path, redis_url: str, upstream: MockUpstream,
) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    state = _state("GW_TEST_REDIS", prefix, "closed", 5.0)  # generous: a loaded machine must not time out
    text = accounting_policy(upstream, key=f"limits: {{rpm: {RPM}}}", state=state)
    budget = f"\n    budget: {{usd: {COST * BUDGET_FITS}}}"
    text = text.replace(f'hash: "{hash_key(OTHER)}"', f'hash: "{hash_key(OTHER)}"{budget}')
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url, "ACCT_ADMIN": ADMIN}
    ports = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port"]
    with serving([*command, str(ports[0])], ports[0], env=env), serving([*command, str(ports[1])], ports[1], env=env):
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        urls = [base + "/v1/chat/completions" for base in bases]

        limited = asyncio.run(_burst(urls, KEY))
        statuses = sorted(r.status_code for r in limited)
        assert statuses == [200] * RPM + [429] * (REQUESTS - RPM)  # one limit across both, exact
        refused = [r for r in limited if r.status_code == 429]
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)

        budgeted = asyncio.run(_burst(urls, OTHER))
        served = [r for r in budgeted if r.status_code == 200]
        assert len(served) == BUDGET_FITS  # no overspend, and no false refusal: exactly what fits
        assert all(r.json()["error"]["code"] == "budget_exceeded" for r in budgeted if r.status_code != 200)
        assert sum(float(r.headers["x-gateway-cost-usd"]) for r in served) == pytest.approx(COST * BUDGET_FITS)

        deadline = time.monotonic() + 10  # each replica adds its usage to Redis once a second
        while True:
            usage = _usage(bases[0], "second")
            if usage["requests"] == BUDGET_FITS or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert usage["requests"] == BUDGET_FITS
        assert usage["cost_usd"] == pytest.approx(COST * BUDGET_FITS)
        assert _usage(bases[1], "second") == usage  # both replicas read the same figures


def _budget_counter(client: redis.Redis, prefix: str) -> float:
    day = datetime.now(UTC).strftime("d%Y%m%d")
    raw = client.get(f"{prefix}acct:budget:key:main:{day}")
    return int(raw) / 1_000_000 if raw is not None else 0.0


@pytest.mark.parametrize("on_unavailable", ["open", "closed"])
def test_redis_stopped_and_restarted_follows_on_unavailable(upstream: MockUpstream, on_unavailable: str) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    with RedisServer() as server:
        text = accounting_policy(upstream, key="budget: {usd: 1, period: day}", state=_state("GW_PRIVATE_REDIS", prefix,
                                                                                 on_unavailable))
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": server.url, "ACCT_ADMIN": ADMIN}
        gateway = RunningGateway(text, env).start()
        try:
            api = gateway.base_url + "/chat/completions"
            body = {"model": "chat", "messages": MESSAGES, "max_tokens": 20}
            auth = {"Authorization": f"Bearer {KEY}"}
            assert httpx.post(api, json=body, headers=auth, timeout=20).status_code == 200
            client = redis.Redis.from_url(server.url)
            _wait(lambda: _budget_counter(client, prefix) == pytest.approx(COST))
            assert _budget_counter(client, prefix) == pytest.approx(COST)
            client.close()

            server.stop()
            while_down = [httpx.post(api, json=body, headers=auth, timeout=20) for _ in range(3)]
            if on_unavailable == "open":
                assert [r.status_code for r in while_down] == [200] * 3  # served, spend kept locally
            else:
                assert [r.status_code for r in while_down] == [503] * 3
                error = while_down[0].json()["error"]
                assert error["code"] == "limits_unavailable" and while_down[0].headers["retry-after"] == "1"
            assert "gateway_accounting_store_errors_total" in gateway.metrics()
            report = httpx.get(gateway.url + "/admin/usage", headers={"Authorization": f"Bearer {ADMIN}"})
            assert report.status_code == 503 and report.json()["error"]["code"] == "store_unavailable"

            server.start()  # same port, empty data: only what was spent while it was away can be there
            client = redis.Redis.from_url(server.url)
            expected = 3 * COST if on_unavailable == "open" else 0.0
            _wait(lambda: gateway.gateway.runtime.store.healthy)
            _wait(lambda: _budget_counter(client, prefix) == pytest.approx(expected))  # reconciled, not lost
            assert _budget_counter(client, prefix) == pytest.approx(expected)
            assert httpx.post(api, json=body, headers=auth, timeout=20).status_code == 200  # recovered
            _wait(lambda: _budget_counter(client, prefix) == pytest.approx(expected + COST))
            assert _budget_counter(client, prefix) == pytest.approx(expected + COST)
            client.close()
        finally:
            gateway.stop()


def test_a_slot_whose_release_a_redis_stall_missed_is_given_back_when_redis_answers(upstream: MockUpstream) -> None:
    """A request ends while Redis stalls (paused, its data kept): its concurrency slot's release times out. The
    ledger gives it back once Redis answers; it used to stay held for the slot's lease (15 minutes of 429s)."""
    import threading

    prefix = f"gwtest:{uuid.uuid4().hex}:"
    with RedisServer() as server:
        text = accounting_policy(upstream, key="limits: {concurrent: 1}",
                                 state=_state("GW_PRIVATE_REDIS", prefix, "open"))
        env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": server.url, "ACCT_ADMIN": ADMIN}
        gateway = RunningGateway(text, env).start()
        try:
            api, auth = gateway.base_url + "/chat/completions", {"Authorization": f"Bearer {KEY}"}
            body = {"model": "chat", "messages": MESSAGES, "max_tokens": 20}
            assert httpx.post(api, json=body, headers=auth, timeout=20).status_code == 200
            slow: list[int] = []

            def stream_slowly() -> None:  # ~1 s of chunks, holding the key's one slot
                with httpx.stream("POST", api, headers=auth, timeout=30, json={
                        "model": "slow", "messages": MESSAGES, "max_tokens": 20, "stream": True}) as response:
                    slow.append(response.status_code)
                    for _ in response.iter_bytes():
                        pass

            streaming = threading.Thread(target=stream_slowly)
            streaming.start()
            time.sleep(0.4)
            server.pause()  # the stream ends in the stall: its release times out
            streaming.join(30)
            time.sleep(0.5)
            server.resume()
            assert slow == [200]
            _wait(lambda: gateway.gateway.runtime.store.healthy)
            assert gateway.gateway.runtime.store.healthy
            statuses: list[int] = []
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline and statuses[-1:] != [200]:
                statuses.append(httpx.post(api, json=body, headers=auth, timeout=20).status_code)
                time.sleep(0.2)
            assert statuses[-1] == 200, statuses  # the slot is free again, not held for its 15-minute lease
        finally:
            gateway.stop()


def _wait(condition: Callable[[], object], timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_upstream_usage_on_redis_settles_and_releases(
    redis_url: str, upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch, stream: bool,
) -> None:
    """On Redis too (settled in a task beside the reply), negative usage is no 500 and leaks nothing: the
    budget counter holds the estimate's cost, and the slot is free for the next request."""
    from tests.test_accounting import _bad_usage

    _bad_usage(monkeypatch, completion_tokens=-100_000)
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    limits = "limits: {concurrent: 1, tpm: 100000}\n" + " " * 12 + "budget: {usd: 10, period: day}"
    text = accounting_policy(upstream, key=limits, state=_state("GW_TEST_REDIS", prefix, "closed", 5.0))
    gateway = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url,
                                    "ACCT_ADMIN": ADMIN}).start()
    client = redis.Redis.from_url(redis_url)
    try:
        body = {"model": "chat", "messages": MESSAGES, "stream": stream}
        auth = {"Authorization": f"Bearer {KEY}"}

        def ask() -> httpx.Response:
            """One request; a 429 is asked again for a moment (a complete answer's slot is given back in a task
            beside the reply), well within the slot's lease (`lease_s`: 900 s) that a leak would last."""
            deadline = time.monotonic() + 3
            while True:
                response = httpx.post(gateway.base_url + "/chat/completions", json=body, headers=auth, timeout=20)
                if response.status_code != 429 or time.monotonic() > deadline:
                    return response
                time.sleep(0.05)

        for _ in range(3):
            response = ask()
            assert response.status_code == 200, response.text
        # settled to the gateway's own count (about 20 completion tokens: $0.02 each), not to 4096 tokens
        _wait(lambda: 0 < _budget_counter(client, prefix) <= 3 * 0.03)
        assert 0 < _budget_counter(client, prefix) <= 3 * 0.03
        followed = ask()
        assert followed.status_code == 200, followed.text  # not refused for concurrency
    finally:
        client.close()
        gateway.stop()
