"""Structured (JSON lines) logging. Records carry an optional `fields` dict; never prompt text.

The access log writes one line per request, so its path is kept short: when logging is configured as
`gateway serve` configures it (one `JsonLinesHandler` on the root logger, nothing added to the access
logger), `log_access` hands the line to that handler, which encodes it into a buffer and writes the
buffer at most 50 ms later (or once 64 lines wait). The line is the one `JsonFormatter` would have
made. Configured any other way (another handler, a test's log capture), the line goes through `logging`
as any record does.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from math import floor
from typing import TextIO

import msgspec

from .access import AccessLine

__all__ = ["JsonFormatter", "JsonLinesHandler", "configure_logging", "log_access"]

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_ACCESS_HEAD = b'","level":"info","logger":"gateway.access","msg":"request"'
access_log = logging.getLogger("gateway.access")
_INFO = logging.INFO
_FLUSH_LINES = 64  # access lines written at once when this many wait (~40 KB: one write costs least per line)
_FLUSH_AFTER_S = 0.05  # else this long after the first waiting line
_second: list[object] = [None, ""]  # the last whole second formatted, and its text
# An access line's fields after its second: `123Z` and the fixed ones, for each millisecond (made once).
_AFTER_SECOND = tuple(f"{millisecond:03d}Z".encode() + _ACCESS_HEAD for millisecond in range(1000))


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
    """JSON lines on a stream. Access lines are encoded into one buffer and written together, as nginx's
    `access_log ... buffer= flush=` does: when `_FLUSH_LINES` are waiting or `_FLUSH_AFTER_S` after the first
    (under load, one write a loop turn carried about 8 lines); at exit (`logging.shutdown`) whatever waits.
    Another record from the loop's thread first writes what waits, so lines keep their order."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._buffer = bytearray()  # whole lines, each ending in a newline; only the loop's thread adds to it
        self._lines = 0
        self._timed: asyncio.AbstractEventLoop | None = None  # the loop a timed write is due on
        self._owner = -1  # the thread that writes lines (the event loop's)
        self._second = -1  # the whole second of the last access line, and its line's first bytes
        self._second_head = b""

    def write_access(self, line: AccessLine) -> None:
        """Queue one access line: the line `JsonFormatter` would make (its four fields, then the access
        fields), encoded in place at the buffer's end; the timestamp's second is formatted once per second."""
        now = time.time()
        whole = floor(now)  # `int(now)` for a time after 1970, without a call to the int type
        if whole != self._second:
            self._second = whole
            self._second_head = b'{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode() + b"."
        buffer = self._buffer
        buffer += self._second_head
        buffer += _AFTER_SECOND[floor((now - whole) * 1000)]
        at = len(buffer)
        _encoder.encode_into(line, buffer, at)  # (cannot fail: every field of the struct has a JSON type)
        buffer[at] = 44  # the struct's opening brace becomes a comma: one object
        buffer.append(10)
        self._lines += 1  # (as `write_line` counts and schedules, in line: one call fewer per request)
        if self._lines >= _FLUSH_LINES or self._timed is None:
            self._due()

    def write_line(self, line: bytes | bytearray) -> None:
        """Queue one encoded line (ending in a newline), as access lines are."""
        self._buffer += line
        self._lines += 1
        if self._lines >= _FLUSH_LINES or self._timed is None:
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
            loop.call_later(_FLUSH_AFTER_S, self._timed_write)

    def _timed_write(self) -> None:
        self._timed = None
        self._write_buffer()

    def _write_buffer(self) -> None:
        if not self._buffer:
            return
        data, self._buffer, self._lines = self._buffer, bytearray(), 0
        self.acquire()  # once: the lines written and flushed under one hold of the lock
        try:
            stream = self.stream
            binary = getattr(stream, "buffer", None)
            if binary is not None:  # a text stream over bytes: the text layer first, then the lines as bytes
                stream.flush()
                binary.write(data)
                binary.flush()
            else:
                stream.write(data.decode())
                stream.flush()
        finally:
            self.release()

    def flush(self) -> None:
        """Everything queued written, then the stream flushed: by the thread that queues lines, or by any once
        that thread has ended (at exit, `logging.shutdown`); another thread's flush leaves the queue to it."""
        if self._buffer and (self._owner in (-1, threading.get_ident())
                             or all(thread.ident != self._owner for thread in threading.enumerate())):
            self._write_buffer()
            return
        super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._buffer and self._owner == threading.get_ident():  # another thread's record does not wait
            self._write_buffer()
        super().emit(record)


def configure_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers[:] = [JsonLinesHandler(sys.stderr)]
    root.setLevel(level)
    for noisy in ("uvicorn.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_access(line: AccessLine) -> None:
    """One access line: straight to the configured handler when logging is as `configure_logging` left it."""
    handlers = logging.root.handlers
    handler = handlers[0] if len(handlers) == 1 else None
    if (handler.__class__ is JsonLinesHandler and not access_log.handlers and access_log.propagate
            and access_log.isEnabledFor(_INFO) and handler.level <= _INFO):
        handler.write_access(line)
        return
    access_log.info("request", extra={"fields": line.fields()})
