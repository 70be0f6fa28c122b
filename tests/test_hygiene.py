"""The test helpers that keep the suite from leaking: `support.processes` and `support.leakcheck`."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import leakcheck
from tests.support.processes import group_members, running

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def test_a_chatty_process_never_blocks_and_its_output_stays_bounded() -> None:
    script = "import sys, time; sys.stdout.write('x' * 5_000_000); sys.stdout.flush(); print('done', flush=True); " \
             "sys.stderr.write('on stderr\\n'); sys.stderr.flush(); time.sleep(60)"
    with running([PY, "-c", script], output_limit=100_000) as proc:
        assert proc.wait_for_output("done", timeout=20), proc.text()[-200:]  # 5 MB went through the pipe
        assert proc.wait_for_output("on stderr", timeout=20)  # (read by another thread: no order between the two)
        assert len(proc.text()) <= 100_000 and proc.output.dropped >= 4_900_000
    assert proc.poll() is not None


def test_the_whole_group_goes_even_a_child_that_ignores_sigterm() -> None:
    child = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "pid = subprocess.Popen([sys.executable, '-c', "
             "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)']).pid; "
             "print(f'grandchild {pid}', flush=True); time.sleep(300)")
    started = time.monotonic()
    with running([PY, "-c", child], term_timeout=1, kill_timeout=10) as proc:
        assert proc.wait_for_output("\n", 20), proc.text()
        grandchild = int(proc.text().split()[1])
        assert sorted(proc.members()) == sorted([proc.pid, grandchild])
    assert time.monotonic() - started < 20
    assert not group_members(proc.pgid) and not _alive(grandchild)


def test_an_orphaned_member_is_stopped_even_after_its_parent_is_gone() -> None:
    parent = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])"
              ".pid, flush=True)")  # exits at once: its child is re-parented, but stays in the group
    # (and keeps the output pipe open: the readers must not wait for it)
    with running([PY, "-c", parent]) as proc:
        assert proc.wait(20) == 0 and proc.wait_for_output("\n", 20)
        orphan = int(proc.text().split()[0])
        assert _alive(orphan) and proc.members() == [orphan]
    assert not _alive(orphan)


def test_signals_reach_the_leader_or_the_group() -> None:
    with running([PY, "-c", "import time; print('up', flush=True); time.sleep(300)"]) as proc:
        assert proc.wait_for_output("up", 20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
        assert not proc.signal_group(signal.SIGTERM)  # nobody left


@pytest.fixture
def local_baseline() -> leakcheck.Baseline:
    """The session's baseline, but with what runs and listens now (session fixtures...) counted as existing."""
    base = leakcheck.session_start()
    return dataclasses.replace(base, existing=frozenset((p.pid, p.start) for p in leakcheck._processes().values()),
                               own_sockets=frozenset(leakcheck._socket_inodes(os.getpid())))


def test_the_leak_check_finds_an_orphan_outside_our_process_group(local_baseline: leakcheck.Baseline) -> None:
    spawn = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
             "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    orphan = int(subprocess.run([PY, "-c", spawn], capture_output=True, text=True, timeout=20).stdout)
    try:
        found = leakcheck.find_leaks(local_baseline, own_sockets=False)
        assert any(f"pid {orphan} (ppid" in line for line in found), found
    finally:
        leakcheck.cleanup(local_baseline)
    assert not _alive(orphan)
    assert leakcheck.find_leaks(local_baseline, own_sockets=False) == []


def test_the_leak_check_finds_ports_and_metrics_folders(local_baseline: leakcheck.Baseline) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert f"port still listening in the test process: 127.0.0.1:{port}" in \
            leakcheck.find_leaks(local_baseline, own_sockets=True)
    assert leakcheck.find_leaks(local_baseline, own_sockets=True) == []
    folder = local_baseline.session_tmp / "gateway-metrics-test"
    folder.mkdir()
    try:
        assert leakcheck.find_leaks(local_baseline, own_sockets=False) == [f"metrics folder left behind: {folder}"]
    finally:
        leakcheck.cleanup(local_baseline)
    assert not folder.exists()


def test_children_inherit_the_session_tmpdir_and_mark() -> None:
    base = leakcheck.session_start()
    env = subprocess.run([PY, "-c", "import os, tempfile; print(tempfile.gettempdir()); print(os.environ['"
                          + leakcheck.MARKER_ENV + "'])"], capture_output=True, text=True, timeout=20).stdout.split()
    assert env[0] == str(base.session_tmp) and base.token in env[1].split(":")


LEAKY_TEST = """\
import subprocess, sys

def test_leaves_a_process() -> None:
    pid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    open('leaked.pid', 'w').write(str(pid))
"""
PORT_TEST = """\
import socket
KEPT = []

def test_leaves_a_port() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    KEPT.append(server)
"""
CLEAN_TEST = "def test_nothing() -> None:\n    pass\n"
CONFTEST_HOOKS = "from tests.support.leakcheck import pytest_sessionfinish, pytest_sessionstart  # noqa: F401\n"


@pytest.mark.parametrize("style", ["conftest-hooks", "last-test-module"])
@pytest.mark.parametrize(("body", "fails_with"), [(CLEAN_TEST, None), (LEAKY_TEST, "process left running"),
                                                  (PORT_TEST, "port still listening in the test process")])
def test_a_leak_fails_the_run(tmp_path: Path, style: str, body: str, fails_with: str | None) -> None:
    (tmp_path / "test_a.py").write_text(body)
    if style == "conftest-hooks":
        (tmp_path / "conftest.py").write_text(CONFTEST_HOOKS)
    else:
        (tmp_path / "test_zz_hygiene.py").write_text((REPO / "tests" / "test_zz_hygiene.py").read_text())
    result = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                             "-c", os.devnull, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    output = result.stdout + result.stderr
    if fails_with is None:
        assert result.returncode == 0, output
        return
    assert result.returncode == 1, output
    assert fails_with in output, output
    if (tmp_path / "leaked.pid").exists():
        assert not _alive(int((tmp_path / "leaked.pid").read_text())), "the leak check did not clean up"
