"""A private redis-server (or Sentinel) for fault tests: free port, temp dir, own process group, no leftovers.

Each server runs in a new session, so `stop()` signals its whole process group; `close()` stops it and
removes the directory. `pause()`/`resume()` (SIGSTOP/SIGCONT) make a server that accepts connections but
never answers, the hardest case for timeouts. `start()` again reuses the same port, as a restart would.

`sweep_test_keys(url)` deletes what tests left under their key prefixes in the suite's Redis
(`GATEWAY_TEST_REDIS_URL`), which tests/conftest.py runs once the session has stopped everything it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import redis

__all__ = ["REDIS_SERVER", "TEST_KEY_PATTERNS", "RedisServer", "free_port", "suite_redis_url", "sweep_test_keys"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# The key prefixes tests give the suite's Redis (each with a uuid of its own: `gwtest:<hex>:`, `gwtest-gauges:<hex>:`,
# `{gwtest<hex>}:`, `gw-test-warm-<hex>:`, `b13:<12 hex>:`), as SCAN patterns: nothing else is ever swept.
TEST_KEY_PATTERNS = ("gwtest*", "{gwtest*", "gw-test-*", "b13:" + "[0-9a-f]" * 12 + ":*")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; `cluster=True` makes it a one-node cluster owning every slot."""

    def __init__(self, *, cluster: bool = False, unix_socket: bool = False, sentinel_of: RedisServer | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-test-"))
        self.port = free_port()
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        self.socket_path = self.dir / "redis.sock" if unix_socket else None
        self.sentinel_of = sentinel_of
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        if self.sentinel_of is not None:
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor gwmaster 127.0.0.1 {self.sentinel_of.port} 1\n"
                "sentinel down-after-milliseconds gwmaster 60000\n"
            )
            return [REDIS_SERVER, str(conf), "--sentinel"]
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                     "--cluster-port", str(self.bus_port)]  # the default, port + 10000, may not exist
        if self.socket_path is not None:
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        return args

    def start(self, timeout_s: float = 5.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            self._args(), start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    client.ping()
                    break
                except redis.RedisError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        log = self._log_tail()
                        self.close()
                        raise RuntimeError(f"redis-server did not start:\n{log}") from None
                    time.sleep(0.02)
            if self.cluster:
                self._own_every_slot(client, deadline)
        finally:
            client.close()

    def _log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "redis.log").read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return "(no log)"

    def _own_every_slot(self, client: redis.Redis, deadline: float) -> None:
        def info() -> bytes:
            return bytes(client.execute_command("CLUSTER", "INFO"))  # type: ignore[no-untyped-call]

        if b"cluster_slots_assigned:16384" not in info():
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]
        while b"cluster_state:ok" not in info():
            if time.monotonic() > deadline:
                raise RuntimeError("one-node cluster did not become ok")
            time.sleep(0.02)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the whole process group at once (a crash, not a shutdown) and reap it."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def suite_redis_url() -> Iterator[str]:
    """The suite's Redis: `GATEWAY_TEST_REDIS_URL` (tests/run.sh sets it), else a private server for the block."""
    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def sweep_test_keys(url: str, patterns: tuple[str, ...] = TEST_KEY_PATTERNS) -> list[str]:
    """Delete every key of `url`'s database under the tests' prefixes (`patterns`); the keys deleted, sorted.

    A test deletes its prefix's keys when it ends, but a gateway still running then writes more: the ledger
    flushes its usage counters when it stops, and a test that deleted before it stopped its gateway left them
    (`gwtest-gauges:<hex>:acct:usage:...`). Run once everything the session started has stopped, this leaves no
    key under the tests' prefixes, whichever test was late (an earlier run's leftovers go too); nothing else is
    touched (the suite's Redis may be a machine's own, `tests/run.sh`)."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    deleted: list[str] = []
    try:
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(keys), 1000):
                client.unlink(*keys[start:start + 1000])
            deleted.extend(key.decode(errors="replace") for key in keys)
    finally:
        client.close()
    return sorted(set(deleted))
