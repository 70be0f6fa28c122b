"""The store's Redis client never sends a command twice: a reply lost on a dropped connection is a failure
"maybe applied" (the callers' business), not a reason to run the command again.

A proxy in front of a private Redis lets the command through and cuts the connection instead of passing its
reply on: a client that re-sent it would count a request twice, or see its own compare-and-set fail.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from gateway.auth.records import digest_key, record_key
from gateway.store import redis_scripts as lua
from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.redis_fault_proxy import FaultProxy
from tests.support.redis_server import RedisServer
from tests.test_accounting import ADMIN, KEY, MESSAGES, accounting_policy

ADMIN_TOKEN = "admin-token-for-no-resend-tests-0123456789"


@pytest.fixture
def redis_behind_proxy() -> Iterator[tuple[redis.Redis, FaultProxy]]:
    """A private Redis (a direct client to it), and the proxy the gateway is given instead."""
    with RedisServer() as server, FaultProxy(server.port) as proxy:
        client = redis.Redis(port=server.port)
        try:
            yield client, proxy
        finally:
            client.close()


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _store_healthy(running: RunningGateway) -> bool:
    return bool(httpx.get(running.url + "/readyz").json()["store"]["healthy"])


def test_a_request_whose_rpm_reply_is_lost_counts_once(
    upstream: Any, redis_behind_proxy: tuple[redis.Redis, FaultProxy]
) -> None:
    client, proxy = redis_behind_proxy
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    state = f'state: {{backend: redis, url_env: GW_PRIVATE_REDIS, key_prefix: "{prefix}", op_timeout_s: 1}}'
    text = accounting_policy(upstream, key="limits: {rpm: 3}", state=state)
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": proxy.url, "ACCT_ADMIN": ADMIN}
    running = RunningGateway(text, env).start()

    def send() -> int:
        return httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "chat", "messages": MESSAGES, "max_tokens": 20}, timeout=20).status_code

    def counted() -> float:
        return int(client.get(prefix + "acct:rpm:key:main") or 0) / 1_000_000

    try:
        assert send() == 200  # the scripts are loaded: the next one goes as EVALSHA
        proxy.arm(lua.RESERVE_WINDOW)  # the next request's rpm reservation runs, and its reply is lost
        assert send() == 200  # on_unavailable: open
        assert proxy.cuts == 1
        assert counted() == 2  # a re-sent reservation would count it twice
        assert _eventually(lambda: _store_healthy(running))  # the store is back
        assert send() == 200  # the third request of three a minute is served
        assert counted() == 3
    finally:
        running.stop()


def test_a_rotation_whose_compare_and_set_reply_is_lost_is_not_a_conflict(
    upstream: Any, redis_behind_proxy: tuple[redis.Redis, FaultProxy]
) -> None:
    """A re-sent compare-and-set fails against its own write: a false 409 that also deleted the new secret's
    pointer, so the key's owner was left without a working secret. Now: 503, the rotation may have happened
    (the record names the new digest, whose pointer is in place), and a second rotation gives a new secret."""
    client, proxy = redis_behind_proxy
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN")
            + f'state: {{backend: redis, url_env: GW_PRIVATE_REDIS, key_prefix: "{prefix}", op_timeout_s: 1}}\n'
            + "dynamic_keys: {enabled: true}\n")
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": proxy.url, "GW_ADMIN_TOKEN": ADMIN_TOKEN}
    running = RunningGateway(text, env).start()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def chat(secret: str) -> int:
        return httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "chat", "messages": MESSAGES}, timeout=10).status_code

    try:
        made = httpx.post(running.url + "/admin/keys", headers=admin, json={"tenant": "acme", "name": "k1"},
                          timeout=10)
        assert made.status_code == 201, made.text
        key_id = made.json()["id"]
        assert chat(made.json()["key"]) == 200
        proxy.arm(lua.COMPARE_AND_SET)  # the rotation's swap of the record runs; its reply is lost
        rotated = httpx.post(f"{running.url}/admin/keys/{key_id}/rotate", headers=admin, json={}, timeout=10)
        assert proxy.cuts == 1
        assert rotated.status_code == 503, rotated.text
        assert rotated.json()["error"]["code"] == "key_store_unavailable"
        record = json.loads(client.get(prefix + record_key(key_id)) or b"{}")
        assert client.get(prefix + digest_key(record["digest"])) == key_id.encode()  # the new pointer is kept
        assert _eventually(lambda: _store_healthy(running))  # the store is back
        answer = httpx.post(f"{running.url}/admin/keys/{key_id}/rotate", headers=admin, json={}, timeout=10)
        assert answer.status_code == 200, answer.text
        assert chat(answer.json()["key"]) == 200
    finally:
        running.stop()

