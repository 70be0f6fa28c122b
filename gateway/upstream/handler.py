"""The upstream connection's protocol: aiohttp's, with a shorter path for the bytes of a streamed body.

On a slow stream every network read is one event, and aiohttp's `ResponseHandler.data_received`
runs its whole dispatch for each: the checks for a WebSocket reader, an upgrade and a missing
parser, the read timeout's reschedule (a method call that does nothing without `sock_read`),
then, after the parser, the loop over the new messages it found (none inside a body). For a
body that `body.adopt` took over, `stream_body` lets `data_received` feed the parser and return:
about 3,000 instructions an event fewer.

The short path holds only while nothing it skips can matter, checked when it starts: a plain
HTTP body (no WebSocket reader, no upgrade, the parser in place), no read timeout armed (the
gateway's sessions have none: `client.new_session`). It ends with the body (its end or its
failure), after which every read takes aiohttp's own path again, as the next response on the
pooled connection needs. Whatever the parser returns besides the body's bytes (a message
after the body, an upgrade) is handled as aiohttp handles it, and a parser failure too.

`pump` goes one step further for a reader that waits (`ReadTimer.pump`, for the OpenAI stream's
`forward`): the read's bytes are handed to the pump there and then, and the reader's wait is
ended only when the pump declines them. An event then costs no task wake-up (the future's
callback, the task's step, its coroutine frames, a new future for the next wait): on slow
streams about a tenth of the gateway's instructions per event. The pump runs in the upstream
connection's callback, not in the request's task (no current task; the connection's context).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

__all__ = ["StreamingResponseHandler", "install"]

_CHECKED_RELEASES = ("3.14.",)  # aiohttp releases whose `ResponseHandler.data_received` this mirrors


class StreamingResponseHandler(ResponseHandler):
    """aiohttp's `ResponseHandler`; `stream_body(content)` shortens the path of that body's bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._streamed: StreamReader | None = None  # the body whose bytes take the short path
        self._pump: Callable[[], bool] | None = None  # see `pump`

    def stream_body(self, content: StreamReader) -> bool:
        """Feed this body's bytes through the short path until it ends (False: it is not in a state that allows it)."""
        if (self._payload is not content or self._parser is None or self._payload_parser is not None
                or self._payload_parser_failed or self._upgraded or self._read_timeout
                or self._read_timeout_handle is not None or content._eof or content._exception is not None):
            return False
        self._streamed = content
        self._pump = None  # a pump is for one body: never the last one's
        return True

    def unstream(self, content: StreamReader) -> None:
        """Back to aiohttp's own path (the reader of `content` is done with it)."""
        if self._streamed is content:
            self._streamed = None
            self._pump = None

    def pump(self, content: StreamReader, pump: Callable[[], bool]) -> bool:
        """While the body's reader waits (its `_waiter` is pending), hand each read's bytes to `pump()` instead of
        waking it: True from `pump()` means it took them all and the reader may wait on (False: wake it, as
        `feed_data` would have). The reader's task then resumes only when `pump()` declines. Only on the short
        path (False if `content` does not take it)."""
        if self._streamed is not content:
            return False
        self._pump = pump
        return True

    def data_received(self, data: bytes) -> None:
        content = self._streamed
        if content is None or not data:
            ResponseHandler.data_received(self, data)
            return
        waiter = content._waiter if self._pump is not None else None
        if waiter is not None:
            if waiter.done():
                waiter = None
            else:
                content._waiter = None  # `feed_data` leaves it asleep: `pump` decides
        try:
            messages, upgraded, tail = self._parser.feed_data(data)  # type: ignore[union-attr]  # checked at the start
        except BaseException as underlying_exc:  # noqa: BLE001 -- as aiohttp: `_parse_failed` re-raises the rest
            self._streamed = self._pump = None
            if waiter is not None:
                content._waiter = waiter
            self._parse_failed(underlying_exc)
            return
        if content._eof or content._exception is not None:
            self._streamed = None  # the body is over: the next response takes aiohttp's path
            self._pump = None  # (and keeps no reader of it alive)
        if waiter is not None:
            if self._streamed is not None and content._waiter is None and self._pump_all():
                content._waiter = waiter  # all forwarded: the reader waits on
            elif not waiter.done():
                waiter.set_result(None)  # as `feed_data` would have
        if messages or upgraded:
            self._streamed = self._pump = None
            self._after_parse(messages, upgraded, tail)

    def _pump_all(self) -> bool:
        pump = self._pump
        try:
            return pump is not None and pump()
        except Exception:  # noqa: BLE001 -- the reader wakes and meets it again where it reads
            return False

    def _parse_failed(self, underlying_exc: BaseException) -> None:
        """As aiohttp's `data_received` when its parser raises."""
        if self.transport is not None:
            self.transport.close()
        if not isinstance(underlying_exc, Exception):
            raise underlying_exc
        if isinstance(underlying_exc, HttpProcessingError):
            exc = HttpProcessingError(code=underlying_exc.code, message=underlying_exc.message,
                                      headers=underlying_exc.headers)
        else:
            exc = HttpProcessingError()
        self.set_exception(exc, underlying_exc)

    def _after_parse(self, messages: list[tuple[object, StreamReader]], upgraded: bool, tail: bytes) -> None:
        """As aiohttp's `data_received` after its parser found new messages or an upgrade."""
        self._upgraded = upgraded
        payload: StreamReader | None = None
        for message, payload in messages:
            if message.should_close:  # type: ignore[attr-defined]
                self._should_close = True
            self._payload = payload
            if self._skip_payload or message.code in EMPTY_BODY_STATUS_CODES:  # type: ignore[attr-defined]
                self.feed_data((message, EMPTY_PAYLOAD), 0)  # type: ignore[arg-type]
            else:
                self.feed_data((message, payload), 0)  # type: ignore[arg-type]
        if payload is not None:
            if payload is not EMPTY_PAYLOAD:
                payload.on_eof(self._drop_timeout)
            else:
                self._drop_timeout()
        if upgraded and tail:
            self.data_received(tail)


def install(connector: aiohttp.TCPConnector) -> bool:
    """Make the connector's new connections `StreamingResponseHandler`s (False: this aiohttp is not one it was
    checked against, or the connector builds its protocols otherwise: they stay aiohttp's own)."""
    factory = getattr(connector, "_factory", None)
    if not (aiohttp.__version__.startswith(_CHECKED_RELEASES) and type(factory) is functools.partial
            and factory.func is ResponseHandler and not factory.args and set(factory.keywords) == {"loop"}):
        return False
    connector._factory = functools.partial(StreamingResponseHandler, **factory.keywords)  # type: ignore[assignment]
    return True
