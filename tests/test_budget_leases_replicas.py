"""A replica killed with a request in flight does not hold its budget for the rest of the period: its reservation's
lease (`accounting.lease_s`) runs out and the next replica's reservation against the counter gives it back.

One `gateway serve` on Redis holds a reservation for a request its slow upstream has not answered yet; its whole
process group is SIGKILLed (no drain, no settle); a second gateway on the same key prefix then admits a request
that would not fit beside the dead reservation, once Redis's clock passed the lease.
"""

from __future__ import annotations

import signal
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import redis

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url
from tests.test_serve import serving

KEY = "gw-lease-test-key-000000000000000000000"
RESERVED = 0.6  # `max_tokens: 600` at $1000 per million output tokens (input is free)
BUDGET = 1.0  # one reservation fits, two do not


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with suite_redis_url() as url:
        yield url


def _policy(upstream: MockUpstream, prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        state: {{backend: redis, url_env: GW_TEST_REDIS, key_prefix: "{prefix}", op_timeout_s: 5.0}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: {BUDGET}, period: day}}}}
        accounting: {{lease_s: 1}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: 1000}}
          fault-slow-first-byte-120000: {{input_per_mtok: 0, output_per_mtok: 1000}}
        models:
          chat: {{provider: mock, model: mock-model}}
          slow: {{provider: mock, model: fault-slow-first-byte-120000}}
        """)


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _ask(port: int, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 600}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def _held(port: int, outcome: list[object]) -> None:
    """The request in flight when its gateway is killed: its outcome (the connection's loss, expected)."""
    try:
        outcome.append(_ask(port, "slow"))
    except httpx.HTTPError as exc:
        outcome.append(exc)


def test_a_killed_replicas_reservation_is_given_back_after_its_lease(
    tmp_path: Path, redis_url: str, upstream: MockUpstream,
) -> None:
    prefix = f"gwtest:{uuid.uuid4().hex}:"
    policy = tmp_path / "policy.yaml"
    policy.write_text(_policy(upstream, prefix))
    env = {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_TEST_REDIS": redis_url}
    counter = f"{prefix}acct:budget:key:main:{datetime.now(UTC).strftime('d%Y%m%d')}"
    client = redis.Redis.from_url(redis_url)

    def redis_ms() -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    held: list[object] = []
    command = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port"]
    try:
        first = free_port()
        with serving([*command, str(first)], first, env=env) as dying:
            in_flight = threading.Thread(target=_held, args=(first, held), daemon=True)
            in_flight.start()
            _wait(lambda: client.get(counter) == str(int(RESERVED * 1_000_000)).encode(),
                  "the slow request's reservation never reached Redis")
            lease_over = redis_ms() + 1_000  # (made before this: its lease, `lease_s: 1`, ends by then)
            assert dying.signal_group(signal.SIGKILL)
            _wait(lambda: not dying.members(), "the killed gateway's processes outlived SIGKILL")
            in_flight.join(30)
            assert not in_flight.is_alive() and isinstance(held[0], httpx.TransportError), (held, dying.text()[-4000:])
        assert client.get(counter) == str(int(RESERVED * 1_000_000)).encode()  # nobody settled it

        second = free_port()
        with serving([*command, str(second)], second, env=env) as replica:
            _wait(lambda: redis_ms() > lease_over, "Redis's clock did not pass the lease")
            answer = _ask(second, "chat")  # 0.6 more: fits only once the dead reservation is given back
            assert answer.status_code == 200, (answer.text, client.get(counter), replica.text()[-4000:])
            cost = float(answer.headers["x-gateway-cost-usd"])
            _wait(lambda: client.get(counter) == str(round(cost * 1_000_000)).encode(),
                  f"the counter holds {client.get(counter)!r}, not the one answer's cost {cost}")
    finally:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
        client.close()
