"""A test session leaves no keys in the suite's Redis (`GATEWAY_TEST_REDIS_URL`; in CI, database 0 of the machine's).

A test deletes its key prefix's keys as it ends, but a gateway still running then writes more: its ledger flushes
the usage counters as it stops, so a test that deleted before it stopped its gateway left them
(`gwtest-gauges:<hex>:acct:usage:...`, run after run). tests/conftest.py sweeps the tests' prefixes once the
session has stopped everything (`sweep_test_keys`), and touches nothing else.

Real Redis servers of their own (`RedisServer`), and a real gateway in a child pytest session that uses the suite's
conftest hooks."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.redis_server import RedisServer, sweep_test_keys

REPO = Path(__file__).resolve().parents[1]

CHILD_CONFTEST = "from tests.conftest import *  # noqa: F403 -- the suite's fixtures and session hooks\n"
CHILD_TEST = '''\
import os
import uuid

import httpx
import redis

from tests.conftest import RunningGateway

POLICY = """\\
version: 1
auth: none
state: {{backend: redis, url_env: SWEEP_REDIS, key_prefix: "{prefix}", op_timeout_s: 5}}
providers:
  d: {{kind: demo}}
prices: {{demo-1: {{input_per_mtok: 1, output_per_mtok: 1}}}}
models:
  chat: {{provider: d, model: demo-1, budget: {{usd: 5, period: day}}}}
"""


def test_a_late_cleanup() -> None:
    url = os.environ["GATEWAY_TEST_REDIS_URL"]
    prefix = f"gwtest:sweep-child:{uuid.uuid4().hex}:"
    running = RunningGateway(POLICY.format(prefix=prefix), {"SWEEP_REDIS": url}).start()
    store = redis.Redis.from_url(url)
    try:
        answer = httpx.post(running.base_url + "/chat/completions", timeout=30,
                            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})
        assert answer.status_code == 200, answer.text
    finally:
        store.delete(*store.keys(prefix + "*") or [prefix])  # before the stop: its ledger's last flush comes after
        running.stop()
    store.set(prefix + "late", "1")  # and a writer after it, for certain
    store.set(f"other-app:{uuid.uuid4().hex}", "1")  # not a test's: kept
    store.close()
    with open("prefix.txt", "w") as file:
        file.write(prefix)
'''


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    store = redis.Redis.from_url(private_redis.url)
    store.flushdb()  # (a server of this module's own)
    yield store
    store.flushdb()
    store.close()


def _keys(store: redis.Redis) -> set[str]:
    return {key.decode() for key in store.scan_iter(count=1000)}


def test_the_sweep_deletes_the_tests_keys_and_nothing_else(private_redis: RedisServer, client: redis.Redis) -> None:
    token, short = uuid.uuid4().hex, uuid.uuid4().hex[:12]
    tests_keys = {f"gwtest:{token}:acct:usage:key:k:20260101:requests", f"gwtest-gauges:{token}:x",
                  f"gwtest-reload:{token}:y", f"{{gwtest{token}}}:z", f"gw-test-warm-{token[:8]}:w", f"b13:{short}:q"}
    others = {f"gw:{token}:acct:usage:key:k:20260101:requests", "b13:not-a-burst:q", "app:gwtest", "sessions:1"}
    for key in tests_keys | others:
        client.set(key, "1")
    assert set(sweep_test_keys(private_redis.url)) == tests_keys
    assert _keys(client) == others
    assert sweep_test_keys(private_redis.url) == []


def test_a_session_whose_gateway_writes_after_the_cleanup_leaves_no_keys(
    private_redis: RedisServer, client: redis.Redis, tmp_path: Path,
) -> None:
    (tmp_path / "conftest.py").write_text(CHILD_CONFTEST)
    (tmp_path / "test_child.py").write_text(CHILD_TEST)
    env = {**os.environ, "PYTHONPATH": str(REPO), "GATEWAY_TEST_REDIS_URL": private_redis.url}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                          "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    prefix = (tmp_path / "prefix.txt").read_text()
    left = _keys(client)
    assert not [key for key in left if key.startswith(prefix)], left
    assert [key for key in left if key.startswith("other-app:")], left  # (only the tests' keys are swept)
    assert "keys tests left in the suite's Redis (gwtest: " in output, output
