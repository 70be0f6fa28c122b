"""`gateway serve --workers N`: how the supervisor takes a worker's failed start, death while starting, and a SIGHUP
that comes while the workers start.

Before: a restarted worker whose start failed (uvicorn's STARTUP_FAILURE, here its payload-log folder removed) made
the supervisor stop the healthy worker too, and `gateway serve` exited 0, as it did when the first start failed;
the supervisor noticed a worker that died while it waited for its ping's answer only 30 s later (it held the
worker's end of their pipe open itself, so it never saw the end of it), handling no signal meanwhile; and a SIGHUP
relayed to a worker still importing killed it (SIGHUP's default action). Each server runs in its own process group
(`tests.support.processes.running`), stopped whole when the test ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import textwrap
import time
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.support.processes import group_members, running
from tests.test_serve_lifecycle import GATEWAY, chat, serving, wait_for
from tests.test_telemetry_workers import _workers


def payload_log_policy(port: int, folder: Path) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}, watch_policy: false}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        telemetry:
          payload_log: {{enabled: true, sink: file, path: '{folder / "payloads.jsonl"}'}}
        """)


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_a_restarted_worker_that_cannot_start_is_retried_while_the_other_serves(tmp_path: Path) -> None:
    port = free_port()
    folder = tmp_path / "payloads"
    folder.mkdir()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(payload_log_policy(port, folder))
    with serving(policy, port, "--workers", "2", env={"TMPDIR": str(tmp_path)}) as server:
        shutil.rmtree(folder)  # a worker started now cannot open its payload log: uvicorn's STARTUP_FAILURE
        os.kill(_workers(server.pgid)[0], signal.SIGKILL)
        assert server.wait_for_output("Application startup failed", 60), server.text()[-3000:]
        failed = time.monotonic()
        # seen within a tick or two, not after the ping's 30 s; retried after a wait, not a stop
        assert server.wait_for_output("(exit status 3); restarting it in", 10), server.text()[-3000:]
        assert time.monotonic() - failed < 10
        assert server.poll() is None
        assert "failed to start; stopping" not in server.text()
        assert all(chat(port).status_code == 200 for _ in range(6))  # the other worker serves on
        # (once the cause is fixed the retry starts: `test_worker_restart_fallback.py`, the same wait)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert not group_members(server.pgid)


def test_a_first_start_that_fails_with_two_workers_exits_3(tmp_path: Path) -> None:
    """As with one worker (docs/operations.md "When the gateway does not start")."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(payload_log_policy(port, tmp_path / "no-such-folder"))
    with running([*GATEWAY, "serve", "--policy", str(policy), "--workers", "2"],
                 env={"PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}) as server:
        code = server.wait(60)
        output = server.text()
    assert code == 3, output[-3000:]
    assert "failed to start; stopping" in output
    assert not group_members(server.pgid)


def test_a_worker_killed_while_it_starts_is_restarted_within_seconds(tmp_path: Path) -> None:
    """The supervisor waits for a starting worker's answer to its ping: a worker killed meanwhile was seen dead
    only when that wait (30 s) ran out."""
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        """))
    with serving(policy, port, "--workers", "2", env={"TMPDIR": str(tmp_path)}) as server:
        assert wait_for(lambda: server.text().count("Application startup complete") == 2, 30)
        first = set(_workers(server.pgid))
        os.kill(min(first), signal.SIGKILL)
        assert wait_for(lambda: len(set(_workers(server.pgid)) - first) == 1, 10), server.text()[-3000:]
        starting = (set(_workers(server.pgid)) - first).pop()
        time.sleep(0.7)  # the supervisor's next tick has pinged it; it is still importing the gateway
        os.kill(starting, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: len(set(_workers(server.pgid)) - first - {starting}) == 1, 20), server.text()[-3000:]
        assert time.monotonic() - killed < 15
        assert wait_for(lambda: server.text().count("Application startup complete") >= 3, 30), server.text()[-3000:]
        assert all(chat(port).status_code == 200 for _ in range(4))
    assert not group_members(server.pgid)


def test_a_sighup_while_two_workers_start_kills_neither(tmp_path: Path) -> None:
    port = free_port()
    policy = tmp_path / "gateway.yaml"
    policy.write_text(textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, port: {port}, watch_policy: false}}
        auth: none
        providers: {{demo: {{kind: demo}}}}
        models: {{demo: {{provider: demo, model: demo-1}}}}
        """))
    with running([*GATEWAY, "serve", "--policy", str(policy), "--workers", "2"],
                 env={"PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}) as server:
        assert server.wait_for_output("Started parent process", 30), server.text()
        for _ in range(6):  # passed on to the workers at the supervisor's first tick, while they import
            server.send_signal(signal.SIGHUP)
            time.sleep(0.1)
        assert wait_for(lambda: ready(port), 40), server.text()[-3000:]
        assert wait_for(lambda: server.text().count("Application startup complete") >= 2, 20)
        time.sleep(1)
        output = server.text()
        assert server.poll() is None
        assert not re.search(r"\] died", output), output[-3000:]
        assert output.count("Started server process") == 2, output[-3000:]  # no worker started twice
        assert all(chat(port).status_code == 200 for _ in range(4))
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    assert not group_members(server.pgid)
