"""Structured (JSON lines) logging. Records carry an optional `fields` dict; never prompt text.

The access log writes one line per request, so its path is kept short: when logging is configured as
`gateway serve` configures it (one `JsonLinesHandler` on the root logger, nothing added to the access
logger or to its parent), `log_access_of` hands that handler what the line is made of, and the handler
makes and encodes the lines that wait together and writes them at most 50 ms later (or once 64 lines
wait); `log_access` hands it a line already made. The line is the one `JsonFormatter` would have made.
Configured any other way (another handler, a test's log capture, a level, a filter), the line goes
through `logging` as any record does.

Logging may be reconfigured at any time. A request's line goes to the handler found when logging was last
checked (`_direct`) while the root's handlers are still that one and the access logger is still enabled for
INFO (logging's own memo, `Logger._cache`, which it empties on any `setLevel` or `disable`): two comparisons a
line, which see the usual changes (another handler on the root, as a test's log capture adds, a level) at once.
Logging is checked in full (`_direct_handler`) whenever the lines that wait are written (`JsonLinesHandler._pack`,
at most 50 ms later): lines queued under a configuration that has changed since in another way (a handler or
filter on the access logger or its parent, their propagation) go through `logging` then, as any record does.
A change to the handler's own level, filters or formatter (through its methods) is seen at once.

On a stream that can block (a pipe, a terminal, a socket: stderr a pipe nobody reads, as a stalled log shipper
or Docker's blocking log mode leaves it), the handler's lines are written by a thread of its own
(`log_writer.LineWriter`), never by the thread that logs: a blocked write holds that thread, not the event loop,
which hands it a batch of lines (bytes) where it wrote them. Up to `_QUEUE_BYTES` wait for it; beyond, new lines
are dropped and counted (`count_dropped_lines`: `gateway_telemetry_dropped_total{sink="log"}`), and the first
line written after them says how many were. A stream that cannot block (a file, one in memory) is written at
once, as before.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

from .access import AccessLines, AccessPart, Names, PackedLine
from .log_writer import LineWriter, count_dropped_lines, pipe_fd

if TYPE_CHECKING:

    from ..pipeline.context import RequestContext

# An access line to make when it is written: `AccessLines.line`'s arguments (`log_access_of`).
_Unmade = tuple[AccessLines, "RequestContext", float, Names, "AccessPart | None", float]

__all__ = ["JsonFormatter", "JsonLinesHandler", "configure_logging", "count_dropped_lines", "log_access",
           "log_access_of"]

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_into = _encoder.encode_into
_encode_lines = _encoder.encode_lines
_NOTHING = msgspec.Raw(b"")  # encoded into a buffer at 0: empties it and keeps its memory
access_log = logging.getLogger("gateway.access")
# The access logger's parent, made here so that it is the parent for good (no logger's name lies between).
_gateway = logging.getLogger("gateway")
_root = logging.root
_INFO = logging.INFO
_FLUSH_LINES = 64  # access lines written at once when this many wait (~40 KB: one write costs least per line)
_FLUSH_AFTER_S = 0.05  # else this long after the first waiting line
_QUEUE_BYTES = 4 << 20  # lines waiting for the writer thread (~6,000 access lines); beyond, new ones are dropped
_FLUSH_WAIT_S = 2.0  # `flush` (at exit: `logging.shutdown`) waits this long at most for the queued lines' write
_second: list[object] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(created: float) -> str:
    """`2026-12-02T09:31:40.123Z` (UTC, milliseconds); the seconds part is formatted once per second."""
    whole = int(created)
    if _second[0] != whole:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((created - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """JSON lines on a stream. Access lines are kept and written together, as nginx's `access_log ... buffer=
    flush=` does: when `_FLUSH_LINES` are waiting or `_FLUSH_AFTER_S` after the first (under load, one write a
    loop turn carried about 8 lines); at exit (`logging.shutdown`) whatever waits. They are encoded together
    too, in one call when written (`encode_lines`): one at a time, as each request ended, the encoding cost
    about twice as much CPU in a served request as in a loop of lines. Another record from the loop's thread
    first writes what waits, so lines keep their order. The buffer of other lines (`write_line`) keeps its
    memory from one write to the next (grown again from empty, it cost 3 k instructions a line at 64 lines a
    write). On a stream that can block, "written" is handed to the writer thread (`log_writer.LineWriter`), a batch at a
    time: whatever thread logs, the stream's write never holds it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._buffer = bytearray()  # whole lines, each ending in a newline; only the loop's thread adds to it
        self._pending: list[PackedLine | _Unmade] = []  # access lines after the buffer's, to encode (`_pack`)
        self._lines = 0
        self._due_at = 1  # `_due` runs once this many lines wait: `_FLUSH_LINES` while a timed write is due
        self._timed: asyncio.AbstractEventLoop | None = None  # the loop a timed write is due on
        self._owner = -1  # the thread that writes lines (the event loop's)
        self._writes_to: object = None  # the stream `_writer` was chosen for
        self._writer: LineWriter | None = None  # the stream's writer thread, if it can block (`_writer_now`)

    def write_access(self, line: PackedLine) -> None:
        """Queue one access line (the line `JsonFormatter` would make of its record), encoded when written."""
        self._pending.append(line)
        self._lines += 1  # (as `write_line` counts and schedules, in line: one call fewer per request)
        if self._lines >= self._due_at:
            self._due()

    def write_line(self, line: bytes | bytearray) -> None:
        """Queue one encoded line (ending in a newline), after the access lines that wait."""
        if self._pending:
            self._pack()
        self._buffer += line
        self._lines += 1
        if self._lines >= self._due_at:
            self._due()

    def _due(self) -> None:
        """Lines were queued: written now when enough wait or no loop runs, else once `_FLUSH_AFTER_S` passed."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test, a command): at once
            self.flush()
            return
        self._owner = threading.get_ident()
        if self._lines >= _FLUSH_LINES:
            self._write_buffer()
        if self._timed is not loop:  # none due, or due on a loop that has ended (its timer will not run)
            self._timed = loop
            self._due_at = _FLUSH_LINES
            loop.call_later(_FLUSH_AFTER_S, self._timed_write)

    def _timed_write(self) -> None:
        self._timed = None
        self._due_at = 1
        self._write_buffer()

    def _pack(self) -> None:
        """The access lines that wait, made and encoded at the buffer's end."""
        self._buffer += self._packed()

    def _packed(self) -> bytes:
        """The access lines that wait, made (`log_access_of`'s) and encoded (in one call: every field of the struct
        has a JSON type, so it cannot fail)."""
        pending, self._pending = self._pending, []
        made: list[PackedLine] = []
        direct: bool | None = None  # whether logging is still as it was when `log_access_of` queued its lines
        for item in pending:
            if isinstance(item, PackedLine):  # (`write_access`'s: this handler's to write)
                made.append(item)
                continue
            lines, ctx, total, names, part, now = item
            try:
                line = lines.line(ctx, total, names, part, now)
            except Exception:  # noqa: BLE001 -- a bug: its line is lost (reported), the others are written
                traceback.print_exc()
                continue
            if direct is None:
                direct = _direct_handler() is self
            if direct:
                made.append(line)
            else:  # logging changed since it was queued: through `logging`, as any record
                access_log.info("request", extra={"fields": line.fields()})
        return _encode_lines(made)

    def _write_buffer(self) -> None:
        writer = self._writer if self.stream is self._writes_to else self._writer_now()
        if writer is not None:  # one batch to the writer thread
            self._lines = 0
            buffer = self._buffer
            if not buffer:  # access lines alone (the usual batch): their encoding is the batch, not copied again
                batch = self._packed() if self._pending else b""
                if batch:
                    writer.put(batch)
                return
            if self._pending:
                self._pack()
            writer.put(bytes(buffer))
            _encode_into(_NOTHING, buffer, 0)  # its memory kept
            return
        if self._pending:
            self._pack()
        buffer = self._buffer
        if not buffer:
            return
        self.acquire()  # once: the lines written and flushed under one hold of the lock
        try:
            stream = self.stream
            binary = getattr(stream, "buffer", None)
            if binary is not None:  # a text stream over bytes: the text layer first, then the lines as bytes
                stream.flush()
                binary.write(buffer)
                binary.flush()
            else:
                stream.write(buffer.decode())
                stream.flush()
        finally:
            self._lines = 0
            _encode_into(_NOTHING, buffer, 0)  # written (or failed: dropped), its memory kept
            self.release()

    def _writer_now(self) -> LineWriter | None:
        """The writer thread of the stream now set, when it can block; None: the stream is written at once."""
        self.acquire()  # (not two writers for one stream: the loop's thread and another may both ask first)
        try:
            stream = self.stream
            if stream is not self._writes_to:
                fd = pipe_fd(stream)
                self._writer = None if fd is None else LineWriter(self, fd, _QUEUE_BYTES)
                self._writes_to = stream
            return self._writer
        finally:
            self.release()

    def flush(self) -> None:
        """Everything queued written, then the stream flushed: by the thread that queues lines, or by any once
        that thread has ended (at exit, `logging.shutdown`); another thread's flush leaves the queue to it. On a
        stream that can block, "written" waits for the writer thread off a running loop, `_FLUSH_WAIT_S` at most:
        a stream that blocks holds no exit for longer (what still waits then is lost with the process)."""
        if (self._buffer or self._pending) and (
                self._owner in (-1, threading.get_ident())
                or all(thread.ident != self._owner for thread in threading.enumerate())):
            self._write_buffer()
            if self._writer is None:
                return
        writer = self._writer_now()
        if writer is None:
            super().flush()
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            writer.wait_written(_FLUSH_WAIT_S)

    def emit(self, record: logging.LogRecord) -> None:
        writer = self._writer if self.stream is self._writes_to else self._writer_now()
        if writer is None:  # written at once (another thread's record does not wait)
            if (self._buffer or self._pending) and self._owner == threading.get_ident():
                self._write_buffer()
            super().emit(record)
            return
        # To the writer thread as the other lines: from the loop's thread, after the lines that wait and with them;
        # from another, on its own (it does not wait for the loop's lines).
        try:
            line = (self.format(record) + self.terminator).encode("utf-8", "backslashreplace")
        except Exception:  # noqa: BLE001 -- as `StreamHandler.emit`: reported (`logging.raiseExceptions`)
            self.handleError(record)
            return
        if self._owner == threading.get_ident():
            if self._pending:
                self._pack()
            self._buffer += line
            self._write_buffer()
        else:
            writer.put(line)

    # What `_direct_handler` reads and `log_access` does not: a change has logging checked again.
    def addFilter(self, filter: logging._FilterType) -> None:
        super().addFilter(filter)
        _forget()

    def removeFilter(self, filter: logging._FilterType) -> None:
        super().removeFilter(filter)
        _forget()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        _forget()

    def setLevel(self, level: int | str) -> None:
        super().setLevel(level)
        _forget()


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers[:] = [JsonLinesHandler(sys.stderr)]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# The handler when logging was last found as `configure_logging` leaves it (`_direct_handler`): the root's one
# `JsonLinesHandler`; `[None]` when it was not, or since `_forget`.
_direct: list[Any] = [None]


def log_access(line: PackedLine) -> None:
    """One access line, made: straight to the configured handler when logging is as `configure_logging` left it
    (checked in full: the requests' own lines take `log_access_of`'s short check)."""
    handler = _direct_handler()
    if handler is not None:
        handler.write_access(line)
    else:
        access_log.info("request", extra={"fields": line.fields()})


def log_access_of(lines: AccessLines, ctx: RequestContext, total: float, names: Names,
                  part: AccessPart | None) -> None:
    """`log_access(lines.line(ctx, total, names, part))`, the line made when it is written when it goes straight to
    the handler found when logging was last checked (made with the others that wait, as they are encoded, and
    logging checked again then: a request's end does less)."""
    if _root.handlers == _direct and access_log._cache.get(_INFO):  # type: ignore[attr-defined]
        handler = _direct[0]
        handler._pending.append((lines, ctx, total, names, part, time.time()))
        handler._lines += 1
        if handler._lines >= handler._due_at:
            handler._due()
        return
    log_access(lines.line(ctx, total, names, part))


def _direct_handler() -> JsonLinesHandler | None:
    """The handler that logging would hand an access line to, alone, to write as `JsonFormatter` does; else
    None (the line goes through `logging`). Kept in `_direct` for `log_access`."""
    handlers = _root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    if (type(handler) is JsonLinesHandler and type(handler.formatter) is JsonFormatter and not handler.filters
            and handler.terminator == "\n" and handler.level <= _INFO
            and not access_log.handlers and access_log.propagate and not access_log.filters
            and not access_log.disabled and not _gateway.handlers and _gateway.propagate
            and access_log.isEnabledFor(_INFO)):
        _direct[0] = handler
        return handler
    _forget()
    return None


def _forget() -> None:
    _direct[0] = None
