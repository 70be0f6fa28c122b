"""With `on_unavailable: closed`, a stream past its reservation whose next budget step cannot be reserved because
Redis is away is cut with the outage's own error (`limits_unavailable`) under a hard budget, and not cut at all under
a soft one (which never refuses).

It was cut with `budget_exceeded` ("the budget for this period ran out") though the budget had nearly all of its $100
left, and under a soft budget too; budget alerts fired during a Redis outage (H59).
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import RedisServer

KEY = "gw-test-closed-stream-cut-000000000000000000"


def _policy(upstream: MockUpstream, budget_mode: str) -> str:
    return f"""\
version: 1
server: {{host: 127.0.0.1}}
state:
  {{backend: redis, url_env: GW_PRIVATE_REDIS, key_prefix: "gwtest:cut:", op_timeout_s: 0.25, on_unavailable: closed}}
accounting: {{default_max_tokens: 5}}
auth: keys
keys:
  - name: main
    tenant: acme
    hash: "{hash_key(KEY)}"
    budget: {{usd: 100, period: day, mode: {budget_mode}}}
providers:
  mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
prices:
  fault-slow-stream-100: {{input_per_mtok: 1, output_per_mtok: 1000}}
models:
  slow: {{provider: mock, model: fault-slow-stream-100}}
"""


@pytest.mark.parametrize("budget_mode", ["hard", "soft"])
def test_a_stream_cut_by_a_redis_stall_is_not_reported_as_a_spent_budget(upstream: MockUpstream,
                                                                          budget_mode: str) -> None:
    with RedisServer() as server:
        gateway = RunningGateway(_policy(upstream, budget_mode),
                                 {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "GW_PRIVATE_REDIS": server.url}).start()
        try:
            stall = threading.Timer(0.8, server.pause)  # after the reservation: mid-stream, past 5 chunks
            stall.start()
            with httpx.stream("POST", gateway.base_url + "/chat/completions", timeout=30,
                              headers={"Authorization": f"Bearer {KEY}"},
                              json={"model": "slow", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}) as response:
                assert response.status_code == 200
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            stall.join()
            errors = [json.loads(e)["error"] for e in events if e != "[DONE]" and "error" in json.loads(e)]
            if budget_mode == "soft":
                assert errors == [] and events[-1] == "[DONE]", f"a soft budget's stream was cut: {errors}"
            else:  # cut, as `closed` asks, with what is true
                assert [error["code"] for error in errors] == ["limits_unavailable"], errors
        finally:
            server.resume()
            gateway.stop()
