"""`gateway serve --workers 2` with a shadow policy: the deciders' guards count nothing in the live `/metrics`.

Each decider made a "private" `Metrics()`, but with several workers (`PROMETHEUS_MULTIPROC_DIR`) prometheus_client
writes every metric's values to the shared multiprocess files, whatever its registry: the live exposition then
showed the verdicts and durations of a guard only the candidate has, and the live guard counted three times a
request (served, re-decided under the live policy, decided under the candidate). A real server in its own process
group, in front of the mock upstream."""

from __future__ import annotations

import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, free_port
from tests.support.mock_upstream import MockUpstream
from tests.support.processes import group_members
from tests.test_serve import serving

KEY = "gw-b23-shadow-workers-key-000000000000000"


def _policy(upstream: MockUpstream, *, candidate: bool) -> str:
    server = "server: {host: 127.0.0.1}" if candidate else \
        "server: {host: 127.0.0.1, shadow_policy: candidate.yaml, shadow_queue: 10000}"
    only_candidate = "    candguard: {kind: denylist, terms: [hello]}\n" if candidate else ""
    return textwrap.dedent(f"""\
        version: 1
        {server}
        auth: keys
        keys: [{{name: team, tenant: team, hash: "{hash_key(KEY)}"}}]
        providers:
          up: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: up, model: mock-model}}
        guards:
          global:
            liveguard: {{kind: denylist, terms: [forbidden]}}
        """) + only_candidate


def _samples(metrics: str, prefix: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(metrics) for s in f.samples
            if s.name.startswith(prefix)]


def _total(metrics: str, name: str, **labels: str) -> float:
    return sum(value for sample, got, value in _samples(metrics, name)
               if sample == name and all(got.get(k) == v for k, v in labels.items()))


def test_the_shadow_deciders_guards_stay_out_of_the_live_metrics_with_two_workers(
    upstream: MockUpstream, tmp_path: Path,
) -> None:
    policy = tmp_path / "gateway.yaml"
    policy.write_text(_policy(upstream, candidate=False))
    (tmp_path / "candidate.yaml").write_text(_policy(upstream, candidate=True))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path), "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}) as server:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}]}

        def send(_: int) -> str:
            with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as fresh:  # a new connection
                answer = fresh.post(url + "/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
                return answer.headers["x-request-id"][:16]  # the id's prefix is per worker

        workers: set[str] = set()
        sent = 0
        with ThreadPoolExecutor(4) as pool:  # concurrent connections: a busy worker leaves some to the other
            while (len(workers) < 2 or sent < 16) and sent < 400:
                workers.update(pool.map(send, range(8)))
                sent += 8
        assert len(workers) == 2, "the requests did not reach both workers"

        deadline = time.monotonic() + 60  # every request compared, by either worker's shadow
        while True:
            metrics = httpx.get(url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            compared = _total(metrics, "gateway_shadow_requests_total", result="compared")
            served = _total(metrics, "gateway_guard_verdicts_total", guard="liveguard", place="input")
            if compared >= sent and served >= sent:
                break
            assert time.monotonic() < deadline, (compared, served, sent)
            time.sleep(0.1)
        assert _total(metrics, "gateway_shadow_disagreements_total", kind="guards") == sent  # the shadow did decide
        for _ in range(4):  # from either worker: only the served requests' guard, once each
            metrics = httpx.get(url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            guards = _samples(metrics, "gateway_guard_")
            assert not [s for s in guards if s[1].get("guard") == "candguard"], guards
            # the request's text and the answer's, each once a request
            for place in ("input", "output"):
                assert _total(metrics, "gateway_guard_verdicts_total", guard="liveguard", place=place) == sent, place
                assert _total(metrics, "gateway_guard_duration_seconds_count", guard="liveguard", place=place) == sent
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
    assert not group_members(server.pgid)
