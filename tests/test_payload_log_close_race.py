"""The payload log's file closed while a write is under way in its thread (`PrivateRotatingFile`).

The writer closes its file after the close deadline (`FINAL_DRAIN_S`), while the write it gave up on may still
run in its thread, waiting for another worker's lock. The close closed the descriptor under it: once the lock came,
the write went on with a number that was closed, or reused by then (by a socket, another file): it found that
"file" not the one at the path, reopened the path, wrote the line, and kept the new descriptor open. A write now
checks the close once it holds the lock and closes its descriptor itself; the close never waits for the other
worker's lock. Pure logic on the class: the lock is held by another descriptor, as another worker holds it.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from gateway.telemetry.payload_file import PrivateRotatingFile


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait_for_a_waiter(path: Path) -> None:
    """Until a lock on `path` is waited for (`/proc/locks` lists a waiter with `->`): the write is in `flock`."""
    inode = f":{path.stat().st_ino} "
    deadline = time.monotonic() + 30
    while not any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines()):
        assert time.monotonic() < deadline, "the write never waited for the lock"
        time.sleep(0.01)


def test_a_write_waiting_for_the_lock_writes_nothing_after_the_close(tmp_path: Path) -> None:
    path = tmp_path / "payloads.jsonl"
    before = _open_fds()
    log = PrivateRotatingFile(str(path), 1 << 20, 2)
    log.write(b"before-close")
    other = os.open(path, os.O_WRONLY)  # another worker, holding the lock (its write stalled)
    fcntl.flock(other, fcntl.LOCK_EX)
    failed: list[BaseException] = []

    def write() -> None:
        try:
            log.write(b"line-after-close")
        except Exception as exc:  # noqa: BLE001 -- the outcome is checked below
            failed.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    reused = None
    try:
        _wait_for_a_waiter(path)
        log.close()  # the writer's close, after its deadline: it returns though the other worker holds the lock
        assert writer.is_alive(), "the write did not wait for the other worker's lock"
        reused = os.open(os.devnull, os.O_RDONLY)  # the lowest free number: the closed descriptor's, if it was
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        writer.join(30)
        os.close(other)
        if reused is not None:
            os.close(reused)
    assert not writer.is_alive()
    assert path.read_text() == "before-close\n", "a line was written after the close"
    assert len(failed) == 1 and isinstance(failed[0], OSError)  # the writer counts it (`sink_failed`)
    assert _open_fds() == before, "a descriptor was left open"
    with pytest.raises(OSError):  # and nothing is written after the close
        log.write(b"later")
    assert path.read_text() == "before-close\n"
    assert _open_fds() == before


def test_a_close_with_no_write_under_way_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "payloads.jsonl"
    before = _open_fds()
    log = PrivateRotatingFile(str(path), 1 << 20, 2)
    log.write(b"one")
    assert len(_open_fds() - before) == 1
    log.close()
    log.close()  # (twice: nothing more)
    assert _open_fds() == before
