"""The payload log's file: prompts and answers, so created readable by its owner alone, rotated at `max_bytes`, and
written so that a failure reaches the writer (which counts it) rather than stderr.

Split from `payload_log.py`, which holds the queue, the redaction and the Redis sink.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from typing import Any

__all__ = ["PrivateRotatingFile"]


class PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotating file created readable by its owner alone (0600, whatever the process's umask): its lines are
    prompts and answers, redacted by the guards only as far as the guards recognise what they hold. A file that
    exists keeps its mode (an operator's choice).

    A write that fails raises (`write`), where logging's handler would print the whole record, a line of prompts
    and answers, to stderr and carry on as if it had been written: the writer counts it. `backups: 0` empties the
    file at `max_bytes` (logging's handler reopened it to append, and it grew without bound)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, self.mode, encoding=self.encoding, errors=self.errors)

    def write(self, line: str) -> None:
        """Append `line`, rotating first if it would pass `max_bytes`; a failure raises, and the file is closed
        so that the next line is written to a file opened anew, not after what the failed write left buffered."""
        try:
            self.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        except BaseException:
            stream, self.stream = self.stream, None  # (`emit` and `shouldRollover` open it again when None)
            if stream is not None:
                with contextlib.suppress(Exception):  # (its flush fails again; the descriptor is closed all the same)
                    stream.close()
            raise

    def handleError(self, record: logging.LogRecord) -> None:
        raise  # (called in `emit`'s `except`): what failed goes to `write`'s caller, not to stderr

    def doRollover(self) -> None:
        if self.backupCount > 0:
            super().doRollover()
            return
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        os.close(os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        self.stream = self._open()
