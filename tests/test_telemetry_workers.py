"""`gateway serve --workers 2`: one coherent /metrics over both workers, new metrics and gauges included."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from gateway.telemetry.batches import APPLY_AFTER_S
from tests.conftest import free_port
from tests.support.processes import group_members
from tests.test_serve import serving

KEY = "gw-workers-test-key-000000000000000000000000"


def _samples(metrics: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for f in text_string_to_metric_families(metrics) for s in f.samples if s.name == name]


def test_two_workers_add_up_to_one_view(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: 8080}}
        auth: keys
        keys: [{{name: team-key, tenant: team, hash: "{hash_key(KEY)}"}}]
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        telemetry: {{quality: {{enabled: true}}, tracing: {{enabled: true}}}}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
        workers: set[str] = set()
        sent = streamed = 0

        def send(n: int) -> str:
            with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as fresh:  # a new connection
                answer = fresh.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": n % 2 == 1})
                assert answer.status_code == 200
                return answer.headers["x-request-id"][:16]  # the id's prefix is per worker

        with ThreadPoolExecutor(4) as pool:  # concurrent connections: a busy worker leaves some to the other
            while (len(workers) < 2 or sent < 24) and sent < 400:
                workers.update(pool.map(send, range(sent, sent + 8)))
                streamed += sum(1 for n in range(sent, sent + 8) if n % 2 == 1)
                sent += 8
        assert len(workers) == 2, "the requests did not reach both workers"
        time.sleep(APPLY_AFTER_S * 3)  # the other worker's last requests: written by its batches' timer
        views = [httpx.get(f"http://127.0.0.1:{port}/metrics").text for _ in range(6)]  # from either worker
        for metrics in views:
            tenant = _samples(metrics, "gateway_tenant_requests_total")
            assert [(labels["tenant"], value) for labels, value in tenant] == [("team", float(sent))]
            checked = _samples(metrics, "gateway_quality_checked_total")
            assert sum(value for _, value in checked) == sent
            ttft = _samples(metrics, "gateway_gen_ai_server_time_to_first_token_seconds_count")
            assert sum(value for _, value in ttft) == streamed
            usage = _samples(metrics, "gateway_gen_ai_client_token_usage_count")
            assert sum(value for labels, value in usage if labels["token_type"] == "output") == sent
            in_flight = _samples(metrics, "gateway_requests_in_flight")
            assert sum(value for _, value in in_flight) == 0.0  # livesum: the two live workers, nothing stuck
            served = _samples(metrics, "gateway_policy_info")
            assert [value for _, value in served] == [1.0]  # livemax: one version, not one per worker
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
    assert not group_members(server.pgid)


def test_a_worker_killed_with_streams_open_leaves_no_requests_in_flight(tmp_path: Path) -> None:
    """A worker killed outright (SIGKILL) kept its live gauges' file: its streams open then stayed in
    `gateway_requests_in_flight` on every scrape after the supervisor had restarted it."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {host: 127.0.0.1, port: 8080}
        auth: none
        providers: {slow: {kind: demo, chunk_delay_ms: 300}}
        models: {slow: {provider: slow, model: demo-1}}
        """))
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        opened: list[httpx.Response] = []
        clients = [httpx.Client(timeout=30) for _ in range(6)]
        try:
            for client in clients:  # a connection each: both workers get some
                request = client.build_request("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                opened.append(client.send(request, stream=True))
            in_flight = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "gateway_requests_in_flight")
            assert sum(value for _, value in in_flight) == 6.0
            workers = _workers(server.pgid)
            assert len(workers) == 2, workers
            os.kill(workers[0], signal.SIGKILL)
            for response in opened:  # the killed worker's streams break off; the other's run to their end
                try:
                    response.read()
                except httpx.HTTPError:
                    pass
        finally:
            for response in opened:
                response.close()
            for client in clients:
                client.close()
        deadline = time.monotonic() + 20
        left = None
        while time.monotonic() < deadline:  # the supervisor restarts the worker within about a second
            left = _samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text, "gateway_requests_in_flight")
            if sum(value for _, value in left) == 0.0 and len(_workers(server.pgid)) == 2:
                break
            time.sleep(0.3)
        assert left is not None and sum(value for _, value in left) == 0.0, left
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
    assert not group_members(server.pgid)


def _workers(pgid: int) -> list[int]:
    """The serving workers of a `gateway serve --workers N` group (not the supervisor, not multiprocessing's
    resource tracker): the processes started by `multiprocessing.spawn`."""
    found = []
    for pid in group_members(pgid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(pid)
    return found


def test_policy_info_keeps_its_bound_over_many_reloads_with_two_workers(tmp_path: Path) -> None:
    """prometheus_client's multiprocess files cannot forget a gauge's series (`remove` does nothing there and warns
    on stderr, in the middle of the JSON log): every version a worker ever served stayed a series."""
    policy = tmp_path / "policy.yaml"

    def write(n: int) -> None:
        policy.write_text(textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, port: 8080, watch_policy: false}}
            auth: none
            providers: {{demo: {{kind: demo}}}}
            models: {{demo: {{provider: demo, model: demo-1}}, extra-{n}: {{provider: demo, model: demo-1}}}}
            """))

    write(0)
    port = free_port()
    args = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port), "--workers", "2"]
    with serving(args, port, env={"TMPDIR": str(tmp_path)}) as server:
        for n in range(1, 25):  # each a version of its own, loaded by both workers before the next
            write(n)
            server.send_signal(signal.SIGHUP)  # the supervisor passes it to every worker
            deadline = time.monotonic() + 20
            while not all(any(model["id"] == f"extra-{n}" for model in listed["data"]) for listed in (
                    httpx.get(f"http://127.0.0.1:{port}/v1/models").json() for _ in range(6))):
                assert time.monotonic() < deadline, f"the workers did not load policy {n}"
                time.sleep(0.05)
            time.sleep(0.5)  # (a signal the supervisor takes within its half-second tick: one a tick)
        views = [httpx.get(f"http://127.0.0.1:{port}/metrics").text for _ in range(6)]  # from either worker
        for metrics in views:
            served = _samples(metrics, "gateway_policy_info")
            assert [value for _, value in served].count(1.0) == 1 and len(served) <= 17, served
        server.signal_group(signal.SIGTERM)
        assert server.wait(20) in (0, -signal.SIGTERM), server.text()
        assert "Removal of labels" not in server.text()
    assert not group_members(server.pgid)
