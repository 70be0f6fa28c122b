"""The thread that writes a log handler's lines to a stream that can block (a pipe, a terminal, a socket), and the
count of the lines it drops.

stderr a pipe nobody reads (a stalled log shipper, Docker's blocking log mode) blocks a write to it: done on the
event loop, it froze the whole gateway (requests, `/healthz`). `logs.JsonLinesHandler` hands such a stream's
batches of lines to a `LineWriter`, whose thread a blocked write holds instead. What waits is bounded; lines
beyond are dropped and counted (`count_dropped_lines`: `gateway_telemetry_dropped_total{sink="log"}`), and the
first line written after them says how many were.

Several workers share their supervisor's stderr. A write to a pipe is whole (never interleaved with another
process's) only up to `PIPE_BUF` bytes (4,096 on Linux): a batch of lines written at once, when the pipe was full,
was cut mid-line by the other worker's (about one line in 40 under a lagging reader). To a pipe, a batch is written
in pieces of whole lines of at most `PIPE_BUF` bytes; a single line longer than that is written whole but may still
be interleaved (an access line is about 600 bytes).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import stat
import threading
import time
import traceback
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from prometheus_client import Counter

__all__ = ["LineWriter", "count_dropped_lines", "pipe_fd"]

_WRITER_IDLE_S = 1.0  # the writer thread ends after this long with nothing to write (a new one starts with the next)
_PIPE_BUF = select.PIPE_BUF  # the most a write to a pipe puts whole, never interleaved with another process's


class LineWriter:
    """Writes a handler's batches of lines to its stream's file descriptor on a thread of its own, in the order
    they were queued (`put`): a stream that blocks holds this thread, never the one that logs. Up to
    `limit` wait (the batch being written included); a batch beyond that is dropped, its lines counted
    (`_count_dropped`), and so is every batch after it until all that waited is written (one gap, not lines
    missing here and there as batches of other sizes fit): the first batch queued then is preceded by a warning
    that says how many lines were dropped. The thread ends once it has had nothing to write for `_WRITER_IDLE_S`
    (a handler left idle keeps none), and a new one starts with the next batch. A batch costs the thread that
    queues it a lock and a `SimpleQueue.put` (C): no `Condition`, whose Python cost was ~10 k instructions a
    batch."""

    def __init__(self, handler: logging.StreamHandler, fd: int, limit: int) -> None:  # type: ignore[type-arg]
        self._handler = handler  # (its `format` and `terminator`, for the warning of lines dropped)
        self._fd = fd
        self._pipe = _is_pipe(fd)  # (written in pieces of whole lines, each whole: see the module's docstring)
        self._limit = limit  # bytes that may wait
        self._batches: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._lock = threading.Lock()  # for the three below
        self._bytes = 0  # queued or being written
        self._thread: threading.Thread | None = None
        self._unreported = 0  # lines dropped since the last warning queued

    def put(self, batch: bytes) -> None:
        """Queue `batch` (whole lines) to be written, or drop it: `limit` would be exceeded, or lines were
        dropped and what waited is not all written yet."""
        with self._lock:
            if self._bytes + len(batch) > self._limit or (self._unreported and self._bytes):
                dropped = batch.count(b"\n")
                self._unreported += dropped
            else:
                dropped = 0
                if self._unreported:
                    self._queue(self._dropped_warning())
                self._queue(batch)
        if dropped:
            _count_dropped("queue_full", dropped)

    def wait_written(self, timeout: float) -> None:
        """Until every batch queued is written (and the warning of lines dropped before, if there is room), at most
        `timeout` s (looked at every 5 ms: at exit and off the loop only)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._unreported and not self._bytes:
                self._queue(self._dropped_warning())
        while self._bytes and time.monotonic() < deadline:
            time.sleep(0.005)

    def _queue(self, batch: bytes) -> None:  # (the lock held)
        if not batch:
            return
        self._bytes += len(batch)
        self._batches.put(batch)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gateway-log-writer", daemon=True)
            self._thread.start()

    def _dropped_warning(self) -> bytes:  # (the lock held)
        """The line of a warning record, as the handler formats any: how many lines were dropped before it."""
        dropped, self._unreported = self._unreported, 0
        record = logging.LogRecord(__name__, logging.WARNING, __file__, 0, "log lines dropped: the stream was not "
                                   "read fast enough", None, None)
        record.fields = {"dropped_lines": dropped}
        try:
            return (self._handler.format(record) + self._handler.terminator).encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 -- a formatter's bug: no warning, the lines go on
            return b""

    def _run(self) -> None:
        batches = self._batches
        while True:
            try:
                batch = batches.get(True, _WRITER_IDLE_S)
            except queue.Empty:
                with self._lock:  # (`_queue` starts a thread when there is none: under the lock, one or the other)
                    if batches.empty():
                        self._thread = None
                        return
                continue
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001 -- the stream failed (closed, its reader gone): lines dropped
                _count_dropped("sink_failed", batch.count(b"\n"))
                if not isinstance(exc, (OSError, ValueError)):  # a bug rather than the stream: reported
                    traceback.print_exc()
            with self._lock:
                self._bytes -= len(batch)

    def _write(self, batch: bytes) -> None:
        """To the descriptor itself, not through the stream's layers: blocked, the write holds no lock of the
        stream's (`sys.stderr`'s) that the interpreter's exit would wait for (it aborts: "could not acquire"). To a
        pipe, in pieces of whole lines of at most `_PIPE_BUF` bytes."""
        if self._pipe and len(batch) > _PIPE_BUF:
            for piece in line_pieces(batch, _PIPE_BUF):
                self._write_all(piece)
        else:
            self._write_all(batch)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


def line_pieces(batch: bytes, most: int) -> list[memoryview]:
    """`batch` (whole lines) cut after a newline into pieces of at most `most` bytes; a line longer than that is a
    piece of its own."""
    pieces: list[memoryview] = []
    view = memoryview(batch)
    start, size = 0, len(batch)
    while start < size:
        if size - start <= most:
            cut = size
        else:
            cut = batch.rfind(b"\n", start, start + most) + 1
            if cut <= start:  # one line longer than `most`
                cut = batch.find(b"\n", start + most) + 1 or size
        pieces.append(view[start:cut])
        start = cut
    return pieces


def _is_pipe(fd: int) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        return False


def pipe_fd(stream: TextIO) -> int | None:
    """The file descriptor under `stream` if it cannot seek (a pipe, a terminal, a socket: what can block), else
    None (a file, or no descriptor: written through the stream's own layers)."""
    try:
        return None if stream.seekable() else stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# The lines this process dropped by reason (`queue_full`, `sink_failed`), and the counter they go to as well.
_dropped: dict[str, int] = {}
_dropped_counter: list[Counter | None] = [None]
_dropped_lock = threading.Lock()


def count_dropped_lines(counter: Counter) -> None:
    """Count the log lines this process drops in `counter` (`gateway_telemetry_dropped_total`, labels `sink` and
    `reason`) as `sink="log"`, those dropped before included."""
    with _dropped_lock:
        _dropped_counter[0] = counter
        for reason, lines in _dropped.items():
            counter.labels("log", reason).inc(lines)


def _count_dropped(reason: str, lines: int) -> None:
    with _dropped_lock:
        _dropped[reason] = _dropped.get(reason, 0) + lines
        counter = _dropped_counter[0]
        if counter is not None:
            counter.labels("log", reason).inc(lines)
