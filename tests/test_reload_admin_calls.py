"""Calls that are not proxied but use the store (`POST /admin/keys`, `/v1/feedback`, `/admin/usage`, `/v1/models`
with a key created at run time) finish on the runtime they started with when a reload swaps it mid-call.

The old runtime's store (its own Redis client) is closed when the runtime retires; retiring waits for the calls
that hold it. A call that did not hold it met a closed store and answered 503 `key_store_unavailable` (or worse)
while Redis was fine. Here a proxy in front of the real Redis holds the reply to the call's store command until
the reload has swapped the runtime and its retirement has either closed it or is waiting for the call: the window
made as wide as needed, with no timing.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from gateway.auth.keys import digest_of
from gateway.runtime import Runtime
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.delay_proxy import DelayProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

ADMIN_TOKEN = "admin-token-for-reload-call-tests-0123"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WAIT_S = 15.0  # the bound on every wait below: a broken gateway fails the test, it never hangs it


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def proxy(redis_url: str) -> Iterator[DelayProxy]:
    with DelayProxy(urlsplit(redis_url).port or 6379) as running:
        yield running


@pytest.fixture
def served(upstream: MockUpstream, proxy: DelayProxy, redis_url: str, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[RunningGateway, str]]:
    """A gateway on Redis (through the proxy) with run-time keys and feedback on; its key prefix."""
    prefix = f"gw-test-reload-calls-{uuid.uuid4().hex[:8]}:"
    db = urlsplit(redis_url).path.lstrip("/") or "0"
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN, "GW_TEST_REDIS": proxy.url(int(db))}
    for name, value in env.items():  # a reload re-reads the file with the process's environment
        monkeypatch.setenv(name, value)
    text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", watch_policy="false",
                        access_log="false")
            + f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 20}}\n'
            + "dynamic_keys: {enabled: true}\n"
            + "telemetry: {feedback: {enabled: true}}\n")
    running = RunningGateway(text, env, source=tmp_path / "gateway.yaml").start()
    try:
        yield running, prefix
    finally:
        running.stop()
        client = redis.Redis.from_url(redis_url)
        stale = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            client.delete(*stale)
        client.close()


def on_loop(running: RunningGateway, work: Callable[[], Any]) -> Any:
    """`work()` run on the gateway's event loop (its state is read there, between two of its steps)."""
    loop = running.gateway.loop
    assert loop is not None

    async def call() -> Any:
        return work()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(WAIT_S)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def reload_while_held(running: RunningGateway, proxy: DelayProxy, call: Callable[[], httpx.Response]) -> httpx.Response:
    """Run `call` with its store reply held; reload; let the old runtime's retirement go as far as it goes (closed,
    or waiting for the call); then release the reply. The call's answer."""
    gateway = running.gateway
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(call()), daemon=True)
    thread.start()
    assert proxy.held.wait(WAIT_S), "the call never sent the store command to hold"
    old: Runtime = gateway.runtime
    source = gateway.source
    assert source is not None and gateway.loop is not None
    source.write_text(source.read_text() + f"# reloaded {uuid.uuid4().hex}\n")
    result = asyncio.run_coroutine_threadsafe(gateway.reload("test"), gateway.loop).result(WAIT_S)
    assert result["result"] == "ok", result
    # Retiring with nothing holding it, it closes at once (and leaves `_retiring`); held, it waits for the call.
    wait_for(lambda: on_loop(running, lambda: old not in gateway._retiring or old.active > 0), "the retirement")
    proxy.release()
    thread.join(WAIT_S)
    assert answer, "the call did not end"
    wait_for(lambda: on_loop(running, lambda: old not in gateway._retiring), "the old runtime to close after the call")
    return answer[0]


def create_key(running: RunningGateway, name: str) -> httpx.Response:
    return httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", "name": name}, timeout=30)


def test_a_key_created_across_a_reload_is_created_once_and_shown(served: tuple[RunningGateway, str],
                                                                 proxy: DelayProxy) -> None:
    running, _ = served
    proxy.hold(b"keys:rec:")  # the record's write, the creation's first store command
    answer = reload_while_held(running, proxy, lambda: create_key(running, "across-a-reload"))
    assert answer.status_code == 201, answer.text
    made = answer.json()
    listed = httpx.get(running.url + "/admin/keys", headers=ADMIN, timeout=10).json()["data"]
    assert [(k["id"], k["name"]) for k in listed] == [(made["id"], "across-a-reload")]
    models = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {made['key']}"}, timeout=10)
    assert models.status_code == 200, models.text  # the secret it gave opens the key


def test_models_listed_for_a_run_time_key_across_a_reload(served: tuple[RunningGateway, str],
                                                          proxy: DelayProxy) -> None:
    running, _ = served
    made = create_key(running, "lists-models")
    assert made.status_code == 201, made.text
    secret = made.json()["key"]
    proxy.hold(b"keys:dig:" + digest_of(secret).hex().encode())  # its first look-up
    answer = reload_while_held(running, proxy, lambda: httpx.get(
        running.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}, timeout=30))
    assert answer.status_code == 200, answer.text
    assert {m["id"] for m in answer.json()["data"]} >= {"chat", "embed"}


def test_feedback_taken_across_a_reload(served: tuple[RunningGateway, str], redis_url: str,
                                        proxy: DelayProxy) -> None:
    running, prefix = served
    chat = httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "hello"}]}, timeout=30)
    assert chat.status_code == 200, chat.text
    request_id = chat.headers["x-request-id"]
    record = f"fb:4:acme:{request_id}"
    client = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: client.exists(prefix + record) == 1, "the answer's feedback record")
    finally:
        client.close()
    proxy.hold(record.encode())
    answer = reload_while_held(running, proxy, lambda: httpx.post(
        running.base_url + "/feedback", headers={"Authorization": f"Bearer {FULL_KEY}"},
        json={"request_id": request_id, "score": 1}, timeout=30))
    assert answer.status_code == 200, answer.text
    assert answer.json()["request_id"] == request_id and answer.json()["score"] == 1


def test_usage_read_across_a_reload(served: tuple[RunningGateway, str], proxy: DelayProxy) -> None:
    running, _ = served
    alias = f"nobody-{uuid.uuid4().hex[:8]}"
    proxy.hold(f"acct:usage:model:{alias}:".encode())
    answer = reload_while_held(running, proxy, lambda: httpx.get(
        running.url + "/admin/usage", headers=ADMIN, params={"scope": "model", "name": alias}, timeout=30))
    assert answer.status_code == 200, answer.text
    assert [row["name"] for row in answer.json()["usage"]] == [alias]
