"""`gateway serve` as a real process: drain on SIGTERM, exit status, reload across workers, logs in workers.

Each server runs through `tests.support.processes.running` (its own process group,
output drained from threads, the whole group stopped when the test ends).
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.support.processes import ManagedProcess, running
from tests.test_serve import serving as serve_ready

GATEWAY = [sys.executable, "-m", "gateway"]
MESSAGES = [{"role": "user", "content": "Hello there, demo"}]
ADMIN_TOKEN = "serve-admin-token-0123456789"


def demo_policy(port: int, **server: object) -> str:
    lines = "".join(f"\n  {key}: {value}" for key, value in server.items())
    return textwrap.dedent(f"""\
        version: 1
        server:
          host: 127.0.0.1
          port: {port}""") + lines + textwrap.dedent("""
        auth: none
        providers:
          demo: {kind: demo}
          slow: {kind: demo, chunk_delay_ms: 200}
        models:
          demo: {provider: demo, model: demo-1}
          slow: {provider: slow, model: demo-1}
        """)


def serving(policy: Path, port: int, *extra: str, env: dict[str, str] | None = None,
            ) -> AbstractContextManager[ManagedProcess]:
    """`gateway serve --policy POLICY ...`, ready (see `tests/test_serve.py`)."""
    return serve_ready([*GATEWAY, "serve", "--policy", str(policy), *extra], port, env=env)


def chat(port: int, **headers: str) -> httpx.Response:
    with httpx.Client(timeout=10) as client:  # a new connection each time: any worker may answer
        return client.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers,
                           json={"model": "demo", "messages": MESSAGES})


def versions_seen(port: int, tries: int = 16) -> set[str]:
    seen = set()
    for _ in range(tries):
        with httpx.Client(timeout=5) as client:
            seen.add(client.get(f"http://127.0.0.1:{port}/readyz").json()["policy_version"])
    return seen


def wait_for(condition: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return bool(condition())  # type: ignore[operator]


def test_every_worker_writes_its_access_lines(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, access_log="true"))
    with serving(policy, port, "--workers", "2") as server:
        ids = [f"access-line-{n}" for n in range(20)]
        for request_id in ids:
            assert chat(port, **{"x-request-id": request_id}).status_code == 200
        # each worker writes its lines within 50 ms of the first waiting one
        assert wait_for(lambda: all(f'"{request_id}"' in server.text() for request_id in ids), 10)
        lines = [json.loads(line) for line in server.text().splitlines() if '"logger":"gateway.access"' in line]
    assert {line["request_id"] for line in lines} >= set(ids)
    assert all("Hello there" not in json.dumps(line) for line in lines)  # no prompt text


@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_access_lines_of_the_last_requests_are_written_when_a_worker_stops(tmp_path: Path, workers: str) -> None:
    """Access lines wait up to 50 ms for one write: a worker that stops right after its last answers writes
    the lines still waiting (at exit) rather than losing them."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, access_log="true", drain_delay_s=0))
    with serving(policy, port, "--workers", workers) as server:
        ids = [f"last-line-{n}" for n in range(5)]
        for request_id in ids:
            assert chat(port, **{"x-request-id": request_id}).status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        lines = [json.loads(line) for line in server.text().splitlines() if '"logger":"gateway.access"' in line]
    assert {line["request_id"] for line in lines} >= set(ids)


@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-server", "to-its-process-group"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_keeps_serving_through_the_drain_delay_with_readyz_503_and_exits_0(
    tmp_path: Path, workers: str, to_group: bool,
) -> None:
    """Sent to the process group (as systemd and dumb-init stop a service), the SIGTERM reaches each of two workers
    twice, from the kernel and from the supervisor: the second skipped the delay, and new connections were refused
    from the start (H52)."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, drain_delay_s=5, drain_timeout_s=5))
    with serving(policy, port, "--workers", workers) as server:
        if to_group:
            server.signal_group(signal.SIGTERM)
        else:
            server.send_signal(signal.SIGTERM)
        # uvicorn's supervisor looks at its signals every 0.5 s, then signals its workers
        assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 503, 4)
        assert chat(port).status_code == 200  # still served while the load balancer catches up
        assert server.wait(timeout=20) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_connection_made_while_draining_is_refused_not_left_hanging(tmp_path: Path, workers: str) -> None:
    """With `drain_delay_s: 0` the listening socket closes at once (README "Shutdown"). With `--workers 2` the
    supervisor kept its own copy open: the kernel accepted a new connection that no process read, and its request
    hung until the last stream ended, then was reset (a POST so cut cannot safely be retried)."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, drain_delay_s=0, drain_timeout_s=10))
    with serving(policy, port, "--workers", workers) as server:
        body = {"model": "slow", "stream": True, "messages": MESSAGES}  # about 3 s: the drain waits for them
        clients = [httpx.Client(timeout=30) for _ in range(4)]
        streams = [client.send(client.build_request("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                                                    json=body), stream=True) for client in clients]
        server.send_signal(signal.SIGTERM)
        time.sleep(1.5)  # the supervisor's tick (0.5 s) and the workers' drain delay (0) are past
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert time.monotonic() - started < 1  # refused, not accepted and left hanging
        for stream, client in zip(streams, clients, strict=True):
            assert stream.status_code == 200 and "[DONE]" in stream.read().decode()  # the open streams finish
            client.close()
        assert server.wait(timeout=20) == 0


def test_a_stream_cut_at_the_drain_deadline_gets_an_error_event_and_no_traceback(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, drain_timeout_s=1))
    with serving(policy, port) as server:
        last, log = _stream_cut_by_sigterm(server, port)
    assert last["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "timeout graceful shutdown exceeded" not in log


def test_two_workers_reload_to_the_same_version_on_a_file_change_sighup_and_the_admin_api(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    text = demo_policy(port, watch_interval_s=0.2, admin_token_env="GW_ADMIN")
    policy.write_text(text)
    with serving(policy, port, "--workers", "2", env={"GW_ADMIN": ADMIN_TOKEN}) as server:
        first = versions_seen(port)
        assert len(first) == 1
        policy.write_text(text + "# changed\n")  # 1: the file watcher in each worker
        assert wait_for(lambda: versions_seen(port) not in ({*first}, set()) and len(versions_seen(port)) == 1)
        second = versions_seen(port)
        policy.write_text(text.replace("watch_interval_s: 0.2", "watch_policy: false"))
        # Both watchers pick this one up, and are off from then on (waited for, not slept on: a watcher still on
        # when the later files are written would load them itself, before the SIGHUP or the admin API)
        assert wait_for(lambda: len(versions_seen(port)) == 1 and versions_seen(port) != second)
        third = versions_seen(port)
        policy.write_text(text.replace("watch_interval_s: 0.2", "watch_policy: false") + "# by SIGHUP\n")
        server.send_signal(signal.SIGHUP)  # 2: the supervisor passes it to every worker
        assert wait_for(lambda: len(versions_seen(port)) == 1 and versions_seen(port) != third)
        fourth = versions_seen(port)
        policy.write_text(text.replace("watch_interval_s: 0.2", "watch_policy: false") + "# by the admin API\n")
        reply = httpx.post(f"http://127.0.0.1:{port}/admin/reload", timeout=10,
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert reply.status_code == 200 and reply.json()["result"] == "ok"
        assert wait_for(lambda: len(versions_seen(port)) == 1 and versions_seen(port) != fourth)  # 3: both workers
        assert server.poll() is None


def _configmap_version(volume: Path, stamp: str, text: str) -> None:
    """What the kubelet does to a mounted ConfigMap: the files in a new timestamped folder, `..data` swapped to it
    in one rename, the old folder deleted; `gateway.yaml` itself is a symlink through `..data`."""
    folder = volume / f"..{stamp}"
    folder.mkdir()
    (folder / "gateway.yaml").write_text(text)
    old = (volume / "..data").resolve() if (volume / "..data").exists() else None
    (volume / "..data_tmp").symlink_to(folder.name)
    (volume / "..data_tmp").rename(volume / "..data")
    if old is not None:
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    if not (volume / "gateway.yaml").is_symlink():
        (volume / "gateway.yaml").symlink_to("..data/gateway.yaml")


def test_a_configmap_update_in_place_is_reloaded_by_the_watcher_and_by_sighup(tmp_path: Path) -> None:
    """Served from a ConfigMap-like volume (symlinks through `..data`), the gateway watches the path it was
    given, not the timestamped folder behind it, which the kubelet deletes on every update."""
    port = free_port()
    volume = tmp_path / "policies"
    volume.mkdir()
    text = demo_policy(port, watch_interval_s=0.2)
    _configmap_version(volume, "2026_12_04_01", text)
    with serving(volume / "gateway.yaml", port) as server:
        first = versions_seen(port, 1)
        _configmap_version(volume, "2026_12_04_02", text + "# changed\n")
        assert wait_for(lambda: versions_seen(port, 1) != first)
        with httpx.Client(timeout=5) as client:
            ready = client.get(f"http://127.0.0.1:{port}/readyz").json()
        assert ready["last_reload"]["result"] == "ok"
        second = versions_seen(port, 1)
        off = text.replace("watch_interval_s: 0.2", "watch_policy: false")
        _configmap_version(volume, "2026_12_04_03", off)
        assert wait_for(lambda: versions_seen(port, 1) not in (first, second))
        third = versions_seen(port, 1)
        _configmap_version(volume, "2026_12_04_04", off + "# by SIGHUP\n")
        server.send_signal(signal.SIGHUP)
        assert wait_for(lambda: versions_seen(port, 1) != third)
        with httpx.Client(timeout=5) as client:
            assert client.get(f"http://127.0.0.1:{port}/readyz").json()["last_reload"]["result"] == "ok"
        assert chat(port).status_code == 200


def test_serve_refuses_a_network_address_with_no_keys_in_front_of_a_real_provider(tmp_path: Path) -> None:
    policy = tmp_path / "open.yaml"
    policy.write_text(textwrap.dedent("""\
        version: 1
        server: {host: 0.0.0.0, port: 8080}
        auth: none
        providers:
          openai: {kind: openai, base_url: "https://api.openai.com/v1"}
        models:
          gpt: {provider: openai, model: gpt-4o-mini}
        """))
    with running([*GATEWAY, "serve", "--policy", str(policy)]) as server:
        assert server.wait(timeout=20) == 2
        assert "--allow-open" in server.text()
    with running([*GATEWAY, "check", str(policy)]) as check:
        assert check.wait(timeout=20) == 0
        assert "SECURITY" in check.text()


def test_serve_refuses_run_time_keys_on_the_memory_store_with_several_workers(tmp_path: Path) -> None:
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(free_port()).replace("auth: none", "auth: keys") + "dynamic_keys: {enabled: true}\n")
    with running([*GATEWAY, "serve", "--policy", str(policy), "--workers", "2"]) as server:
        assert server.wait(timeout=20) == 2
        assert "dynamic_keys with the memory store and 2 workers" in server.text()


def _network_policy(port: int, auth: str) -> str:
    """A real provider on every interface: served with keys, or (`auth: none`) open to anyone who reaches it."""
    keys = "" if auth == "none" else textwrap.dedent("""\
        keys:
          - {name: ops, tenant: ops, hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}
        """)
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 0.0.0.0, port: {port}, watch_interval_s: 0.2, admin_token_env: GW_ADMIN}}
        auth: {auth}
        """) + keys + textwrap.dedent("""\
        providers:
          openai: {kind: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_KEY}
        models:
          gpt: {provider: openai, model: gpt-4o-mini}
        """)


def test_a_reload_to_no_keys_on_a_network_address_is_refused_by_the_watcher_sighup_and_the_admin_api(
    tmp_path: Path,
) -> None:
    """`gateway serve` refuses `auth: none` on 0.0.0.0 in front of a real provider; a reload cannot get round
    it: each way in is refused as an invalid policy, and the policy with keys keeps serving."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(_network_policy(port, "keys"))
    url = f"http://127.0.0.1:{port}"

    def last_reload() -> dict[str, Any]:
        with httpx.Client(timeout=5) as client:
            ready = client.get(url + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()
        assert ready["policy_version"] == served  # the policy with keys, throughout
        found: dict[str, Any] = ready.get("last_reload") or {}
        return found

    with serving(policy, port, env={"GW_ADMIN": ADMIN_TOKEN, "OPENAI_KEY": "sk-unused"}) as server:
        served = versions_seen(port, 1).pop()
        policy.write_text(_network_policy(port, "none"))  # 1: the file watcher
        assert wait_for(lambda: last_reload().get("trigger") == "file"), server.text()[-3000:]
        assert last_reload()["result"] == "invalid"
        assert any("--allow-open" in e for e in last_reload()["errors"])
        server.send_signal(signal.SIGHUP)  # 2: the same file, by signal
        assert wait_for(lambda: last_reload().get("trigger") == "signal")
        assert last_reload()["result"] == "invalid"
        reply = httpx.post(url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
        assert reply.status_code == 422, reply.text  # 3: the admin API answers as for an invalid policy
        assert reply.json()["result"] == "invalid" and reply.json()["version"] == served
        assert any(e.startswith(f"{policy}: refusing to serve 0.0.0.0") for e in reply.json()["errors"])
        assert last_reload()["trigger"] == "admin"
        with httpx.Client(timeout=5) as client:
            assert client.post(url + "/v1/chat/completions", json={"model": "gpt", "messages": MESSAGES}
                               ).status_code == 401  # keys are still needed
            metrics = client.get(url + "/metrics").text
        refused = [line for line in metrics.splitlines() if line.startswith('gateway_policy_reload_total{result="in')]
        assert refused and float(refused[0].split()[-1]) >= 3
        assert 'gateway_policy_reload_total{result="ok"} 0.0' in metrics  # exported at 0 from the start
        assert server.poll() is None


def test_serve_without_a_policy_outside_a_checkout_uses_the_packaged_demo_policy(tmp_path: Path) -> None:
    port = free_port()
    with running([*GATEWAY, "serve", "--port", str(port)], cwd=tmp_path, env={"PYTHONUNBUFFERED": "1"}) as server:
        assert wait_for(lambda: _ready(port), timeout=30), server.text()
        assert chat(port).status_code == 200


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_the_kubernetes_example_serves_keys_with_a_drain_delay() -> None:
    import yaml

    from gateway.policy import compile_text
    from gateway.policy.compile import open_to_network

    docs = list(yaml.safe_load_all((Path(__file__).resolve().parents[1] / "deploy" / "kubernetes.yaml").read_text()))
    text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["gateway.yaml"]
    policy = compile_text(text, "kubernetes.yaml", {}, require_env=False)
    assert policy.auth == "keys" and not open_to_network(policy, policy.server.host)
    assert policy.server.drain_delay_s > 0
    deployment = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert deployment["terminationGracePeriodSeconds"] > policy.server.drain_delay_s + policy.server.drain_timeout_s


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    from tests.support.processes import group_members

    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port))
    metrics = tmp_path / "metrics"  # a killed supervisor cannot remove its own folder: give it one here
    metrics.mkdir()
    with serving(policy, port, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(metrics)}) as server:
        members = server.members()
        assert len(members) >= 3  # supervisor and two workers (and multiprocessing's helper)
        server.send_signal(signal.SIGKILL)
        left = lambda: [pid for pid in group_members(server.pgid) if pid in members]  # noqa: E731
        assert wait_for(lambda: not left(), timeout=30), (left(), server.text()[-3000:])


def test_after_a_reload_to_a_longer_drain_the_gateway_still_cuts_before_the_server(tmp_path: Path) -> None:
    """The server's own deadline is fixed at start (drain_timeout_s then, plus a grace): after a reload to a longer
    drain_timeout_s, the gateway cut at the new one, after the server had dropped the stream without a word."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, drain_timeout_s=1))
    with serving(policy, port) as server:
        before = versions_seen(port, 1)
        policy.write_text(demo_policy(port, drain_timeout_s=20))
        server.send_signal(signal.SIGHUP)
        assert wait_for(lambda: versions_seen(port, 1) != before, 10)
        last, log = _stream_cut_by_sigterm(server, port)
    assert last["error"]["code"] == "shutting_down"
    assert "timeout graceful shutdown exceeded" not in log


def _stream_cut_by_sigterm(server: ManagedProcess, port: int) -> tuple[dict[str, Any], str]:
    """A `slow` stream's last event when SIGTERM comes after its second, and the server's log once it exited 0."""
    received = b""
    body = {"model": "slow", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=20) as response:
        for piece in response.iter_raw():
            received += piece
            if received.count(b"\n\n") == 2:
                server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=20) == 0
    last = [event for event in received.decode().split("\n\n") if event][-1]
    return json.loads(last.removeprefix("data: ")), server.text()


def _ready(port: int) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
    except httpx.TransportError:
        return None
    return answer.json() if answer.status_code == 200 else None  # type: ignore[no-any-return]


def test_a_change_written_while_the_gateway_starts_is_loaded_by_the_watcher(tmp_path: Path) -> None:
    """The watcher took its first look at the file when it started, after the policy was read: a change written in
    between was taken as the one loaded, and the old policy served for good."""
    from gateway.policy import load_policy

    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, watch_interval_s=0.2))
    with running([*GATEWAY, "serve", "--policy", str(policy)], env={"PYTHONUNBUFFERED": "1"}) as server:
        assert server.wait_for_output("Waiting for application startup", 30), server.text()
        policy.write_text(demo_policy(port, watch_interval_s=0.2) + "# changed while starting\n")
        wanted = load_policy(policy).version
        assert wait_for(lambda: _ready(port) is not None, 30), server.text()
        assert wait_for(lambda: (_ready(port) or {}).get("policy_version") == wanted, 10), _ready(port)


def test_a_sighup_while_the_gateway_starts_reloads_once_it_serves(tmp_path: Path) -> None:
    """A SIGHUP before the process had its handler killed it (SIGHUP's default action)."""
    from gateway.policy import load_policy

    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(demo_policy(port, watch_policy="false"))
    with running([*GATEWAY, "serve", "--policy", str(policy)], env={"PYTHONUNBUFFERED": "1"}) as server:
        assert server.wait_for_output("Waiting for application startup", 30), server.text()
        policy.write_text(demo_policy(port, watch_policy="false") + "# changed, then signalled\n")
        server.send_signal(signal.SIGHUP)
        wanted = load_policy(policy).version
        assert wait_for(lambda: _ready(port) is not None, 30), server.text()
        assert server.poll() is None
        assert wait_for(lambda: (_ready(port) or {}).get("policy_version") == wanted, 10), _ready(port)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0

