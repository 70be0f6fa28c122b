"""aiohttp's client request, with a small bytes body written in the request's own task.

Before Python 3.12, aiohttp's `ClientRequest.send` writes every request body in a task of
its own (`write_bytes`), even a few hundred bytes of JSON that go out with the head in one
write and never wait: a task created, scheduled, stepped and its done-callbacks run, per
upstream request. From 3.12 aiohttp starts that task eagerly, which already spares most of
it. `InlineBodyRequest.send` awaits the same `write_bytes` coroutine directly instead, when
it cannot wait: a `BytesPayload` of at most `INLINE_BODY_LIMIT` bytes on a connection whose
writing is not paused, no `Expect: 100-continue`, no tracing, no compression, no chunking,
no upload tracker, no proxy. The head and the body are written as aiohttp writes them (one
write, the same bytes: `tests/test_upstream_request.py` compares them); failures are reported
as `write_bytes` reports them (on the connection's protocol, where reading the response meets
them). Anything else takes aiohttp's own `send`.

The override mirrors the tail of aiohttp 3.14's `send` (the head's defaults, the response
object), so it is used only with the releases it was checked against (`request_class`).

A header aiohttp refuses to write (a control character in a credential, which the policy's load
refuses, or anything else it cannot spell) raises `ValueError` from `send`, which the providers'
transport errors do not catch: every request would be a 500. `send` raises `HeaderNotSent`
instead, a client error, so that the provider answers 502 and names itself, and the failure's
message names the headers, never their values.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_reqrep import ClientRequest, ClientResponse
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.payload import BytesPayload

if TYPE_CHECKING:
    from aiohttp.connector import Connection

__all__ = ["INLINE_BODY_LIMIT", "SENDING", "HeaderNotSent", "InlineBodyRequest", "request_class"]

# What a request sent from this task marks as sent (`upstream_sent = True`) once its connection is made and its head
# is being written: set by the accounting stage (a request left after that is billed its prompt; one left while
# it waited, connected or backed off before a retry, is not). None: nothing to mark (the usual request).
SENDING: ContextVar[Any] = ContextVar("gateway_upstream_sending", default=None)

_CHECKED_RELEASES = ("3.14.",)  # aiohttp releases whose `ClientRequest.send` the override mirrors
INLINE_BODY_LIMIT = 32 * 1024  # well under a socket's send buffer: writing it does not wait
_UNWRITABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # what aiohttp refuses in a head (RFC 9110 5.5)


class HeaderNotSent(aiohttp.ClientError):
    """A header of the request could not be written (see the module); the message names the headers only."""

    @classmethod
    def of(cls, request: ClientRequest) -> HeaderNotSent:
        names = [name for name, value in request.headers.items() if not _writable(name) or not _writable(value)]
        return cls(f"the request's header(s) {', '.join(names) or '(unknown)'} hold a control character or text "
                   "that UTF-8 cannot spell, and cannot be sent")


def _writable(text: str) -> bool:
    """Whether aiohttp writes `text` in a head (its own test: no control character but the tab, UTF-8)."""
    if _UNWRITABLE.search(text) is not None:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class InlineBodyRequest(ClientRequest):
    """A `ClientRequest` that writes a small bytes body without a task of its own (see the module)."""

    def _inline_body(self, conn: Connection) -> bool:
        """Whether writing this request's body cannot wait, and nothing `send` does besides needs the task."""
        body = self._body
        protocol = conn.protocol
        return (type(body) is BytesPayload and body.size is not None and body.size <= INLINE_BODY_LIMIT
                and protocol is not None and not protocol.writing_paused and self._continue is None
                and not self._traces and not self.compress and self.chunked is None
                and self._upload_tracker is None and self.proxy is None and self.method != hdrs.METH_CONNECT)

    async def send(self, conn: Connection) -> ClientResponse:
        owner = SENDING.get()
        if owner is not None:
            owner.upstream_sent = True
        if not self._inline_body(conn):
            try:
                return await super().send(conn)
            except ValueError as exc:  # a header it cannot write (the module says why)
                raise HeaderNotSent.of(self) from exc
        protocol = conn.protocol
        assert protocol is not None  # checked by `_inline_body`
        writer = StreamWriter(protocol, self.loop)
        # As aiohttp's `send`: the default Content-Type, the Connection header, the head (buffered).
        if (self.method in self.POST_METHODS
                and (self._skip_auto_headers is None or hdrs.CONTENT_TYPE not in self._skip_auto_headers)
                and hdrs.CONTENT_TYPE not in self.headers):
            self.headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
        version = self.version
        if hdrs.CONNECTION not in self.headers:
            if conn._connector.force_close:
                if version == HttpVersion11:
                    self.headers[hdrs.CONNECTION] = "close"
            elif version == HttpVersion10:
                self.headers[hdrs.CONNECTION] = "keep-alive"
        try:
            await writer.write_headers(f"{self.method} {self.url.raw_path_qs} HTTP/{version.major}.{version.minor}",
                                       self.headers)
        except ValueError as exc:  # a header it cannot write (the module says why)
            raise HeaderNotSent.of(self) from exc
        await self.write_bytes(writer, conn, self._get_content_length())  # head and body, one write
        response_class = self.response_class
        response = response_class(
            self.method, self.original_url, writer=None, continue100=None, timer=self._timer,
            request_info=self.request_info, traces=self._traces, loop=self.loop, session=self._session,
            stream_writer=writer,
        )
        self.response = cast(Any, response)  # some aiohttp releases declare it `None` until `send`
        return response


def request_class() -> type[ClientRequest]:
    """`InlineBodyRequest` with an aiohttp it was checked against, else aiohttp's own `ClientRequest`."""
    return InlineBodyRequest if aiohttp.__version__.startswith(_CHECKED_RELEASES) else ClientRequest
