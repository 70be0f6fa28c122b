"""Claiming an operator's `PROMETHEUS_MULTIPROC_DIR` (`server._claim_metrics_folder`) and the supervisor's first-start
bookkeeping after SIGTTOU and SIGTTIN: unit tests of pure logic, on a folder of their own and fake workers (the end
to end cases are in `test_serve_leftovers.py`, `test_workers_supervisor.py`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import uvicorn

from gateway.server import _claim_metrics_folder
from gateway.workers import Supervisor


def test_a_killed_runs_files_named_with_this_pid_are_removed(tmp_path: Path) -> None:
    """A container's gateway is pid 1 again after a restart: the killed run's files bear its pid, and were kept
    (taken for its own), so its in-flight gauge carried on."""
    pid = os.getpid()
    for name in (f"gauge_livesum_{pid}.db", f"counter_{pid}.db", "histogram_7.db", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    lock = _claim_metrics_folder(tmp_path)
    assert lock is not None
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.lock", "notes.txt"]
    finally:
        lock.close()


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(tmp_path: Path, capsys: Any) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("important data")
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "gateway.lock").symlink_to(victim)
    (folder / "counter_9.db").write_bytes(b"x")
    assert _claim_metrics_folder(folder) is None
    assert victim.read_text() == "important data"
    assert (folder / "counter_9.db").exists()  # nothing removed for a folder not claimed
    assert "PROMETHEUS_MULTIPROC_DIR" in capsys.readouterr().err


def test_a_file_that_cannot_be_removed_is_a_clear_refusal_not_a_traceback(tmp_path: Path, capsys: Any) -> None:
    """(A directory named as a metrics file stands in for another user's file in a sticky folder: root, which the
    tests may run as, may remove any file.)"""
    (tmp_path / "counter_9.db").mkdir()
    (tmp_path / "counter_9.db" / "inside").write_bytes(b"x")
    assert _claim_metrics_folder(tmp_path) is None
    err = capsys.readouterr().err
    assert "cannot be emptied of an earlier run's files" in err and "Traceback" not in err


class _Worker:
    def __init__(self, pid: int) -> None:
        self.pid, self.exitcode, self.alive = pid, None, True

    def is_alive(self, timeout: float = 5) -> bool:
        return self.alive

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self) -> None: ...


class _Supervisor(Supervisor):
    """Workers that are only their bookkeeping: nothing is started."""

    pids = iter(range(1000, 2000))

    def _spawn(self) -> Any:
        return _Worker(next(self.pids))


def test_a_worker_added_by_sigttin_in_a_slot_sigttou_emptied_is_no_first_start() -> None:
    """Its failure to start (exit status 3) is retried as a restart's; it stopped the whole gateway, exit 3."""
    supervisor = _Supervisor(uvicorn.Config(app=None, workers=2), sockets=[])
    supervisor.init_processes()
    supervisor.handle_ttou()  # uvicorn's: the last slot's worker stopped, the slot dropped
    supervisor.handle_ttin()  # a new worker in that slot
    added = supervisor.processes[1]
    added.alive, added.exitcode = False, 3
    supervisor.keep_subprocess_alive()
    assert not supervisor.start_failed and not supervisor.should_exit.is_set()
    assert supervisor.processes[1] is not added  # replaced (at once or after its wait)
