r"""Incremental Server-Sent Events decoding, for OpenAI-style upstream streams.

Network reads split events anywhere; the decoder keeps the tail and returns the
`data` payloads of the events completed so far, so that each can be forwarded
as soon as its last byte arrives. Lines end at "\r\n", "\n" or a lone "\r" (WHATWG HTML, "Interpreting an event
stream"): a "\r" that ends a read ends its line with that read (`_feed_ended_by_cr`), and the event it completes
goes out then, not with the upstream's next write; the streams of OpenAI and most servers end lines with "\n"
alone, and meet none of this (`feed`'s common case tests for "\r" once).

Substring tests on the per-event path use `bytes.find`, not `in`: CPython 3.11's
`bytes.__contains__` first tries the operand as an integer and formats, raises and
clears a TypeError before it searches (about 2,000 instructions a test, measured).
A single byte is looked for as an integer, with `in`: that is `__contains__`'s own
first case, a `memchr` with no argument parsing (about a fifth of a `find`'s time);
`find` given an integer still parses its arguments.
A prefix is compared as a slice: `startswith` (as `find`) parses its arguments into a
tuple first, about 800 instructions a call against about 500 for a short slice.
"""

from __future__ import annotations

__all__ = ["DONE", "SSEDecoder"]

DONE = b"[DONE]"
_MAX_PENDING = 8 * 1024 * 1024  # an event larger than this is not an OpenAI chunk
_REJOINED = 4096  # an open event up to this size is joined and split again by a read with a line break (see `feed`)
_BOM_DATA = b"\xef\xbb\xbfdata:"  # a `data:` line after UTF-8's byte order mark (a stream's first)


class SSEDecoder:
    """Feed it bytes; get back the data payloads of every complete event.

    An event still open is kept as its first part (`_pending`) and the reads after it that end no event (`_more`):
    a large event that arrives in small reads is joined once, when a read ends it, not copied and searched again on
    every read (quadratic: a 7 MB event in 1 KB reads cost 7.7 s of CPU; a 6 MB event of 1 KB `data:` lines, one a
    read, 17 s). A read with no line break cannot end one; a read with one is searched for a blank line alone, with
    the last byte kept before it (`_ends_event`), not with all the event kept so far. Not when the event kept is
    short (`_REJOINED`): an event cut across two reads, the usual case, is joined and split as it was, without that
    search first (a fifth more time for such a read, measured), and joining a few KB again costs a read little."""

    __slots__ = ("_more", "_pending", "_size")

    def __init__(self) -> None:
        self._pending = b""
        self._more: list[bytes] = []
        self._size = 0  # the bytes of `_pending` and `_more`

    def feed(self, data: bytes) -> list[bytes]:
        if not self._pending:
            # The common case on a stream that flows: one read, one whole single-line event.
            end = len(data) - 2
            if data.find(10) == end and data[-1] == 10 and data[:5] == b"data:" and 13 not in data:  # 10, 13: \n, \r
                return [data[6:end] if data[5] == 32 else data[5:end]]
            buf = data
        elif (10 not in data and 13 not in data) or (
                self._size > _REJOINED and data.find(b"\n\n") < 0 and not self._ends_event(data)):
            if data:  # the open event goes on: kept, not joined (an empty read would hide its last byte)
                self._size += len(data)
                if self._size > _MAX_PENDING:
                    raise ValueError("stream event too large")
                self._more.append(data)
            return []
        elif self._more:  # this read may end the open event: it is joined, once
            buf = b"".join((self._pending, *self._more, data))
            self._more.clear()
        else:
            buf = self._pending + data
        if 13 in buf:  # "\r": lines end at "\r\n", "\n" or a lone "\r"
            if buf[-1] == 13:
                return self._feed_ended_by_cr(buf)
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = buf.split(b"\n\n")
        self._pending = events.pop()
        self._size = len(self._pending)
        if self._size > _MAX_PENDING:
            raise ValueError("stream event too large")
        payloads = []
        for event in events:
            if event[:5] == b"data:" and 10 not in event:  # `_data_of`'s common case, in line: a call fewer an event
                payloads.append(event[6:] if event[5:6] == b" " else event[5:])
                continue
            payload = _data_of(event)
            if payload is not None:
                payloads.append(payload)
        return payloads

    def _ends_event(self, data: bytes) -> bool:
        r"""Whether `data`, a read that holds a line break but no "\n\n", ends the open event: an empty line is a
        line break right after another, "\n\n", "\r\r" or "\n\r" in the bytes as sent ("\r\n" is one; "\r\n\r\n"
        holds "\n\r"), in `data` or across its first byte and the last one kept (a "\r" kept by `_feed_ended_by_cr`
        included: it ended its line, and an "\n" after it is the rest of that one line break)."""
        last = (self._more[-1] if self._more else self._pending)[-1]
        first = data[0]
        if (last == 10 and (first == 10 or first == 13)) or (last == 13 and first == 13):
            return True
        return 13 in data and (data.find(b"\r\r") >= 0 or data.find(b"\n\r") >= 0)

    def _feed_ended_by_cr(self, buf: bytes) -> list[bytes]:
        r"""`feed` for bytes that end with a "\r": it ends its line now, whether an "\n" follows in the next read
        (a "\r\n" split across reads) or not (a lone "\r"), so that the event it may end goes out with this read.

        The "\n" it became is kept as the "\r" it was, the last byte of `_pending`: an "\n" that starts the next
        read makes a "\r\n" with it, one line break (the spec ignores an LF right after a CR), and anything else
        leaves it a lone "\r". An "\n" there would have ended one more line: an empty one, ending the event."""
        self._pending = b""  # (`_more` was joined into `buf`)
        payloads = self.feed(buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
        self._pending = self._pending[:-1] + b"\r"  # what follows the last event: "" or lines ending in its "\n"
        return payloads

    def flush(self) -> list[bytes]:
        """The last event, when the stream ended without its blank line."""
        rest = b"".join((self._pending, *self._more))
        if 13 in rest:  # the "\r" kept by `_feed_ended_by_cr`, or the line breaks of reads in `_more` (no event's end)
            rest = rest.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        rest = rest.rstrip(b"\n")
        self._pending, self._size = b"", 0
        self._more.clear()
        payload = _data_of(rest) if rest else None
        return [payload] if payload is not None else []


def _data_of(event: bytes) -> bytes | None:
    if event.startswith(b"data:") and 10 not in event:  # the common case: one data line
        return event[6:] if event[5:6] == b" " else event[5:]
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
        elif line.startswith(_BOM_DATA):  # a stream may open with a byte order mark, which the spec drops
            parts.append(line[9:] if line[8:9] == b" " else line[8:])
    # Several data lines: joined by a space where the spec joins them by a line break. The payload is forwarded as
    # one `data:` line (a line break in it would end that line: the client got half an event and a stray line),
    # and to JSON both are whitespace; a break inside a JSON string was not valid JSON anyway.
    return b" ".join(parts) if parts else None
