"""What a killed process leaves behind: a worker's guard pool processes, and the metrics files of an earlier run.

Before: a worker killed outright (SIGKILL, the OOM killer) left its `process` guard pool's processes running for good,
reparented to PID 1 (a spaCy pipeline each, ~190 MB), even after `gateway serve` exited; and the live gauges' files
of a killed run in a `PROMETHEUS_MULTIPROC_DIR` the operator set were summed by every later run
(`gateway_requests_in_flight` never went back to 0). Each server runs in its own process group
(`tests.support.processes.running`), stopped whole when the test ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.support.processes import ManagedProcess, group_members, running
from tests.test_serve_lifecycle import GATEWAY, serving, wait_for
from tests.test_telemetry_workers import _samples

REPO = Path(__file__).resolve().parents[1]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[1])


def _children(server: ManagedProcess) -> dict[int, set[int]]:
    """Each worker of the group (a child of `gateway serve`) and the processes it spawned (its guard pool's)."""
    members = server.members()
    workers = {pid for pid in members if _parent(pid) == server.pid and _spawned(pid)}  # (not the resource tracker)
    return {worker: {pid for pid in members if _parent(pid) == worker and _spawned(pid)} for worker in workers}


def _spawned(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_killed_workers_guard_pool_processes_die_with_it(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        guards:
          pool: {{kind: process, workers: 2}}
          global:
            secrets: {{kind: secrets}}
        """))
    with serving(policy, port, "--workers", "2", env={"TMPDIR": str(tmp_path)}) as server:
        assert wait_for(lambda: [len(pool) for pool in _children(server).values()] == [2, 2], 30), _children(server)
        worker, pool = next(iter(_children(server).items()))
        os.kill(worker, signal.SIGKILL)  # as the OOM killer would
        assert wait_for(lambda: not set(group_members(server.pgid)) & pool, 5), (pool, group_members(server.pgid))
        assert wait_for(lambda: [len(p) for p in _children(server).values()] == [2, 2], 30), _children(server)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    assert not group_members(server.pgid)


_STALE_RUN = """
from gateway.telemetry.metrics import Metrics
Metrics().in_flight.inc(4)  # and then gone, as a killed worker: its live gauge file stays
"""


def _in_flight(port: int) -> float:
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(value for _, value in _samples(metrics, "gateway_requests_in_flight"))


def _demo_policy(path: Path, port: int) -> Path:
    path.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        """))
    return path


def test_a_killed_runs_gauges_in_a_supplied_metrics_folder_are_not_summed(tmp_path: Path) -> None:
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    subprocess.run([sys.executable, "-c", _STALE_RUN], cwd=REPO, env=env, check=True, timeout=60)
    assert [p.name for p in folder.iterdir() if p.name.startswith("gauge_livesum_")]
    (folder / "notes.txt").write_text("not prometheus_client's: kept")
    port = free_port()
    policy = _demo_policy(tmp_path / "gateway.yaml", port)
    with serving(policy, port, "--workers", "2", env={"PROMETHEUS_MULTIPROC_DIR": str(folder)}) as server:
        assert [_in_flight(port) for _ in range(4)] == [0.0] * 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert (folder / "notes.txt").read_text() == "not prometheus_client's: kept"
    assert not group_members(server.pgid)


def test_a_second_gateway_on_the_same_metrics_folder_is_refused(tmp_path: Path) -> None:
    """Its workers' files would be added to the first gateway's and the other way round, and each start would
    remove the other's: refused, and the first one's metrics are untouched."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder)}
    port = free_port()
    with serving(_demo_policy(tmp_path / "first.yaml", port), port, "--workers", "2", env=env) as first:
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10, json={
            "model": "demo", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        files = sorted(p.name for p in folder.iterdir())
        other = _demo_policy(tmp_path / "second.yaml", free_port())
        with running([*GATEWAY, "serve", "--policy", str(other)], env={"PYTHONUNBUFFERED": "1", **env}) as second:
            code = second.wait(30)
        assert code == 2, second.text()[-3000:]
        assert "PROMETHEUS_MULTIPROC_DIR" in second.text() and "another gateway" in second.text()
        time.sleep(0.5)
        assert set(files) <= {p.name for p in folder.iterdir()}
        assert first.poll() is None
    assert not group_members(first.pgid)
