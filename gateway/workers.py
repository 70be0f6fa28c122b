"""Several workers (`gateway serve --workers N`): uvicorn's supervisor as the gateway runs it, and what a worker
does with the policy at its start.

The supervisor restarts a worker that dies. The restarted worker reads the policy file again; when the file has
been refused since (a reload of it was refused, and its siblings serve the last good policy), it serves the last
policy the workers accepted, kept in a private folder (`reload.keep_snapshot`), the version its siblings serve,
rather than dying at start and being restarted again and again. A worker that dies soon after its start is
restarted after a wait that doubles each time, so that one that cannot start at all does not burn a core. Only the
first start's failure (uvicorn's STARTUP_FAILURE: the app, TLS or the socket cannot work) stops the supervisor, and
`gateway serve` exits 3 as with one worker; a restarted worker that fails so (its payload-log folder removed since)
is one dying young, retried while the others serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from .app import Gateway
from .policy import Policy, PolicyError, load_policy
from .reload import Listener, keep_snapshot, load_snapshot, serving_refusals

__all__ = ["Refused", "Supervisor", "WorkerGateway", "keep", "read_policy"]

log = logging.getLogger("gateway.server")
# A worker that dies within `_YOUNG_S` of its start, after one that did too, is restarted after a wait, doubled at
# each such death from the first to the longest: one that cannot start at all is tried twice a minute, not twice a
# second. A worker's first death (a crash, an OOM kill) restarts it at once, as uvicorn does.
_YOUNG_S = 30.0
_RESTART_WAIT_S = (1.0, 30.0)


class Refused(NamedTuple):
    """Why the policy file was refused at a worker's start, and what the refused version read or looked for."""

    errors: list[str]
    watch: Sequence[str]
    missing: Collection[str] = ()


def read_policy(path: Path, listener: Listener, snapshots: Path | None) -> tuple[Policy, Refused | None]:
    """The policy file's, checked as `gateway serve` checked it; refused, the last one the workers accepted (kept
    in `snapshots`: `_last_accepted`) with why the file was refused."""
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        refused = Refused([str(issue) for issue in exc.issues], exc.watch, exc.missing)
    else:
        refusals = serving_refusals(policy, listener)
        if not refusals:
            return policy, None
        refused = Refused([f"{path}: {refusal}" for refusal in refusals], policy.watch)
    return _last_accepted(path, listener, snapshots, refused.errors), refused


def _last_accepted(path: Path, listener: Listener, snapshots: Path | None, errors: list[str]) -> Policy:
    """The policy file is refused: the last policy the workers accepted, if they keep one, else the process ends
    (status 2). The file's issues are logged one a line, as `gateway check` prints them, never as a traceback."""
    for issue in errors:
        log.error("gateway: policy refused: %s", issue)
    kept = None
    if snapshots is not None:
        try:
            kept = load_snapshot(snapshots, path)
        except PolicyError as exc:
            for problem in exc.issues:
                log.error("gateway: the last policy accepted is refused too: %s", problem)
    if kept is None or serving_refusals(kept, listener):
        raise SystemExit(2)
    log.warning("gateway: serving the last policy the workers accepted, %s, until %s is fixed", kept.version,
                path)
    return kept


class WorkerGateway(Gateway):
    """A worker's gateway: each policy it puts in force is kept for the workers restarted after it."""

    def __init__(self, policy: Policy, *, snapshots: Path, **options: Any) -> None:
        super().__init__(policy, **options)
        self.snapshots = snapshots

    def begin(self, refused: Refused | None) -> None:
        """The policy it starts with, kept; or, when that is the last one accepted because the file was `refused`,
        the file watched (and shown in `/readyz`) as a refused reload leaves it."""
        if refused is None:
            self.keep()
            return
        self._watch_refused(refused.watch, refused.missing)
        self.last_reload = {"result": "invalid", "trigger": "start", "version": self.runtime.policy.version,
                            "errors": refused.errors}

    def keep(self) -> None:
        keep(self.runtime.policy, self.snapshots)

    async def reload(self, trigger: str) -> dict[str, Any]:
        result = await super().reload(trigger)
        if result["result"] == "ok":
            await asyncio.to_thread(self.keep)
        return result


def keep(policy: Policy, snapshots: Path) -> None:
    """`policy` kept for the workers restarted after it (`reload.keep_snapshot`); a failure is logged."""
    try:
        keep_snapshot(policy, snapshots)
    except (OSError, ValueError):  # (a file gone, or no longer text, since it was read: not kept)
        log.warning("could not keep policy %s for restarted workers", policy.version, exc_info=True)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, except that SIGHUP reloads every worker's policy instead of
    restarting the workers (a restart would drop their streams), that a worker dying soon after its
    start is restarted after a wait (`_YOUNG_S`), that only a failed first start stops it (`start_failed`), and
    that it starts its workers its own way (`_spawn`)."""

    def __init__(self, config: uvicorn.Config, sockets: list[Any]) -> None:
        super().__init__(config, sockets)
        self.start_failed = False  # a worker of the first start failed to start: stopped (`gateway serve` exits 3)
        self._first: set[int] = set()  # worker slots still holding the worker of the first start
        self._born: dict[int, float] = {}  # worker slot -> when its process started
        self._young: dict[int, int] = {}  # worker slot -> its workers' deaths in a row within `_YOUNG_S` of start
        self._due: dict[int, float] = {}  # worker slot -> when its dead worker is restarted

    def init_processes(self) -> None:
        self.processes = [self._spawn() for _ in range(self.processes_num)]
        self._born = dict.fromkeys(range(len(self.processes)), time.monotonic())
        self._first = set(range(len(self.processes)))

    def keep_subprocess_alive(self) -> None:
        """uvicorn's restart of a dead worker, but after a wait when it died young (a worker that cannot start, a
        crash at start, restarted at once, looped: 15 deaths and 28 tracebacks in 20 s), and then the dead
        worker's live gauges (`livesum`: requests in flight, pool waits, pending counters; `livemax`: breaker
        states; `livemin`: the store's health; `livemostrecent`: the budgets left) dropped from `/metrics`: left,
        a worker killed with 5 streams open added 5 in flight to every scrape for good. (`gateway_policy_info` is
        per process, in no file.)"""
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            due = self._due.get(idx)
            if due is not None:
                if time.monotonic() >= due and not self.should_exit.is_set():
                    del self._due[idx]
                    self._restart(idx)
                continue
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # (hung: killed)
            process.join()
            if process.exitcode == STARTUP_FAILURE and idx in self._first:  # the app, TLS or socket cannot work
                log.error("worker [%s] failed to start; stopping", process.pid)
                self.start_failed = True
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            self._replace(idx, process)

    def _replace(self, idx: int, dead: Process) -> None:
        """`dead`'s live gauges dropped, and a worker started in its place: at once, or after a wait when it died
        young (a restarted worker that failed to start included: the others serve on meanwhile)."""
        if dead.pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            mark_process_dead(dead.pid)  # type: ignore[no-untyped-call]
        lived = time.monotonic() - self._born.get(idx, 0.0)
        young = self._young[idx] = self._young.get(idx, 0) + 1 if lived < _YOUNG_S else 0
        wait = 0.0 if young < 2 else min(_RESTART_WAIT_S[0] * 2 ** (young - 2), _RESTART_WAIT_S[1])
        if wait:
            log.warning("worker [%s] died %.1f s after it started (exit status %s); restarting it in %.0f s",
                        dead.pid, lived, dead.exitcode, wait)
            self._due[idx] = time.monotonic() + wait
        else:
            log.info("Child process [%s] died", dead.pid)  # (uvicorn's words)
            self._restart(idx)

    def _restart(self, idx: int) -> None:
        self.processes[idx] = self._spawn()
        self._born[idx] = time.monotonic()
        self._first.discard(idx)

    def _spawn(self) -> Process:
        """A worker started, with SIGHUP blocked: it inherits the mask, so that a SIGHUP passed on to it while it
        imports the gateway waits until it has its handler (`server.build_served_app` unblocks it), where SIGHUP's
        default action killed it. Then this process's copy of the worker's end of their ping pipe is closed (the
        worker has its own): kept, it hid the pipe's end when the worker died, and the supervisor, waiting for the
        answer to its ping to a starting worker, saw it dead only at the ping's timeout (30 s), handling no signal
        meanwhile."""
        process = Process(self.config, self.sockets)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        process.child_conn.close()
        return process

    def handle_ttin(self) -> None:
        """uvicorn's one worker more, started as the others are."""
        log.info("Received SIGTTIN, increasing the number of processes.")
        self.processes_num += 1
        self.processes.append(self._spawn())
        idx = len(self.processes) - 1
        self._born[idx] = time.monotonic()
        self._due.pop(idx, None)  # (a slot's restart and deaths from before a SIGTTOU took it)
        self._young.pop(idx, None)
        self._first.discard(idx)  # (not the first start's: its failure to start is retried, as a restart's)

    def terminate_all(self) -> None:
        """uvicorn's stop of every worker (each drains), then this process's copy of the listening socket closed:
        kept, it held the socket open after every worker had closed its own, so that the kernel went on accepting
        connections that no process would read (a client hung until the last worker exited, then was reset),
        where a closed socket refuses them (README "Shutdown")."""
        super().terminate_all()
        for listening in self.sockets:
            listening.close()

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:  # (a dead one's pid may be another's now)
                try:
                    os.kill(process.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass
