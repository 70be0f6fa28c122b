"""Structured (JSON lines) logging. Records carry an optional `fields` dict; never prompt text.

The access log writes one line per request, so its path is kept short: when logging is configured as
`gateway serve` configures it (one `JsonLinesHandler` on the root logger, nothing added to the access
logger), `log_access` encodes the line itself and hands it to that handler, which writes the lines of one
event-loop turn together. The line is the one `JsonFormatter` would have made. Configured any other way
(another handler, a test's log capture), the line goes through `logging` as any record does.
"""

from __future__ import annotations

import asyncio
import logging
import sys
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
_BUFFERED_LINES = 256  # written at once past this many, without waiting for the loop turn to end
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
    """JSON lines on a stream; access lines are buffered for the rest of the event-loop turn (bounded), and
    any other record first writes what is buffered, so lines keep their order."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._pending: list[bytes | bytearray] = []
        self._scheduled = False
        self._second = -1  # the whole second of the last access line, and its line's first bytes
        self._second_head = b""

    def write_access(self, line: AccessLine) -> None:
        """Queue one access line: the line `JsonFormatter` would make (its four fields, then the access
        fields), encoded in place; the timestamp's second is formatted once per second."""
        now = time.time()
        whole = floor(now)  # `int(now)` for a time after 1970, without a call to the int type
        if whole != self._second:
            self._second = whole
            self._second_head = b'{"ts":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode() + b"."
        data = bytearray(self._second_head)
        data += _AFTER_SECOND[floor((now - whole) * 1000)]
        at = len(data)
        _encoder.encode_into(line, data, at)
        data[at] = 44  # the struct's opening brace becomes a comma: one object
        data.append(10)
        pending = self._pending  # `write_line(data)`, in line (one call fewer per request)
        pending.append(data)
        if len(pending) >= _BUFFERED_LINES or not self._scheduled:
            self._schedule()

    def write_line(self, line: bytes | bytearray) -> None:
        """Queue one encoded line (ending in a newline) for the end of this loop turn."""
        self._pending.append(line)
        if len(self._pending) >= _BUFFERED_LINES or not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        """Lines were queued: written now when the buffer is full or no loop runs, else at the turn's end."""
        if len(self._pending) >= _BUFFERED_LINES:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test, a command): at once
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            super().flush()
            return
        pending, self._pending = self._pending, []  # swapped first: a line added meanwhile is in `pending`
        data = b"".join(pending)
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

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:
            self.flush()
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
