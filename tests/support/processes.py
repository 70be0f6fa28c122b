"""Child processes for tests that cannot leak: own process group, drained output, group-wide stop.

`running(args)` starts a command in a new session (so in its own process group,
with everything it forks), reads its stdout and stderr from threads into a
bounded buffer (a chatty server never blocks on a full pipe, and a test can
read or wait for its output), and on exit stops the whole group: SIGTERM, a
wait, SIGKILL after a timeout, and a wait until no member of the group is left.
A uvicorn supervisor's workers and multiprocessing's resource tracker are in
that group, so they go with it even when the supervisor itself died first.

Every group started here is recorded in `STARTED_GROUPS`, which the suite-end
leak check (`tests/support/leakcheck.py`) looks at.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["STARTED_GROUPS", "GroupStillAlive", "ManagedProcess", "OutputBuffer", "group_members", "running"]

DEFAULT_OUTPUT_LIMIT = 1 << 20  # bytes kept per process (the most recent ones)
STARTED_GROUPS: set[int] = set()  # every process group started by `running`, for the leak check


class GroupStillAlive(RuntimeError):
    """A process group outlived SIGKILL (should not happen; means a process escaped or is stuck in the kernel)."""


class OutputBuffer:
    """The last `limit` bytes written to it, and a way to wait for some text to appear."""

    def __init__(self, limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.dropped = 0  # bytes discarded from the front to stay within the limit
        self._data = bytearray()
        self._changed = threading.Condition()
        self._open_writers = 0

    def write(self, chunk: bytes) -> None:
        with self._changed:
            self._data += chunk
            excess = len(self._data) - self.limit
            if excess > 0:
                del self._data[:excess]
                self.dropped += excess
            self._changed.notify_all()

    def text(self) -> str:
        with self._changed:
            return self._data.decode("utf-8", errors="replace")

    def wait_for(self, needle: str, timeout: float) -> bool:
        """True once `needle` is in the kept output; False after `timeout` s or when every writer closed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while needle.encode() not in self._data:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open_writers == 0:
                    return needle.encode() in self._data
                self._changed.wait(remaining)
            return True

    def _drain(self, pipe: IO[bytes]) -> None:
        try:
            while chunk := os.read(pipe.fileno(), 65536):
                self.write(chunk)
        except (OSError, ValueError):  # closed under us
            pass
        finally:
            with self._changed:
                self._open_writers -= 1
                self._changed.notify_all()

    def attach(self, pipe: IO[bytes], name: str) -> threading.Thread:
        with self._changed:
            self._open_writers += 1
        thread = threading.Thread(target=self._drain, args=(pipe,), name=f"drain-{name}", daemon=True)
        thread.start()
        return thread


def _stat_fields(pid: str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2:].decode().split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`. Falls back to `killpg(pgid, 0)` without /proc."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


class ManagedProcess:
    """A started command: its `Popen`, its process group, and its drained output."""

    def __init__(self, args: Sequence[str], *, cwd: Path | str | None, env: Mapping[str, str],
                 output_limit: int) -> None:
        self.args = list(args)
        self.output = OutputBuffer(output_limit)  # stdout and stderr, interleaved as they arrive
        self.process = subprocess.Popen(self.args, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.pid = self.process.pid
        self.pgid = self.pid  # a new session's leader leads its own process group
        STARTED_GROUPS.add(self.pgid)
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [self.output.attach(self.process.stdout, f"{self.pid}-out"),
                         self.output.attach(self.process.stderr, f"{self.pid}-err")]

    def text(self) -> str:
        """The output so far (the last `output_limit` bytes of it)."""
        return self.output.text()

    def wait_for_output(self, needle: str, timeout: float = 10.0) -> bool:
        return self.output.wait_for(needle, timeout)

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def send_signal(self, sig: int) -> None:
        """Signal the started process only (not the rest of its group)."""
        self.process.send_signal(sig)

    def signal_group(self, sig: int) -> bool:
        """Signal every process of the group; False when none is left."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        return True

    def members(self) -> list[int]:
        self.process.poll()  # reap the leader if it is done, so it does not count as a member
        return group_members(self.pgid)

    def _wait_group(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.members():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, term_timeout: float = 15.0, kill_timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after `term_timeout` s, and wait until none of it is left."""
        try:
            if self.members():
                self.signal_group(signal.SIGTERM)
                if not self._wait_group(term_timeout):
                    self.signal_group(signal.SIGKILL)
                    if not self._wait_group(kill_timeout):
                        raise GroupStillAlive(f"process group {self.pgid} ({self.args[0]}) outlived SIGKILL: "
                                              f"{self.members()}")
        finally:
            try:
                self.process.wait(kill_timeout)
            except subprocess.TimeoutExpired:
                pass
            for reader in self._readers:  # EOF comes once every holder of the pipes has exited
                reader.join(5)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None and not any(r.is_alive() for r in self._readers):
                    pipe.close()


@contextmanager
def running(
    args: Sequence[str],
    *,
    cwd: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    term_timeout: float = 15.0,
    kill_timeout: float = 10.0,
) -> Iterator[ManagedProcess]:
    """Run `args` in its own process group for the duration of the block; stop the whole group after it.

    `env` is added to the test's environment (or replaces it with `inherit_env=False`).
    """
    full_env = {**(os.environ if inherit_env else {}), **(env or {})}
    managed = ManagedProcess(args, cwd=cwd, env=full_env, output_limit=output_limit)
    try:
        yield managed
    finally:
        managed.stop(term_timeout, kill_timeout)
