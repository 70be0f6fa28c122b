"""`gateway serve --workers N`: a worker restarted (after a crash, an OOM kill) while the policy file on disk is
refused serves the last policy the workers accepted, the one its siblings serve; one that cannot start at all is
restarted after a growing wait.

It read the refused file, died with a traceback, and was restarted at once, again and again (15 deaths and 28
tracebacks in 20 s after one SIGKILL: a core burnt on restarts, one worker fewer serving). Each server runs in its own
process group (`tests.support.processes.running`), stopped whole when the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import textwrap
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.support.processes import ManagedProcess, group_members
from tests.test_serve import serving
from tests.test_serve_lifecycle import chat, versions_seen, wait_for
from tests.test_telemetry_workers import _workers

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.worker-restart-token.c2lnbmF0dXJl"


def write_policy(folder: Path, port: int) -> Path:
    """A policy of four files: the root, an include, a prices file, and an Entra token file named relative to it."""
    (folder / "token").write_text(TOKEN)
    (folder / "models.yaml").write_text("models:\n  demo: {provider: demo, model: demo-1}\n")
    (folder / "prices.yaml").write_text("version: 1\nprices:\n  demo-1: {input_per_mtok: 1, output_per_mtok: 2}\n")
    root = folder / "gateway.yaml"
    root.write_text(textwrap.dedent(f"""\
        version: 1
        include: [models.yaml]
        prices_file: prices.yaml
        server: {{host: 127.0.0.1, port: {port}, watch_interval_s: 0.2}}
        auth: none
        providers:
          demo: {{kind: demo}}
          az:
            kind: azure
            base_url: http://127.0.0.1:9
            azure: {{entra_token_file: token}}
        """))
    return root


def start(root: Path, port: int) -> AbstractContextManager[ManagedProcess]:
    return serving([sys.executable, "-m", "gateway", "serve", "--policy", str(root), "--workers", "2"], port,
                   env={"TMPDIR": str(root.parent)})


def reload_triggers(port: int, tries: int = 24) -> set[str]:
    seen = set()
    for _ in range(tries):
        with httpx.Client(timeout=5) as client:  # a new connection each time: any worker may answer
            seen.add(client.get(f"http://127.0.0.1:{port}/readyz").json()["last_reload"]["trigger"])
    return seen


def kill_a_worker(server: ManagedProcess) -> int:
    workers = _workers(server.pgid)
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)  # as the OOM killer would
    return workers[0]


def test_a_worker_restarted_while_the_file_is_refused_serves_the_version_the_others_serve(tmp_path: Path) -> None:
    port = free_port()
    root = write_policy(tmp_path, port)
    with start(root, port) as server:
        first = versions_seen(port)
        assert len(first) == 1
        # a price change (the prices file only): every worker reloads to a second version
        prices = "version: 1\nprices:\n  demo-1: {input_per_mtok: 3, output_per_mtok: 4}\n"
        (tmp_path / "prices.yaml").write_text(prices)
        assert wait_for(lambda: len(versions_seen(port)) == 1 and versions_seen(port) != first)
        second = versions_seen(port, 24)
        # the include broken: refused by both workers, the second version serves on
        (tmp_path / "models.yaml").write_text("models:\n  demo: [\n")
        assert wait_for(lambda: server.text().count("policy reload refused") >= 2)
        killed = kill_a_worker(server)
        assert wait_for(lambda: len(_workers(server.pgid)) == 2 and killed not in _workers(server.pgid), 30)
        assert wait_for(lambda: "serving the last policy the workers accepted" in server.text(), 30)
        assert versions_seen(port, 24) == second  # the restarted worker too
        assert "start" in reload_triggers(port)  # its /readyz: the file refused at its start
        assert all(chat(port).status_code == 200 for _ in range(10))
        time.sleep(3)  # (a worker dying at start would have died again by now)
        log = server.text()
        assert "Traceback" not in log
        assert len(re.findall(r"\[\d+\] died", log)) == 1, log[-3000:]
        assert len(_workers(server.pgid)) == 2
        # the refused include's error, as `gateway check` prints it: file, line, message
        assert re.search(rf"policy refused: {re.escape(str(tmp_path / 'models.yaml'))}:\d+: ", log), log[-3000:]
        # the restarted worker watches the real files: a fix reloads every worker
        (tmp_path / "models.yaml").write_text("models:\n  demo: {provider: demo, model: demo-2}\n")
        assert wait_for(lambda: len(versions_seen(port)) == 1 and versions_seen(port) not in (first, second))
        assert len(versions_seen(port, 24)) == 1
    assert not group_members(server.pgid)


def test_a_worker_that_cannot_start_is_restarted_after_a_growing_wait(tmp_path: Path) -> None:
    """The token file gone, neither the file nor the last policy accepted can start a worker: it is restarted after
    1 s, 2 s, ... rather than at once; once the file is back, it serves again."""
    port = free_port()
    root = write_policy(tmp_path, port)
    with start(root, port) as server:
        assert chat(port).status_code == 200
        (tmp_path / "token").unlink()
        kill_a_worker(server)
        assert wait_for(lambda: "restarting it in 2 s" in server.text(), 40), server.text()[-8000:]
        log = server.text()
        assert "Traceback" not in log
        assert "the last policy accepted is refused too" in log
        assert str(tmp_path / "gateway-policy-") not in log  # (the snapshot's copy is named as the original)
        # the waits are kept: each restart comes no sooner than the wait announced before it
        stamps = _announced_waits(log)
        assert stamps, log[-3000:]
        for announced, waited in stamps:
            assert waited >= announced - 0.2, (announced, waited)
        (tmp_path / "token").write_text(TOKEN)
        assert wait_for(lambda: len(_workers(server.pgid)) == 2 and all(
            chat(port).status_code == 200 for _ in range(4)), 40)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    assert not group_members(server.pgid)


def _announced_waits(log: str) -> list[tuple[float, float]]:
    """Each announced wait before a restart, with the time until the restarted worker's first line."""
    waits = []
    announced: tuple[float, float] | None = None
    for line in log.splitlines():
        stamp = re.search(r'"ts":"[^"]*T(\d\d):(\d\d):(\d\d\.\d+)Z"', line)
        if stamp is None:
            continue
        at = int(stamp.group(1)) * 3600 + int(stamp.group(2)) * 60 + float(stamp.group(3))
        wait = re.search(r"restarting it in (\d+) s", line)
        if wait is not None:
            announced = (float(wait.group(1)), at)
        elif "policy refused:" in line and announced is not None:
            waits.append((announced[0], at - announced[1]))
            announced = None
    return waits
