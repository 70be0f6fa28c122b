"""Small ASGI helpers shared by the HTTP layer: headers, request ids, error replies."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Iterable
from typing import Any

from ..errors import AmbiguousCredentials, GatewayError
from ..pipeline.context import AMBIGUOUS
from ..schemas.events import Chunk, StreamEvent

__all__ = ["DIRECT_BODY", "ChunkWriter", "RequestHeaders", "RequestIds", "chunk_writer", "connection_gone",
           "error_header_map", "send_body", "send_error"]

# An attribute of the server's request cycle (the object whose bound method is `send`): the gateway's
# HTTP protocol sets it on the uvicorn httptools cycles it makes, whose chunked body writes `ChunkWriter`
# knows how to make itself. Any other server, or protocol, goes through `send` for every part.
DIRECT_BODY = "gateway_direct_body"

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
JSON = b"application/json"


class RequestIds:
    """Request ids, unique rather than unpredictable: a random prefix per gateway and a counter
    cost a fraction of reading the OS's random source on every request (a profile showed
    `secrets.token_hex` at 2% of the gateway's CPU)."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = "req_" + secrets.token_hex(6)
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


class RequestHeaders:
    """The few request headers the gateway reads, found in one pass over the ASGI list.

    A credential is `Authorization: Bearer <key>`, `api-key` (Azure's SDK) or `x-api-key` (Anthropic's). Two
    different ones in one request (two of a kind or one of each) are refused, never resolved: whichever the gateway
    picked, a front proxy that adds its own would decide which tenant pays. Reading `credential` then raises a 400
    (`ambiguous_credentials`) wherever it is read, before any key look-up; the same value repeated is one credential.
    """

    __slots__ = ("_ambiguous", "_credential", "content_length", "request_id", "size")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]], ids: RequestIds) -> None:
        credential = request_id = None
        ambiguous = False
        content_length: int | None = None
        size = 0
        for name, value in raw:
            size += len(name) + len(value) + 4
            if name == b"authorization" or name == b"api-key" or name == b"x-api-key":
                presented = value.decode("latin-1").strip()
                if name == b"authorization":
                    scheme, _, token = presented.partition(" ")
                    presented = token.strip() if scheme.lower() == "bearer" else ""
                if presented:
                    if credential is None:
                        credential = presented
                    elif presented != credential:
                        ambiguous = True
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _SANE_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
            elif name == b"content-length":
                content_length = int(value) if value.isdigit() else -1
        self._credential = credential
        self._ambiguous = ambiguous
        self.request_id = request_id or ids.new()
        self.content_length = content_length
        self.size = size

    @property
    def credential(self) -> str | None:
        """The presented key (None: none); raises `InvalidRequest` when the request carries two different ones."""
        if self._ambiguous:
            raise AmbiguousCredentials()
        return self._credential

    @property
    def presented(self) -> str | None:
        """`credential` for the proxied endpoints' pipeline, which refuses `AMBIGUOUS` itself (`Authenticate`)."""
        return AMBIGUOUS if self._ambiguous else self._credential


def error_header_map(error: GatewayError, request_id: str) -> dict[str, str]:
    """The headers every error reply carries, whichever layer sends it."""
    headers = {"x-request-id": request_id, **{k.lower(): v for k, v in error.headers.items()}}
    if error.status == 401:
        headers["www-authenticate"] = "Bearer"
    return headers


async def send_body(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Any, error: GatewayError, request_id: str, *extra: tuple[bytes, bytes], body: bytes | None = None,
) -> None:
    """The error reply: OpenAI's envelope, or `body` (another API's envelope, same status)."""
    body = error.body() if body is None else body
    headers = [(b"content-type", JSON), (b"content-length", str(len(body)).encode()), *extra]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in error_header_map(error, request_id).items()]
    await send_body(send, error.status, headers, body)


# The HTTP chunk head and the SSE field before a lone chunk's payload of each size up to _FRAMED_HEADS - 1
# (about 90 kB); then the event's blank line and the HTTP chunk's end.
_FRAMED_HEADS = 2048
_FRAMED_HEAD = [b"%x\r\ndata: " % (size + 8) for size in range(_FRAMED_HEADS)]
_FRAMED_TAIL = b"\n\n\r\n"


class ChunkWriter:
    """A streamed response's body parts, written straight to the connection in HTTP/1.1 chunked framing.

    On a slow stream each event is one body part; uvicorn's `send` (a coroutine, a message dict,
    its checks) cost about a fifteenth of the gateway's instructions per forwarded event. `write`
    does what that `send` does for a body part in the common case, and declines (False: use `send`)
    whenever anything else applies: the response is not chunked (e.g. HEAD), writing is paused by
    flow control (`send` waits for the drain), the client is gone (`send` drops the part), the
    response is complete, or the part is empty. The last part (`more_body: False`) always goes
    through `send`, which ends the body and the response cycle. A part written to a connection that is
    going away is dropped, as `send` drops it (uvloop raises RuntimeError on a write once the connection
    is lost; the `try` costs nothing when the write succeeds).
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle

    def write(self, data: bytes) -> bool:
        transport = self._transport() if data else None
        if transport is None:
            return False
        try:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        except RuntimeError:
            if not transport.is_closing():
                raise
        return True

    def write_chunk(self, events: list[StreamEvent]) -> bool:
        """`write(sse.frame(events))` for a batch of one OpenAI `Chunk` (a slow stream's every batch), in one
        formatting instead of two (False, writing nothing, for any other batch, or when `write` would be)."""
        if len(events) != 1 or type(event := events[0]) is not Chunk:
            return False
        transport = self._transport()
        if transport is None:
            return False
        payload = event.payload
        size = len(payload)
        try:
            if size < _FRAMED_HEADS:  # a chunk's usual size: its head looked up, not formatted (about 300 instructions)
                transport.write(b"".join((_FRAMED_HEAD[size], payload, _FRAMED_TAIL)))
            else:
                transport.write(b"%x\r\ndata: %b\n\n\r\n" % (size + 8, payload))
        except RuntimeError:  # the connection is going away (see the class's docstring)
            if not transport.is_closing():
                raise
        return True

    def _transport(self) -> Any:
        """The connection's transport, when a body part may be written to it directly."""
        cycle = self._cycle
        try:  # uvicorn's cycle attributes are not its API: a release that renames one falls back to `send`
            if cycle.chunked_encoding is not True or cycle.flow.write_paused or cycle.disconnected \
                    or cycle.response_complete:
                return None
            return cycle.transport
        except AttributeError:
            return None


def connection_gone(send: Any) -> bool:
    """Whether the connection behind `send` (a server's request cycle) is lost or closing: a write that failed
    then is the client's leaving, not a bug. False when the server does not say."""
    cycle = getattr(send, "__self__", None)
    if getattr(cycle, "disconnected", False) is True:
        return True
    transport = getattr(cycle, "transport", None)
    try:
        return transport is not None and transport.is_closing() is True
    except AttributeError:
        return False


def chunk_writer(send: Any) -> ChunkWriter | None:
    """A `ChunkWriter` for this request's response, when the server's protocol allows one (`DIRECT_BODY`)."""
    cycle = getattr(send, "__self__", None)
    return ChunkWriter(cycle) if getattr(cycle, DIRECT_BODY, False) else None
