"""Suite-end hygiene: no process, listening port or metrics folder of the test session may outlive it.

`session_start()` takes a baseline (the processes that exist, the test process's
listening sockets, the `gateway-metrics-*` folders) and marks the session: every
child inherits `GATEWAY_TEST_SESSION` (so that an orphan is still recognised
after it left our process group and was re-parented) and a private `TMPDIR` (so
that the metrics folders of `gateway serve --workers N` it starts are told
apart from those of other test runs on the same machine).

`find_leaks()` then lists, after that baseline:

- processes (not zombies) that descend from the test process, share its process
  group, belong to a group started by `tests.support.processes`, or carry the
  session's mark; with their listening ports;
- listening sockets of the test process itself (with `own_sockets=True`, for the
  very end, once session fixtures have stopped their servers);
- `gateway-metrics-*` folders in the session's TMPDIR (and, as a warning, new
  ones in the system's temp folder, which another run could have made).

Use either the hooks (tests/conftest.py: `from tests.support.leakcheck import
pytest_sessionfinish, pytest_sessionstart`) or `tests/test_zz_hygiene.py`, which
runs last; both fail the run when something leaked, and clean it up.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from tests.support.processes import STARTED_GROUPS

__all__ = [
    "MARKER_ENV",
    "Baseline",
    "ProcessInfo",
    "cleanup",
    "find_leaks",
    "pytest_sessionfinish",
    "pytest_sessionstart",
    "register_finish_check",
    "session_start",
]

MARKER_ENV = "GATEWAY_TEST_SESSION"
METRICS_GLOB = "gateway-metrics-*"
PLUGIN_NAME = "gateway-leakcheck"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    start: int  # clock ticks after boot: with the pid, identifies a process even after pid reuse
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} (ppid {self.ppid}, pgid {self.pgid}): {self.command[:200]}"


@dataclasses.dataclass
class Baseline:
    token: str
    pid: int
    pgid: int
    existing: frozenset[tuple[int, int]]  # (pid, start) of every process at the start
    own_sockets: frozenset[int]  # inodes of the test process's listening sockets at the start
    system_tmp: Path
    system_metrics_dirs: frozenset[str]
    session_tmp: Path
    finished: bool = False


_baseline: Baseline | None = None
_warned: set[Path] = set()  # system temp folders already warned about


def _processes() -> dict[int, ProcessInfo]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].decode().split()
        name = raw[raw.find(b"(") + 1:raw.rfind(b")")].decode(errors="replace")
        found[int(entry)] = ProcessInfo(int(entry), int(fields[1]), int(fields[2]), fields[0], int(fields[19]),
                                        command.strip() or f"[{name}]")
    return found


def _marked(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    for item in environ.split(b"\0"):
        if item.startswith(MARKER_ENV.encode() + b"="):
            return token in item.decode(errors="replace").partition("=")[2].split(":")
    return False


def _listening() -> dict[int, str]:
    """{socket inode: "address:port"} of every listening TCP socket on the machine."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A":
                address, _, port = parts[1].rpartition(":")
                sockets[int(parts[9])] = f"{_address(address)}:{int(port, 16)}"
    return sockets


def _address(hex_address: str) -> str:
    if len(hex_address) == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_address)))
    return "[ipv6]"


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def session_start() -> Baseline:
    """Take the session's baseline and mark the environment its children inherit (once per process)."""
    global _baseline
    if _baseline is not None:
        return _baseline
    system_tmp = Path(tempfile.gettempdir())  # also fixes this process's own temp folder before TMPDIR changes
    session_tmp = Path(tempfile.mkdtemp(prefix="gateway-test-tmp-"))
    atexit.register(shutil.rmtree, session_tmp, ignore_errors=True)  # also when no finish check runs
    token = uuid.uuid4().hex[:16]
    outer = os.environ.get(MARKER_ENV)
    os.environ[MARKER_ENV] = f"{outer}:{token}" if outer else token  # nested sessions keep the outer mark
    os.environ["TMPDIR"] = str(session_tmp)
    listening = _listening()
    _baseline = Baseline(
        token=token,
        pid=os.getpid(),
        pgid=os.getpgid(0),
        existing=frozenset((p.pid, p.start) for p in _processes().values()),
        own_sockets=frozenset(_socket_inodes(os.getpid()) & listening.keys()),
        system_tmp=system_tmp,
        system_metrics_dirs=frozenset(p.name for p in system_tmp.glob(METRICS_GLOB)),
        session_tmp=session_tmp,
    )
    return _baseline


def leaked_processes(baseline: Baseline) -> list[ProcessInfo]:
    processes = _processes()
    children: dict[int, list[int]] = {}
    for info in processes.values():
        children.setdefault(info.ppid, []).append(info.pid)
    descendants, stack = set(), [baseline.pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in descendants:
                descendants.add(child)
                stack.append(child)
    leaked = []
    for info in processes.values():
        if info.pid == baseline.pid or info.state in ("Z", "X") or (info.pid, info.start) in baseline.existing:
            continue
        if (info.pid in descendants or info.pgid == baseline.pgid or info.pgid in STARTED_GROUPS
                or _marked(info.pid, baseline.token)):
            leaked.append(info)
    return sorted(leaked, key=lambda p: p.pid)


def leaked_metrics_dirs(baseline: Baseline) -> tuple[list[Path], list[Path]]:
    """(folders in the session's TMPDIR, new folders in the system temp folder that may be another run's)."""
    ours = sorted(baseline.session_tmp.glob(METRICS_GLOB))
    maybe = sorted(p for p in baseline.system_tmp.glob(METRICS_GLOB) if p.name not in baseline.system_metrics_dirs)
    return ours, maybe


def find_leaks(baseline: Baseline, *, own_sockets: bool) -> list[str]:
    """Every leak found, one line each (empty: clean)."""
    listening = _listening()
    problems = []
    for info in leaked_processes(baseline):
        ports = sorted(listening[i] for i in _socket_inodes(info.pid) if i in listening)
        problems.append(f"process left running: {info.describe()}" + (f"; listening on {', '.join(ports)}"
                                                                         if ports else ""))
    if own_sockets:
        mine = sorted(listening[i] for i in _socket_inodes(baseline.pid) - baseline.own_sockets if i in listening)
        problems.extend(f"port still listening in the test process: {address}" for address in mine)
    ours, maybe = leaked_metrics_dirs(baseline)
    problems.extend(f"metrics folder left behind: {path}" for path in ours)
    unseen = [p for p in maybe if p not in _warned]
    if unseen:
        _warned.update(unseen)
        warnings.warn(f"new {METRICS_GLOB} folders in {baseline.system_tmp} (maybe another test run's): "
                      f"{', '.join(p.name for p in unseen)}", stacklevel=2)
    return problems


def cleanup(baseline: Baseline, timeout: float = 5.0) -> None:
    """Stop the session's leaked processes (TERM, then KILL) and remove its metrics folders."""
    leaked = leaked_processes(baseline)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = _still_alive(leaked)
        for info in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info.pid, sig)
        deadline = time.monotonic() + timeout
        while _still_alive(leaked) and time.monotonic() < deadline:
            for info in leaked:  # reap our own children
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(info.pid, os.WNOHANG)
            time.sleep(0.05)
    for path in leaked_metrics_dirs(baseline)[0]:
        shutil.rmtree(path, ignore_errors=True)


def _still_alive(infos: list[ProcessInfo]) -> list[ProcessInfo]:
    now = _processes()
    return [i for i in infos if (p := now.get(i.pid)) is not None and p.start == i.start and p.state not in "ZX"]


def _report(config: Any, problems: list[str]) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    lines = ["the test session leaked:", *(f"  {p}" for p in problems)]
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", "leak check failed", red=True, bold=True)
        for line in lines:
            reporter.write_line(line)
    else:
        print("\n".join(lines))


def finish(session: Any) -> None:
    """The full check once everything (session fixtures included) has stopped; fails the run on a leak."""
    baseline = session_start()
    if baseline.finished:
        return
    baseline.finished = True
    problems = find_leaks(baseline, own_sockets=True)
    if problems:
        _report(session.config, problems)
        session.exitstatus = 1  # pytest.ExitCode.TESTS_FAILED
        cleanup(baseline)
    shutil.rmtree(baseline.session_tmp, ignore_errors=True)


class _FinishCheck:
    def pytest_sessionfinish(self, session: Any) -> None:
        finish(session)


def register_finish_check(config: Any) -> None:
    """Run `finish` at the end of this session (for a check that starts from a test, not a conftest)."""
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        config.pluginmanager.register(_FinishCheck(), PLUGIN_NAME)


# Hooks, for `from tests.support.leakcheck import pytest_sessionfinish, pytest_sessionstart` in a conftest.

def pytest_sessionstart(session: Any) -> None:
    session_start()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    finish(session)
