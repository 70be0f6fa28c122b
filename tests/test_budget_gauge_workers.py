"""`gateway serve --workers 2` on Redis: the budget gauges read the counter's last total, whichever worker wrote it.

Each worker writes the store's total after its own settles (`StageState._show_total`). Combined by their minimum
(`livemin`), a worker whose last settle came while the other worker's request was in flight kept that figure, the
request's reservation counted, and the scrape showed it for good once that request had settled elsewhere: $0.82
too low on a $2 budget (`GatewayBudgetNearlySpent` on an idle key). The gauges are `livemostrecent`: the latest
write of a live worker. A real server in its own process group, the mock upstream, the suite's Redis (a key prefix
of its own, deleted afterwards)."""

from __future__ import annotations

import signal
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.processes import group_members
from tests.support.redis_server import suite_redis_url
from tests.test_serve import serving

KEY = "gw-budget-gauge-workers-key-0000000000000000"
BUDGET = 2.0
OUT_PER_MTOK = 200.0  # a reservation: the default cap (4096 tokens) at $200 a million, $0.8192
RESERVED = 4096 * OUT_PER_MTOK / 1_000_000
MESSAGES = [{"role": "user", "content": "hello there"}]


def _policy(upstream: MockUpstream, prefix: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        state: {{backend: redis, url_env: GAUGE_REDIS, key_prefix: "{prefix}", op_timeout_s: 5}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: {BUDGET}}}}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
          fault-slow-first-byte-4000: {{input_per_mtok: 0, output_per_mtok: {OUT_PER_MTOK}}}
        models:
          chat: {{provider: mock, model: mock-model}}
          slow: {{provider: mock, model: fault-slow-first-byte-4000}}
        """)


def _left(url: str) -> float:
    """The key's `gateway_budget_remaining_usd` as a scrape (from either worker) combines it; NaN if absent."""
    text = httpx.get(url + "/metrics", headers={"Connection": "close"}, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_budget_remaining_usd" and sample.labels == {"scope": "key", "name": "main"}:
                return sample.value
    return float("nan")


def _chat(url: str, model: str) -> httpx.Response:
    """One request on a connection of its own (either worker may take it)."""
    return httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES}, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Connection": "close"})


def test_the_budget_gauges_show_the_last_total_of_either_worker(upstream: MockUpstream, tmp_path: Path) -> None:
    """A slow request holds its reservation while both workers settle quick ones; once it settles too, every scrape
    reads the budget less what the requests cost, nothing held."""
    prefix = f"gwtest:gauge-workers:{uuid.uuid4().hex}:"
    policy = tmp_path / "gateway.yaml"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with suite_redis_url() as redis_url:
        policy.write_text(_policy(upstream, prefix))
        env = {"TMPDIR": str(tmp_path), "GAUGE_REDIS": redis_url, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}
        try:
            with serving(args, port, env=env) as server:
                slow: dict[str, Any] = {}
                thread = threading.Thread(target=lambda: slow.setdefault("response", _chat(url, "slow")))
                thread.start()
                try:
                    deadline = time.monotonic() + 10  # until the slow one's reservation shows
                    while not _left(url) <= BUDGET - RESERVED + 1e-6 and time.monotonic() < deadline:
                        time.sleep(0.05)
                    workers: set[str] = set()
                    costs: list[float] = []
                    while len(workers) < 2 and len(costs) < 60:  # quick ones, until both workers settled some
                        quick = _chat(url, "chat")
                        assert quick.status_code == 200, quick.text
                        workers.add(quick.headers["x-request-id"][:16])  # (the id's prefix is the worker's)
                        costs.append(float(quick.headers["x-gateway-cost-usd"]))
                    assert len(workers) == 2, "the quick requests did not reach both workers"
                    assert thread.is_alive(), "the slow request ended before both workers settled quick ones"
                finally:
                    thread.join(30)
                assert slow["response"].status_code == 200, slow["response"].text
                costs.append(float(slow["response"].headers["x-gateway-cost-usd"]))
                left = BUDGET - sum(costs)
                deadline = time.monotonic() + 10  # (a settle on Redis runs beside its reply)
                while _left(url) != pytest.approx(left, abs=1e-6) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [_left(url) for _ in range(6)] == pytest.approx([left] * 6, abs=1e-6)  # from either worker
                server.signal_group(signal.SIGTERM)
                assert server.wait(20) in (0, -signal.SIGTERM), server.text()
            assert not group_members(server.pgid)
        finally:
            store = redis.Redis.from_url(redis_url)
            store.delete(*store.keys(prefix + "*") or [prefix])
            store.close()
