"""The first store commands of a runtime do not pay for opening its Redis connections: after a reload, or at start.

A reload builds and starts a new runtime, with its own Redis client, before swapping it in. Its store's start
opened one connection (its PING), which the runtime's subscriptions (here, the revocations of run-time keys) take
for their own: the first requests after the swap opened theirs, and paid connection setup (TCP, the handshake's
CLIENT SETINFO and SELECT, then the command: several round trips) inside `op_timeout_s`; on a high-latency link
that overran it and answered 503 while Redis was healthy. The store's `start()` now opens `WARM_CONNECTIONS`,
under its own bound. Here a proxy delays every Redis reply by `DELAY_S`, which makes one round trip fit
`op_timeout_s` and a new connection's setup not (the store's Lua scripts are loaded into Redis beforehand, so
that only connecting is measured). Before the change, the reload's first request and the first start's key
creation each answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from gateway.store import redis_scripts as lua
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.latency_proxy import LatencyProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

ADMIN_TOKEN = "admin-token-for-warm-start-tests-01234"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DELAY_S = 0.08  # per reply: one round trip fits `OP_TIMEOUT_S`, a connection's setup (three or more) does not
OP_TIMEOUT_S = 0.25
WAIT_S = 15.0
SCRIPTS = [text for name, text in vars(lua).items()
           if name.isupper() and not name.startswith("_") and isinstance(text, str) and "redis." in text]


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def proxy(redis_url: str) -> Iterator[LatencyProxy]:
    """Redis through a link whose latency a test sets (`delay_s`, read per reply); fast at first."""
    with LatencyProxy(urlsplit(redis_url).port or 6379, 0.0) as running:
        yield running


@contextlib.contextmanager
def serving(upstream: MockUpstream, redis_url: str, proxy: LatencyProxy, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningGateway]:
    """A gateway on Redis through `proxy`, with keys created at run time, reloadable from its file."""
    prefix = f"gw-test-warm-{uuid.uuid4().hex[:8]}:"
    db = int(urlsplit(redis_url).path.lstrip("/") or "0")
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN, "GW_TEST_REDIS": proxy.url(db)}
    for name, value in env.items():  # a reload re-reads the file with the process's environment
        monkeypatch.setenv(name, value)
    text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", watch_policy="false", access_log="false")
            + f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", '
              f'op_timeout_s: {OP_TIMEOUT_S}}}\n'
            + "dynamic_keys: {enabled: true}\n")
    client = redis.Redis.from_url(redis_url)
    try:  # the scripts in Redis beforehand: a first EVALSHA of one it lacks takes two more round trips
        for script in SCRIPTS:
            client.script_load(script)
    finally:
        client.close()
    running = RunningGateway(text, env, source=tmp_path / "gateway.yaml").start()
    try:
        yield running
    finally:
        running.stop()
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()


def reload(running: RunningGateway) -> None:
    gateway = running.gateway
    source = gateway.source
    assert source is not None and gateway.loop is not None
    source.write_text(source.read_text() + f"# reloaded {uuid.uuid4().hex}\n")
    result = asyncio.run_coroutine_threadsafe(gateway.reload("test"), gateway.loop).result(WAIT_S)
    assert result["result"] == "ok", result


def create_key(running: RunningGateway, name: str) -> httpx.Response:
    return httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", "name": name}, timeout=30)


def test_a_run_time_key_works_on_the_first_request_after_a_reload(
        upstream: MockUpstream, redis_url: str, proxy: LatencyProxy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    with serving(upstream, redis_url, proxy, tmp_path, monkeypatch) as running:
        made = create_key(running, "warm-reload")  # on a fast link: the first runtime's connections do not matter
        assert made.status_code == 201, made.text
        secret = made.json()["key"]
        proxy.delay_s = DELAY_S
        reload(running)
        answer = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30)
        assert answer.status_code == 200, answer.text  # the key's look-up: the new runtime's first store command


def test_a_key_is_created_on_the_first_request_after_the_start(
        upstream: MockUpstream, redis_url: str, proxy: LatencyProxy, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    proxy.delay_s = DELAY_S  # slow from the start
    with serving(upstream, redis_url, proxy, tmp_path, monkeypatch) as running:
        made = create_key(running, "warm-start")
        assert made.status_code == 201, made.text
        answer = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {made.json()['key']}"},
                           timeout=30)
        assert answer.status_code == 200, answer.text
