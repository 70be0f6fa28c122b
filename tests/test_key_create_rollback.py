"""A key creation (or rotation) whose store writes fail half-way leaves nothing behind that holds a name, counts under
`max_keys` or needs a secret nobody was given.

Real Redis behind a proxy that lets one chosen command run and loses its reply (the connection cut, as a network
fault would), and, for the last test, then looks gone until told otherwise. What is left is read straight from Redis.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests.conftest import UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.delay_proxy import DelayProxy
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

ADMIN_TOKEN = "admin-token-for-rollback-tests-012345"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
WAIT_S = 15.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[DelayProxy]:
    with DelayProxy(urlsplit(redis_url).port or 6379) as running:
        yield running


@pytest.fixture
def served(upstream: MockUpstream, proxy: DelayProxy, redis_url: str,
           redis_client: redis.Redis) -> Iterator[tuple[RunningGateway, str]]:
    """A gateway on Redis through the proxy, with run-time keys on (at most 2); its key prefix."""
    prefix = f"gw-test-create-rollback-{uuid.uuid4().hex[:8]}:"
    db = int(urlsplit(redis_url).path.lstrip("/") or "0")
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_ADMIN_TOKEN": ADMIN_TOKEN, "GW_TEST_REDIS": proxy.url(db)}
    text = (policy_text(upstream.base_url, admin_token_env="GW_ADMIN_TOKEN", access_log="false")
            + f'state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 2}}\n'
            + "dynamic_keys: {enabled: true, max_keys: 2}\n")
    running = RunningGateway(text, env).start()
    try:
        yield running, prefix
    finally:
        running.stop()
        stale = list(redis_client.scan_iter(match=f"{prefix}*", count=1000))
        if stale:
            redis_client.delete(*stale)


def create(running: RunningGateway, name: str) -> httpx.Response:
    return httpx.post(running.url + "/admin/keys", headers=ADMIN, json={"tenant": "acme", "name": name}, timeout=30)


def stored(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """What the key registry holds in Redis: record ids, digest pointers' ids, the index."""
    def ids(kind: str) -> set[str]:
        return {key.decode().rsplit(":", 1)[1] for key in client.scan_iter(match=f"{prefix}keys:{kind}:*")}

    index = client.get(f"{prefix}keys:index")
    values = [client.get(key) for key in client.scan_iter(match=f"{prefix}keys:dig:*")]
    pointers = {value.decode() for value in values if isinstance(value, bytes)}
    return {"records": ids("rec"), "pointers": pointers, "index": json.loads(index or b"{}")}


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def store_healthy(running: RunningGateway) -> bool:
    return bool(httpx.get(running.url + "/readyz", timeout=10).json()["store"]["healthy"])


# The creation's three writes, each cut after Redis ran it: the record (the script's call on its key), the digest
# pointer (a SET), the index claim (the script's call on the index: the index's GET comes first, and passes).
WRITES = {
    "record": (b"EVALSHA", b"keys:rec:"),
    "digest pointer": (b"SET", b"keys:dig:"),
    "index claim": (b"EVALSHA", b"keys:index"),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_creation_cut_at_any_write_leaves_nothing_and_frees_its_name(
    served: tuple[RunningGateway, str], proxy: DelayProxy, redis_client: redis.Redis, write: str,
) -> None:
    running, prefix = served
    first = create(running, "first")  # (also loads the scripts into Redis: the cut command really runs)
    assert first.status_code == 201, first.text
    before = stored(redis_client, prefix)
    assert before["records"] == before["pointers"] == set(before["index"]) == {first.json()["id"]}

    proxy.cut(*WRITES[write])
    failed = create(running, "second")
    assert proxy.cuts == 1
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "key_store_unavailable"
    assert "key" not in failed.json()
    assert stored(redis_client, prefix) == before  # no record, no pointer, no index entry

    wait_for(lambda: store_healthy(running), "the store to be healthy")
    again = create(running, "second")  # the name is free, and no place under max_keys (2) is taken
    assert again.status_code == 201, again.text
    listed = httpx.get(running.url + "/admin/keys", headers=ADMIN, timeout=10).json()["data"]
    assert sorted(k["name"] for k in listed) == ["first", "second"]


def test_a_creation_whose_undo_fails_too_names_what_it_left_and_a_revocation_removes_it(
    served: tuple[RunningGateway, str], proxy: DelayProxy, redis_client: redis.Redis,
) -> None:
    running, prefix = served
    proxy.cut(*WRITES["index claim"], then_down=True)  # the claim ran; then Redis looks gone: no undo can run
    failed = create(running, "stuck")
    assert failed.status_code == 503, failed.text
    message = failed.json()["error"]["message"]
    left = stored(redis_client, prefix)
    assert len(left["records"]) == 1, left
    (key_id,) = left["records"]
    assert f"key {key_id} may be left half-created" in message and f"DELETE /admin/keys/{key_id}" in message

    proxy.up()
    wait_for(lambda: store_healthy(running), "the store to be healthy")
    revoked = httpx.delete(f"{running.url}/admin/keys/{key_id}", headers=ADMIN, timeout=10)
    assert revoked.status_code == 200, revoked.text
    assert stored(redis_client, prefix) == {"records": set(), "pointers": set(), "index": {}}
    assert create(running, "stuck").status_code == 201


def test_a_rotation_cut_at_its_record_write_keeps_the_old_secret(
    served: tuple[RunningGateway, str], proxy: DelayProxy,
) -> None:
    running, _ = served
    made = create(running, "rotated")
    assert made.status_code == 201, made.text
    key_id, secret = made.json()["id"], made.json()["key"]
    proxy.cut(b"EVALSHA", f"keys:rec:{key_id}".encode())
    failed = httpx.post(f"{running.url}/admin/keys/{key_id}/rotate", headers=ADMIN, timeout=30)
    assert failed.status_code == 503, failed.text
    assert "key" not in failed.json()

    wait_for(lambda: store_healthy(running), "the store to be healthy")
    models = httpx.get(running.base_url + "/models", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    assert models.status_code == 200, models.text  # the rotation did not happen: the secret given still opens it
    rotated = httpx.post(f"{running.url}/admin/keys/{key_id}/rotate", headers=ADMIN, timeout=30)
    assert rotated.status_code == 200, rotated.text
