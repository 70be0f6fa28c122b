"""The payload log's file: prompts and answers, so created readable by its owner alone, rotated at `max_bytes`, and
written so that a failure reaches the writer (which counts it) rather than stderr.

Several processes may write the same file: the workers of `gateway serve --workers N` each run a payload log with
the same `path`. Each write holds an exclusive lock (`flock`) on the file at the path, taken on the descriptor
the process holds and kept only if that file is still the one at the path (another worker rotated it, or it was
removed: the path is opened anew, and locked so in turn). So the size checked against `max_bytes` is the file's,
whatever worker wrote it; one worker rotates it, the others waiting; and no worker writes into a file renamed
away or removed. (Each worker used to count its own bytes and rotate on its own: one wrote into a backup, or
into a file another had deleted, and those lines were lost.) A rotation renames the file while holding its lock
and locks the new file before letting the old one go, so that a worker waiting on the old one finds it moved.
Locks are taken oldest file first (the file at the path is always newer than one renamed away): none waits on
another in a circle. No other file is made (a lock file would sit next to the log).

Split from `payload_log.py`, which holds the queue, the redaction and the Redis sink.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading

__all__ = ["CLOSE_WAIT_S", "PrivateRotatingFile"]

CLOSE_WAIT_S = 1.0
"""How long `close` waits for a write under way (in a thread) to end; past it, the write closes the file itself."""


class FileClosed(OSError):
    """A write to the file after `close`: nothing is written."""


class PrivateRotatingFile:
    """A rotating file created readable by its owner alone (0600, whatever the process's umask): its lines are
    prompts and answers, redacted by the guards only as far as the guards recognise what they hold. A file that
    exists keeps its mode (an operator's choice), and so do the files it is rotated to.

    A write that fails raises (`write`), where logging's handler printed the whole record, a line of prompts and
    answers, to stderr and carried on as if it had been written: the writer counts it; the file is closed, and the
    next line opens the path anew. `backups: 0` empties the file at `max_bytes` (logging's handler reopened it to
    append, and it grew without bound). Only a regular file is rotated (a path that names a device is written).
    Writes and rotations are serialised across processes (the module's docstring); the writer calls `write` in a
    thread, never on the event loop, since it may wait for another process's write.

    A write and `close` hold a lock (`_lock`): the writer's close comes after its deadline, while a write it gave up
    on may still run in its thread (waiting for another worker's lock), and closing the descriptor under it let the
    write go on with a number that was closed, or already reused by another file (it reopened the path, wrote, and
    kept that descriptor open). `close` waits `CLOSE_WAIT_S` at most for a write under way, never for a lock another
    process holds: past it, `closed` is set, and the write, which checks it before it opens the path and once it
    holds the lock, closes the file itself and writes nothing."""

    def __init__(self, filename: str, max_bytes: int, backups: int) -> None:
        self.path = os.path.abspath(filename)
        self.max_bytes = max_bytes
        self.backups = backups
        self.closed = False
        self._lock = threading.Lock()  # a write, or the close: only they touch `_fd`
        self._fd: int | None = self._open()  # (a path that cannot be opened: the start fails, naming it)

    def _open(self) -> int:
        if self.closed:
            raise FileClosed("the payload log's file is closed")
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def write(self, line: bytes) -> None:
        """Append `line` and a newline, rotating first if it would take the file past `max_bytes`."""
        data = line + b"\n"
        with self._lock:
            try:
                self._write(data)
            finally:
                if self.closed:  # closed meanwhile (`close` gave up waiting): the descriptor is closed here
                    self._close()

    def _write(self, data: bytes) -> None:
        fd = self._locked()
        try:
            held = os.fstat(fd)
            if stat.S_ISREG(held.st_mode) and 0 < held.st_size and held.st_size + len(data) > self.max_bytes:
                fd = self._rotate(fd)
            view = memoryview(data)
            while view:  # (a regular file takes it in one write; a short one leaves the rest to the next, or raises)
                view = view[os.write(fd, view):]
        except BaseException:
            self._close()  # (closing the descriptor lets the lock go)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)

    def _locked(self) -> int:
        """The descriptor of the file at the path, locked: the one held if it is still there, else the path's
        opened anew (after a rotation by another process, or a removal)."""
        while True:
            if self._fd is None:
                self._fd = self._open()
            fd = self._fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # (may wait for another process: `close` may come meanwhile)
                if self.closed:
                    raise FileClosed("the payload log's file is closed")
                if _same(fd, self.path):
                    return fd
            except BaseException:
                self._close()
                raise
            self._close()  # moved or removed: its lock goes with it, and the path is opened again

    def _rotate(self, fd: int) -> int:
        """The file (locked, at the path) rotated: renamed to `.1` (the older ones moved up, the oldest past
        `backups` replaced), and the new one at the path, locked, returned; or, with `backups: 0`, emptied."""
        if not self.backups:
            os.ftruncate(fd, 0)  # (other processes' descriptors are this file's: they append from its new end)
            return fd
        for n in range(self.backups - 1, 0, -1):
            older = f"{self.path}.{n}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._fd = None  # the old one is held (and locked) until the new one is: a waiting writer finds it moved
        try:
            return self._locked()
        finally:
            os.close(fd)

    def close(self) -> None:
        """No write after this one; the descriptor closed now, or by a write under way once it ends (after
        `CLOSE_WAIT_S`: it may wait for another process's lock, and the close must not)."""
        self.closed = True
        if self._lock.acquire(timeout=CLOSE_WAIT_S):
            try:
                self._close()
            finally:
                self._lock.release()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _same(fd: int, path: str) -> bool:
    """Whether the file open at `fd` is the one at `path` (a file renamed away or removed is not)."""
    try:
        at_path = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
