"""A coalesced miss whose leader fails hands its key to one waiter, which leads next: not every waiter at once.

Real gateways on real ports, an upstream that counts its calls and fails (or delays) the ones a test scripts: in one
process (the memory store) and across two replicas sharing Redis (GATEWAY_TEST_REDIS_URL, or a private one). A
failure every waiter would meet alike (a 4xx the request caused) lets them all go at once, and a chain of failing
leaders never makes a wait longer than `coalesce_timeout_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from aiohttp import web

from gateway.cache.coalesce import LOCK, Flights
from gateway.store.memory import MemoryStore
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import _RECORD, MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_cache import AUTH, cache_policy

# `flaky` coalesces for the default 30 s, `brief` for 1.5 s. The breaker is off: a test's scripted failures must
# reach the upstream, not open the target.
MODELS = ("flaky: {provider: mock, model: mock-model, cache: {}}\n"
          "brief: {provider: mock, model: mock-model, cache: {coalesce_timeout_s: 1.5}}\n")
NO_BREAKER = "routing:\n  breaker: {enabled: false}\n"
COUNT = 10


class ScriptedUpstream(MockUpstream):
    """The mock upstream, each call of which waits `delay_s` and then answers as the fault the script names for
    its turn (`script[n]` for the n-th call; None, or past the script: a good answer). `started` holds when each
    call came (`time.monotonic()`, the clock of the tests' process)."""

    def __init__(self) -> None:
        super().__init__(api_key=UPSTREAM_KEY)
        self.script: list[str | None] = []
        self.delay_s = 0.0
        self.started: list[float] = []

    def _route(self, build: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handle = super()._route(build)

        async def scripted(request: web.Request) -> web.StreamResponse:
            turn = len(self.started)
            self.started.append(time.monotonic())
            fault = self.script[turn] if turn < len(self.script) else None
            await asyncio.sleep(self.delay_s)
            if fault is not None:
                record = request[_RECORD]
                request[_RECORD] = dataclasses.replace(record, json={**record.json, "model": fault})
            return await handle(request)

        return scripted


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as mock:
        yield mock


@pytest.fixture
def shared() -> Iterator[tuple[str, str]]:
    """A Redis URL and a key prefix of this test's own (its keys are deleted after)."""
    with suite_redis_url() as url:
        prefix = f"gwtest:{uuid.uuid4().hex}:"
        try:
            yield url, prefix
        finally:
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


def gateway(upstream: MockUpstream, shared: tuple[str, str] | None = None) -> RunningGateway:
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
    state = ""
    if shared is not None:
        state = f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{shared[1]}", op_timeout_s: 0.5}}\n'
        env["GW_TEST_REDIS"] = shared[0]
    return RunningGateway(cache_policy(upstream.base_url, models=MODELS, state=state, extra=NO_BREAKER), env).start()


def ask(model: str, text: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, "stream": stream}


async def post_all(urls: list[str], body: dict[str, Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*(client.post(f"{url}/chat/completions", json=body, headers=AUTH) for url in urls))


def whole(reply: httpx.Response, stream: bool) -> bool:
    """An answer the client can use: a 200, and for a stream one that ended with [DONE]."""
    return reply.status_code == 200 and (not stream or reply.text.rstrip().endswith("data: [DONE]"))


def served_after_one_failure(replies: list[httpx.Response], stream: bool) -> None:
    """One client got the failed leader's error; the next leader's answer served all the others."""
    good = [r for r in replies if whole(r, stream)]
    assert len(good) == len(replies) - 1
    assert sorted(r.headers["x-gateway-cache"] for r in good) == ["hit"] * (len(replies) - 2) + ["miss"]
    assert len({r.json()["id"] for r in good} if not stream else {r.text for r in good}) == 1


@pytest.mark.parametrize(("fault", "stream"), [("fault-status-500", False), ("fault-reset-after-3", True)],
                         ids=["upstream-500", "stream-cut"])
def test_a_failed_leader_hands_its_key_to_one_waiter(scripted: ScriptedUpstream, fault: str, stream: bool) -> None:
    """Ten identical misses at once; the leader's upstream call fails (an error status, a stream cut after three
    chunks): one waiter goes upstream next and its answer serves the eight others. Two upstream calls, not ten."""
    scripted.script, scripted.delay_s = [fault], 0.5
    gw = gateway(scripted)
    try:
        replies = asyncio.run(post_all([gw.base_url] * COUNT, ask("flaky", f"hand over {fault}", stream)))
    finally:
        gw.stop()
    assert len(scripted.started) == 2
    served_after_one_failure(replies, stream)


def test_a_leader_whose_client_leaves_hands_its_key_to_one_waiter(scripted: ScriptedUpstream) -> None:
    """The leader's client gives up while its upstream call is under way: one waiter leads next, the others wait
    for it (rather than all going upstream as the leader leaves). The upstream answers 2 s after it is called, well
    after the leader's client leaves (1 s): had the gateway seen that late, the first answer would serve all."""
    scripted.delay_s = 2.0
    gw = gateway(scripted)
    body = ask("flaky", "the leader leaves")

    async def scene() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{gw.base_url}/chat/completions"
            leader = asyncio.ensure_future(client.post(url, json=body, headers=AUTH, timeout=1.0))
            for _ in range(90):  # it leads once its upstream call began (a fixed 0.2 s lost the race on a slow VM)
                if scripted.started:
                    break
                await asyncio.sleep(0.01)
            waiters = asyncio.gather(*(client.post(url, json=body, headers=AUTH) for _ in range(COUNT - 1)))
            with pytest.raises(httpx.ReadTimeout):
                await leader
            return await waiters

    try:
        replies = asyncio.run(scene())
    finally:
        gw.stop()
    assert len(scripted.started) == 2
    assert all(r.status_code == 200 for r in replies)
    assert sorted(r.headers["x-gateway-cache"] for r in replies) == ["hit"] * (COUNT - 2) + ["miss"]


def test_a_failure_every_waiter_would_meet_lets_them_all_go_at_once(scripted: ScriptedUpstream) -> None:
    """A 4xx the request itself caused (here the upstream's 400) would fail every waiter alike, and none of it can
    be stored: they all go upstream together, each getting its own 400 in about one round trip, rather than one
    after another (ten round trips for the last, for the same ten calls)."""
    scripted.script, scripted.delay_s = ["fault-status-400"] * COUNT, 0.5
    gw = gateway(scripted)
    try:
        started = time.monotonic()
        replies = asyncio.run(post_all([gw.base_url] * COUNT, ask("flaky", "rejected alike")))
        took = time.monotonic() - started
    finally:
        gw.stop()
    assert [r.status_code for r in replies] == [400] * COUNT
    assert len(scripted.started) == COUNT
    assert took < 2.5  # one leader's round trip, then all the others' at once: about 1 s; one by one: 5 s


def test_a_chain_of_failing_leaders_never_makes_a_wait_longer_than_the_coalesce_timeout(
    scripted: ScriptedUpstream,
) -> None:
    """Every call fails after 0.6 s and the alias coalesces for 1.5 s: leaders follow one another at 0, 0.6 and
    1.2 s, and at 1.5 s the five still waiting go upstream by themselves (as any waiter whose wait ran out does).
    One by one, the last would have waited 4.8 s."""
    count = 8
    scripted.script, scripted.delay_s = ["fault-status-500"] * count, 0.6
    gw = gateway(scripted)
    try:
        started = time.monotonic()
        replies = asyncio.run(post_all([gw.base_url] * count, ask("brief", "failing again and again")))
        took = time.monotonic() - started
    finally:
        gw.stop()
    assert all(r.status_code >= 500 for r in replies)
    calls = [at - scripted.started[0] for at in scripted.started]
    assert len(calls) == count
    assert len([at for at in calls if at < 1.45]) == 3  # one leader at a time while the waits lasted
    # The rest went up together at about 1.5 s, so all was over by about 2.1 s; one by one, the last call would have
    # started at 4.2 s and ended at 4.8 s. Bounds halfway between, so that a loaded machine does not fail them.
    assert max(calls) < 3.0
    assert took < 4.0


def test_across_replicas_a_failed_leader_hands_its_key_to_one_waiter(
    scripted: ScriptedUpstream, shared: tuple[str, str],
) -> None:
    """Two replicas on one Redis, ten identical misses split between them; the leader's upstream call fails. Its
    lock goes: one waiter (on either replica) takes it and leads, every other one waits on and gets its answer."""
    scripted.script, scripted.delay_s = ["fault-status-500"], 0.5
    a, b = gateway(scripted, shared), gateway(scripted, shared)
    try:
        replies = asyncio.run(post_all([a.base_url, b.base_url] * (COUNT // 2), ask("flaky", "replicas hand over")))
    finally:
        a.stop()
        b.stop()
    assert len(scripted.started) == 2
    served_after_one_failure(replies, False)


def test_across_replicas_a_leader_whose_client_leaves_hands_its_key_to_one_waiter(
    scripted: ScriptedUpstream, shared: tuple[str, str],
) -> None:
    """Replica B leads and its client gives up; waiters on both replicas (A's poll Redis for the lock): one of them
    leads next, the rest are served its answer. (The upstream's 2 s, against the leader's client's 0.5 s: a full
    suite's run saw a single upstream call with 1 s, the first answer serving all.)"""
    scripted.delay_s = 2.0
    a, b = gateway(scripted, shared), gateway(scripted, shared)
    body = ask("flaky", "a replica's leader leaves")

    async def scene() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            leader = asyncio.ensure_future(client.post(f"{b.base_url}/chat/completions", json=body, headers=AUTH,
                                                       timeout=0.5))
            await asyncio.sleep(0.2)  # B holds the lock now
            waiters = asyncio.gather(*(client.post(f"{url}/chat/completions", json=body, headers=AUTH)
                                       for url in [a.base_url, b.base_url] * 4 + [a.base_url]))
            with pytest.raises(httpx.ReadTimeout):
                await leader
            return await waiters

    try:
        replies = asyncio.run(scene())
    finally:
        a.stop()
        b.stop()
    assert len(scripted.started) == 2
    assert all(r.status_code == 200 for r in replies)
    assert sorted(r.headers["x-gateway-cache"] for r in replies) == ["hit"] * (COUNT - 2) + ["miss"]


async def _absent() -> bool:
    return False


async def test_a_poller_whose_wait_ran_out_hands_its_place_to_a_later_waiter_of_its_replica() -> None:
    """Replica 1 leads; on replica 2 request X polls for it (0.3 s) and Y, which came 0.15 s later, waits for X.
    X's wait runs out: X goes upstream alone, Y polls on in its place; when replica 1's leader fails, Y takes the
    lock and leads. A leader that fails alike instead lets its waiters all go (None for each)."""
    store = MemoryStore()
    tasks: list[asyncio.Task[Any]] = []
    one, two = (Flights(store, True, lambda work: tasks.append(asyncio.ensure_future(work))) for _ in range(2))
    leading = await one.join("k", 30.0, _absent)
    assert leading is not None and leading.locked
    x = asyncio.ensure_future(two.join("k", 0.3, _absent))
    await asyncio.sleep(0.15)
    y = asyncio.ensure_future(two.join("k", 0.3, _absent))
    assert await asyncio.wait_for(x, 1.0) is None  # at 0.3 s: alone
    await asyncio.sleep(0.05)
    assert not y.done()  # polling on, till 0.45 s
    leading.release(hand_over=True)
    taken = await asyncio.wait_for(y, 1.0)
    assert taken is not None and taken.locked and await store.get(LOCK + "k") == taken.token

    waiters = [asyncio.ensure_future(two.join("k", 30.0, _absent)) for _ in range(3)]
    await asyncio.sleep(0.05)
    taken.release()  # e.g. a 400: every waiter would get it too
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1.0) == [None] * 3
    await asyncio.gather(*tasks)
    assert await store.get(LOCK + "k") is None and not two.local
