"""Taking an upstream body's bytes off aiohttp's `StreamReader` without `readany()`'s machinery.

On a slow stream every network read is one event, and `readany()` cost about a sixth
of the gateway's instructions per forwarded event beyond the bytes themselves: two
coroutines (`readany`, `_wait`) that the task resumes through, a timer context, and,
on every read, `resume_reading()` on the protocol, which feeds the HTTP parser an
empty chunk and resumes the transport even when nothing was paused. `take()` does
what `readany()` does once data is there; `ReadTimer.wait()` sets the reader's waiter
itself, as `readany()` does.

A body read only this way also stops tracking where HTTP chunks end: the parser
calls `begin_http_chunk_receiving` and `end_http_chunk_receiving` for every chunk
(an SSE upstream sends one event a chunk), for `readchunk()` alone, which nothing
calls on these bodies; `adopt` makes the reader a `_UntrackedChunks`, whose two
hooks do nothing (about 2,000 instructions an event). When the connection's protocol is the
gateway's (`handler.py`), `adopt` also shortens the path of the body's bytes from the socket to the
reader (`StreamingResponseHandler.stream_body`).

These are aiohttp's private attributes, so `adopt` allows all this only for the exact
`StreamReader` type, without a total timeout (its `TimerNoop`), on the aiohttp
releases it was checked against; anything else goes through `readany()`. A test
compares both paths' output over the same feeds (`tests/test_read_timer.py`).
"""

from __future__ import annotations

import collections

import aiohttp
from aiohttp.helpers import TimerNoop
from aiohttp.streams import StreamReader

from .handler import StreamingResponseHandler

__all__ = ["adopt", "release", "take"]

_CHECKED_RELEASES = ("3.14.",)  # aiohttp releases whose StreamReader `take` mirrors (read again before adding)


class _UntrackedChunks(StreamReader):
    """aiohttp's `StreamReader`, for a body that only `take` reads: where HTTP chunks end is not kept.

    The end of a chunk that brought data wakes no one `feed_data` did not wake already (both run in one
    `data_received`), and the chunk count bounds only the cost of `readchunk()`'s bookkeeping, kept no more.
    The parser calls both hooks on every chunk: `bool` takes no arguments and does nothing that matters
    here, without the Python frame a method of nothing costs."""

    __slots__ = ()

    begin_http_chunk_receiving = end_http_chunk_receiving = staticmethod(bool)  # type: ignore[assignment]

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        """aiohttp's, with the waiter woken in place (its `helpers.set_result` is one more Python call a read)."""
        assert not self._eof, "feed_data after feed_eof"
        if not data:
            return False
        length = len(data)
        self._size += length
        self._buffer.append(data)
        self.total_bytes += length
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if self._size > self._high_water:
            self._protocol.pause_reading()
        return False


def adopt(content: object) -> bool:
    """Whether `take` may read this body (else: `readany()`); if so, it stops tracking HTTP chunk ends.
    Once per body: a body adopted already is not adopted again."""
    if not (aiohttp.__version__.startswith(_CHECKED_RELEASES) and type(content) is StreamReader
            and type(getattr(content, "_timer", None)) is TimerNoop
            and type(getattr(content, "_buffer", None)) is collections.deque
            and hasattr(getattr(content, "_protocol", None), "_reading_paused")):
        return False
    content.__class__ = _UntrackedChunks  # same slots: a layout-compatible subclass
    content._http_chunk_splits = None  # the ends of chunks parsed before: not kept either
    protocol = content._protocol
    if isinstance(protocol, StreamingResponseHandler):
        protocol.stream_body(content)
    return True


def release(content: StreamReader) -> None:
    """The reader of an adopted body is done with it: its connection's reads take aiohttp's path again."""
    protocol = content._protocol
    if isinstance(protocol, StreamingResponseHandler):
        protocol.unstream(content)


def take(content: StreamReader) -> bytes | None:
    """`readany()` once it has something: the bytes buffered (b"" at the end of the body), or None when there
    are none yet. Raises the reader's failure, as `readany()` does before it waits.

    Several reads' worth (a burst: a fast upstream, a client that read slowly) are joined at once, where
    aiohttp's `_read_nowait` takes them one by one and resumes the protocol after each, which feeds the
    parser an empty chunk through the whole `data_received` (about 4,000 instructions a buffered read)."""
    if content._exception is not None:
        raise content._exception
    buffer = content._buffer
    if not buffer:
        return b"" if content._eof else None
    if len(buffer) == 1 and not content._buffer_offset:
        data = buffer.popleft()
    else:
        parts = list(buffer)
        buffer.clear()
        if content._buffer_offset:  # a part of the first one was read by `read(n)` (nothing here reads so)
            parts[0] = parts[0][content._buffer_offset:]
            content._buffer_offset = 0
        data = b"".join(parts)
    size = content._size = content._size - len(data)
    content._cursor += len(data)
    splits = content._http_chunk_splits  # None once adopted; ends of chunks already read past otherwise
    while splits and splits[0] < content._cursor:
        splits.popleft()
    if size < content._low_water and (splits is None or len(splits) < content._low_water_chunks):
        protocol = content._protocol
        # aiohttp resumes on every read; only a paused protocol has anything to resume: the parser holds
        # unparsed bytes only while flow control paused it (`pause_reading` sets `_reading_paused`).
        if protocol._reading_paused or protocol._buffer_paused:
            protocol.resume_reading()
    return data
