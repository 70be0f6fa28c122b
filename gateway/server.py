"""Run the gateway under uvicorn: one process, or N workers sharing one socket.

The entry point owns the process, so process-wide set-up happens here, once per
process: logging (in every worker too), signal handlers, and `gc.freeze()` and the
collector's thresholds after start-up. Settings reach worker processes inside uvicorn's pickled config (the
app factory is a `functools.partial` over `ServeSettings`), not through the
environment; the one exception is `PROMETHEUS_MULTIPROC_DIR`, which
prometheus_client reads from the environment at import. Among them is the `Listener` (address,
`--allow-open`, workers): each worker checks the policy it loads against it, and so does every
reload, with the rules `gateway serve` applied at start (`reload.serving_refusals`).

Shutdown: SIGTERM marks the gateway draining (`/readyz` answers 503) and, after
`server.drain_delay_s`, stops accepting connections; requests in flight, streams
included, get `server.drain_timeout_s` to finish; at that deadline the gateway
ends the rest itself (streams with an error event, others with 503) before
uvicorn would cancel them; SIGINT skips the delay, and so does one that comes during it (the deadline moves
earlier with it). A clean drain exits with status 0. SIGHUP reloads the
policy (with several workers, the supervisor passes it to every worker). A start that fails (uvicorn's
STARTUP_FAILURE) exits with status 3, with one worker or several.

Metrics: a `PROMETHEUS_MULTIPROC_DIR` the operator sets is claimed, and emptied of an earlier run's files
(`_claim_metrics_folder`); without one, several workers get a private folder, removed at exit.

Several workers: the supervisor and what a worker does at its start are in `workers.py`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from .app import Gateway, create_app, served_app
from .direct_routes import ASGIApp
from .http_server import server_limits
from .policy import Policy
from .reload import Listener, fingerprints
from .telemetry.logs import configure_logging, count_dropped_lines
from .workers import Supervisor, WorkerGateway, keep, read_policy

__all__ = ["ServeSettings", "build_served_app", "serve", "uvicorn_config"]

log = logging.getLogger("gateway.server")
_PR_SET_PDEATHSIG = 1
# The collector's thresholds once the gateway serves (`gc.set_threshold`; Python's are 700, 10, 10). A young
# generation of 700 is collected several times a second with many streams open, and each collection also walks
# the older objects it makes reachable: at 1,000 slow streams, 2 to 4 us of the ~40 us of CPU per forwarded
# event went to the collector (bench/scale.py, A/B). Most of a request's objects are freed by their reference
# counts, so a larger young generation mostly delays cycles (failed requests' tracebacks) by a few seconds.
_GC_THRESHOLDS = (20_000, 20, 20)
_GRACE_S = 2.0  # uvicorn's own deadline sits this far after the gateway's, so the gateway cuts first
# prometheus_client's files in a multiprocess folder: `<type>_<pid>.db`, a gauge's type with its mode (values.py)
_METRICS_FILE = re.compile(r"(counter|histogram|summary|gauge_(live)?(all|min|max|sum|mostrecent))_(\d+)\.db")
_METRICS_LOCK = "gateway.lock"
@dataclass(frozen=True, slots=True)
class ServeSettings:
    policy_path: Path
    listener: Listener  # what every policy this process serves must suit, the first and each reloaded one
    supervised: bool = False  # a worker of `--workers N`: reloads are passed to every worker
    snapshots: Path | None = None  # with workers: the folder keeping the last policy they accepted (`keep_snapshot`)


def build_served_app(settings: ServeSettings) -> ASGIApp:
    """The app factory uvicorn calls in each serving process.

    The policy is read again here, after `gateway serve` checked its own reading: the file may have
    changed since, and a worker the supervisor restarts reads it anew. So it is checked again. A policy
    `gateway serve` would refuse stops the process rather than serving, unless the workers keep a snapshot of
    the last one they accepted: the one its siblings serve (they refused the file too), which it then serves.
    """
    configure_logging()
    early: list[int] = []  # a SIGHUP before the process serves (its default action ends the process): kept
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: early.append(signum))
        # A worker starts with SIGHUP blocked (`Supervisor._spawn`): one that came while it imported, delivered now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    before = fingerprints([settings.policy_path])  # (a change after this is one the file watcher reloads)
    policy, refused = read_policy(settings.policy_path, settings.listener, settings.snapshots)
    options: dict[str, Any] = {"source": settings.policy_path, "listener": settings.listener, "read_from": before}
    gateway = Gateway(policy, **options) if settings.snapshots is None else \
        WorkerGateway(policy, snapshots=settings.snapshots, **options)
    count_dropped_lines(gateway.metrics.telemetry_dropped)  # the log lines a stalled stderr reader cost
    if isinstance(gateway, WorkerGateway):
        gateway.begin(refused)
    if settings.supervised:
        parent = os.getppid()
        gateway.reload_requested = lambda: os.kill(parent, signal.SIGHUP)
        _die_with(parent)
    process = _ServedProcess(gateway, early)
    return served_app(create_app(gateway, on_startup=[process.started]))


def _die_with(parent: int) -> None:
    """Linux: a worker whose supervisor dies (even by SIGKILL) gets SIGTERM and drains, rather
    than serving on as an orphan that nothing will ever stop."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


class _ServedProcess:
    """Process-wide set-up for the one gateway this process serves."""

    def __init__(self, gateway: Gateway, early_hups: list[int] | None = None) -> None:
        self.gateway = gateway
        self.loop: asyncio.AbstractEventLoop | None = None
        self._early_hups = early_hups if early_hups is not None else []  # SIGHUPs while starting: a reload once up
        # The server's own drain deadline is set at start (`uvicorn_config`, this policy's `drain_timeout_s` plus
        # `_GRACE_S`): a reload to a longer one cannot move it, so the gateway cuts at the earlier of the two.
        self._started_drain_s = gateway.runtime.policy.server.drain_timeout_s
        self._deadline: asyncio.TimerHandle | None = None  # the drain deadline's `cut_all`, once set

    def started(self) -> None:
        self.loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous = signal.getsignal(sig)
                signal.signal(sig, functools.partial(self._on_stop, previous=previous))
            signal.signal(signal.SIGHUP, self._on_hup)
            if self._early_hups:  # the file may have changed since it was read: read it again
                self._on_hup(signal.SIGHUP, None)
        # Everything built so far lives as long as the process: move it out of the collector's
        # reach, so that full collections stay short (bench: p99 at 16 connections ~30 ms -> ~6 ms).
        gc.collect()
        gc.freeze()
        gc.set_threshold(*_GC_THRESHOLDS)

    def _on_stop(self, signum: int, frame: FrameType | None, previous: Any) -> None:
        loop = self.loop
        assert loop is not None
        first = not self.gateway.draining
        if signum == signal.SIGTERM and not first:
            # a SIGTERM while draining changes nothing: sent to a process group (systemd, dumb-init) it reaches a
            # worker twice, from the kernel and from its supervisor, and the second skipped the delay (only SIGINT
            # does: `_cut_at`)
            return
        self.gateway.begin_drain()
        server = self.gateway.runtime.policy.server
        delay = server.drain_delay_s if signum == signal.SIGTERM else 0.0

        def stop_accepting() -> None:
            if callable(previous):
                previous(signum, frame)
            self._cut_at(loop.time() + min(server.drain_timeout_s, self._started_drain_s))

        loop.call_soon_threadsafe(loop.call_later, delay, stop_accepting)

    def _cut_at(self, when: float) -> None:
        """The drain deadline at `when`, or earlier if one is set already: a signal that ends a SIGTERM's delay
        (SIGINT) starts the server's own deadline at once, and the gateway's must come before it."""
        loop = self.loop
        assert loop is not None
        if self._deadline is not None:
            if self._deadline.when() <= when:
                return
            self._deadline.cancel()
        self._deadline = loop.call_at(when, self.gateway.cut_all)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        loop = self.loop
        assert loop is not None
        loop.call_soon_threadsafe(lambda: self.gateway._spawn(self.gateway.reload("signal")))


def uvicorn_config(app: Any, policy: Policy, **overrides: Any) -> uvicorn.Config:
    """The server settings, shared by `gateway serve` and the test harness."""
    server = policy.server
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "loop": "uvloop" if _has("uvloop") else "asyncio",
        "lifespan": "on",
        "interface": "asgi3",  # not guessed: the served app's `__call__` returns a coroutine (`app.served_app`)
        "access_log": False,
        "log_level": "info",
        "timeout_graceful_shutdown": server.drain_timeout_s + _GRACE_S,
        "server_header": False,
        "proxy_headers": False,
        "log_config": None,
        # The supervisor kills a worker that does not answer its ping within this; a worker answers only once
        # it has imported the gateway, which takes seconds on a loaded machine (uvicorn's default is 5).
        "timeout_worker_healthcheck": 30,
        **server_limits(
            max_header_bytes=server.max_header_bytes, header_timeout_s=server.header_timeout_s,
            body_timeout_s=server.body_timeout_s, max_connections=server.max_connections,
            max_requests=server.max_requests, keep_alive_s=30, send_timeout_s=server.send_timeout_s,
        ),
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def serve(policy_path: Path, policy: Policy, listener: Listener, port: int | None) -> int:
    """Serve `policy` (read from `policy_path`, and checked against `listener` by the caller) until stopped: the
    exit status, 0 after a clean drain, 3 when the first start failed, 2 when the metrics folder set is refused."""
    # Absolute, not resolved: a ConfigMap's file is a symlink through `..data` into a timestamped folder that the
    # kubelet deletes on the next update; the path as given is the one that keeps naming the current policy.
    policy_path = policy_path.absolute()
    metrics_dir = None
    metrics_lock = None
    workers = listener.workers
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics_lock = _claim_metrics_folder(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
        if metrics_lock is None:
            return 2
    elif workers > 1:
        metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    snapshots = None
    if workers > 1:  # the last policy accepted, for a worker restarted while the file is refused
        snapshots = Path(tempfile.mkdtemp(prefix="gateway-policy-"))
        keep(policy, snapshots)
    settings = ServeSettings(policy_path, listener, supervised=workers > 1, snapshots=snapshots)
    config = uvicorn_config(
        functools.partial(build_served_app, settings), policy, factory=True, workers=workers,
        host=listener.host, port=port or policy.server.port,
    )
    _raise_open_file_limit(policy.server.max_connections)
    log.info("serving %s on %s:%s with %d worker(s)", policy_path, config.host, config.port, workers)
    # uvicorn re-raises the signal that stopped it once it has drained; with these handlers in
    # place that re-raise is a no-op, so a clean drain exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        if workers == 1:
            uvicorn.Server(config).run()  # (a failed start: SystemExit(STARTUP_FAILURE))
            return 0
        supervisor = Supervisor(config, sockets=[config.bind_socket()])
        supervisor.run()
        return STARTUP_FAILURE if supervisor.start_failed else 0
    finally:
        for folder in (metrics_dir, snapshots):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        if metrics_lock is not None:
            metrics_lock.close()


def _claim_metrics_folder(folder: Path) -> IO[str] | None:
    """The operator's `PROMETHEUS_MULTIPROC_DIR`, held for this gateway (its lock file, open until it exits) and
    emptied of prometheus_client's files; None, with the reason on stderr, when it cannot be.

    Files left by a run that was killed were summed by every later one: its workers' live gauges (requests in flight,
    breaker states, the store's health) never went away, and alerts on them kept firing. They are all removed, the
    counters' and histograms' too, so that a set folder holds one run's metrics, as the private one does.
    Two gateways on one folder by mistake would each show the sum of both and each remove the other's files at
    its start: the folder is claimed with an exclusive `flock` on `gateway.lock` in it, which the kernel drops when
    the process ends however it ends, and a second gateway is refused (status 2) while the first runs. Not
    refusing a folder that is not empty: after a kill (an OOM-killed container keeps its emptyDir) the gateway would
    never start again without a hand. Not removing only the files of processes that are gone: a container
    restarted numbers its processes from 1 again, so a new worker may have a dead one's pid (and would carry on the
    values in its file), and pids mean nothing to another container sharing the volume. (The workers of a killed
    supervisor drain before they exit, `_die_with`: what they write to removed files is no longer read.)"""
    import fcntl

    try:  # not through a symbolic link (one planted there would have the gateway truncate what it points to)
        fd = os.open(folder / _METRICS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        lock = os.fdopen(fd, "r+")
    except OSError as exc:
        print(f"gateway: PROMETHEUS_MULTIPROC_DIR: {exc}", file=sys.stderr)
        return None
    if not stat.S_ISREG(os.fstat(lock.fileno()).st_mode):
        lock.close()
        print(f"gateway: PROMETHEUS_MULTIPROC_DIR {folder}: {_METRICS_LOCK} is not a regular file", file=sys.stderr)
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        print(f"gateway: PROMETHEUS_MULTIPROC_DIR {folder} is in use by another gateway (pid {holder}): give each "
              "gateway a folder of its own", file=sys.stderr)
        return None
    except OSError as exc:  # (a file system without locks)
        lock.close()
        print(f"gateway: PROMETHEUS_MULTIPROC_DIR {folder} cannot be locked: {exc}", file=sys.stderr)
        return None
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")  # (named to the next gateway refused)
        lock.flush()
        _remove_metrics_files(folder)
    except OSError as exc:  # (a file another user owns in a sticky folder, a folder this user cannot write)
        lock.close()
        print(f"gateway: PROMETHEUS_MULTIPROC_DIR {folder} cannot be emptied of an earlier run's files: {exc}",
              file=sys.stderr)
        return None
    return lock


def _remove_metrics_files(folder: Path) -> None:
    """prometheus_client's files in `folder`, and no other file. This process's own too: it has opened none yet
    (its `Metrics` is made later), and one named with its pid is a killed run's (a container's gateway is pid 1
    again after a restart, and would carry on that run's values)."""
    for entry in folder.iterdir():
        if _METRICS_FILE.fullmatch(entry.name) is not None:
            entry.unlink(missing_ok=True)


def _raise_open_file_limit(max_connections: int) -> None:
    """Each client connection may hold an upstream one: raise the soft descriptor limit (inherited
    by workers) toward the hard one, so that `max_connections` is not cut short by `ulimit -n`."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * max_connections + 1024
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
