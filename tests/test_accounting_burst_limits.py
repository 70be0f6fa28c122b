"""A burst admits exactly a limit or budget: a request one scope refuses holds nothing on the others.

Key `main` is over its own limit; its refused requests must not eat its tenant's room, which its sibling key
`second` (within every limit) then lacks: a tenant of rpm 15 served 12-14 of 60 requests sent at once across
two replicas (`second` told 429 while the tenant's window had room), a tenant budget of $0.30 spent at
$0.24-0.28 with `second` told it was spent. Run on the Redis store (two `gateway serve` replicas) and on the
in-process one (one replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.conftest import UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_accounting import KEY, MESSAGES, OTHER, accounting_policy
from tests.test_serve import serving

EACH = 30  # requests per key, all at once: demand far above every limit
BODY = {"model": "chat", "messages": MESSAGES, "max_tokens": 20}  # reserves exactly its cost: $0.02
TRIES = 3  # bursts per test: a burst that happens to miss the race proves nothing, one that hits it fails


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@contextlib.contextmanager
def replicas(tmp: Path, policy: str, count: int, redis_url: str) -> Iterator[list[str]]:
    path = tmp / f"policy-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(policy)
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "B13_REDIS": redis_url, "ACCT_ADMIN": "b13-admin-token-0123456789"}
    with contextlib.ExitStack() as stack:
        urls = []
        for _ in range(count):
            port = free_port()
            stack.enter_context(serving([sys.executable, "-m", "gateway", "serve", "--policy", str(path),
                                         "--port", str(port)], port, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls


def burst(urls: list[str]) -> tuple[int, int, list[str]]:
    """`EACH` requests from each key at once, alternating keys and replicas: (main's served, second's served,
    second's refusals)."""
    async def run() -> list[tuple[str, int, str]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=2 * EACH)) as http:
            async def one(i: int) -> tuple[str, int, str]:
                key = KEY if i % 2 == 0 else OTHER
                r = await http.post(urls[(i // 2) % len(urls)] + "/v1/chat/completions", json=BODY,
                                    headers={"Authorization": f"Bearer {key}"})
                return key, r.status_code, "" if r.status_code == 200 else r.text[:160]
            return await asyncio.gather(*(one(i) for i in range(2 * EACH)))

    got = asyncio.run(run())
    assert {s for _, s, _ in got} <= {200, 429}, got
    return (sum(1 for k, s, _ in got if k == KEY and s == 200), sum(1 for k, s, _ in got if k == OTHER and s == 200),
            [t for k, s, t in got if k == OTHER and s != 200])


def state(backend: str) -> str:
    if backend == "memory":
        return ""
    prefix = f"b13:{uuid.uuid4().hex[:12]}:"  # a new one per burst: each starts from empty counters
    return f'state: {{backend: redis, url_env: B13_REDIS, key_prefix: "{prefix}", op_timeout_s: 5, ' \
           'on_unavailable: closed}'


def drop(redis_url: str, policy: str) -> None:
    """Delete the burst's keys (its prefix), if it had any."""
    if "key_prefix" not in policy:
        return
    prefix = policy.split('key_prefix: "', 1)[1].split('"', 1)[0]
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.mark.parametrize(("backend", "count"), [("redis", 2), ("memory", 1)])
def test_a_key_over_its_rpm_leaves_its_tenant_every_request_of_its_limit(
        tmp_path: Path, upstream: MockUpstream, redis_url: str, backend: str, count: int) -> None:
    for _ in range(TRIES):
        policy = accounting_policy(upstream, key="limits: {rpm: 3}", tenant="limits: {rpm: 15}", state=state(backend))
        try:
            with replicas(tmp_path, policy, count, redis_url) as urls:
                main, second, refused = burst(urls)
        finally:
            drop(redis_url, policy)
        assert main <= 3
        assert main + second == 15, (main, second, refused[:1])


@pytest.mark.parametrize(("backend", "count"), [("redis", 2), ("memory", 1)])
def test_a_key_over_its_budget_leaves_its_tenant_all_of_its_budget(
        tmp_path: Path, upstream: MockUpstream, redis_url: str, backend: str, count: int) -> None:
    for _ in range(TRIES):
        policy = accounting_policy(upstream, key="budget: {usd: 0.06, period: day}",
                                   tenant="budget: {usd: 0.30, period: day}", state=state(backend))
        try:
            with replicas(tmp_path, policy, count, redis_url) as urls:
                main, second, refused = burst(urls)
        finally:
            drop(redis_url, policy)
        assert main == 3  # $0.06 / $0.02
        assert main + second == 15, (main, second, refused[:1])  # $0.30 / $0.02
