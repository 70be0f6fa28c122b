"""The upstream request whose small body is written without a task (`gateway/upstream/request.py`).

Each case sends the same requests through a session with aiohttp's own `ClientRequest` and one with
`InlineBodyRequest`, to a server that records the bytes it receives: they must be the same, and the
inline path must have been taken exactly where it applies.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import aiohttp
import pytest
from aiohttp.client_reqrep import ClientRequest

from gateway.upstream import request as inline
from gateway.upstream.request import INLINE_BODY_LIMIT, InlineBodyRequest, request_class

_REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Recorder:
    """A server that answers every request with `_REPLY` once its body is in, recording the bytes per connection."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray()
        self.received.append(data)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                data += head
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                data += await reader.readexactly(length)
                writer.write(_REPLY)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def _exchange(request_cls: type[ClientRequest], calls: list[dict[str, Any]], **session: Any) -> bytes:
    recorder = _Recorder()
    async with recorder as base:
        async with aiohttp.ClientSession(request_class=request_cls, **session) as client:
            for call in calls:
                call = dict(call)
                async with client.request(call.pop("method", "POST"), base + call.pop("path", "/v1/chat"),
                                          **call) as response:
                    assert response.status == 200
                    assert await response.read() == b"{}"
    port = base.rsplit(":", 1)[1].encode()
    return b"".join(bytes(part) for part in recorder.received).replace(b":" + port + b"\r\n", b":PORT\r\n")


_SESSION = {"headers": {"Content-Type": "application/json", "Authorization": "Bearer sk-test"},
            "skip_auto_headers": ("User-Agent",)}
_CASES = [
    [{"data": b'{"model":"m","stream":true}', "headers": {"X-Request-Id": "r1"}}],
    [{"data": b'{"a":1}', "params": {"api-version": "2024"}, "headers": {"traceparent": "00-ab-cd-01"}},
     {"data": b'{"b":2}', "headers": {"X-Request-Id": "r2"}}],  # the second on the pooled connection
    [{"data": b"x" * INLINE_BODY_LIMIT}],  # the largest inline body
    [{"data": b"y" * (INLINE_BODY_LIMIT + 1)}],  # aiohttp's own path
    [{"data": b""}],  # an empty body: aiohttp's own path (no body to write)
    [{"method": "GET", "path": "/v1/models"}],  # no body at all
    [{"json": {"k": "v"}}],  # a JSON payload object, not bytes: aiohttp's own path
    [{"data": b'{"c":3}', "headers": {"Content-Type": "text/plain", "Connection": "close"}}],
    [{"data": b'{"d":4}', "compress": "deflate"}],  # compressed: aiohttp's own path
    [{"data": b'{"e":5}', "chunked": True}],  # chunked: aiohttp's own path
]


@pytest.mark.parametrize("calls", _CASES)
async def test_inline_body_sends_the_bytes_aiohttp_sends(calls: list[dict[str, Any]]) -> None:
    assert await _exchange(InlineBodyRequest, calls, **_SESSION) == await _exchange(ClientRequest, calls, **_SESSION)


async def test_inline_body_without_session_headers_and_with_force_close() -> None:
    calls = [{"data": b'{"f":6}'}, {"data": b'{"g":7}'}]
    assert await _exchange(InlineBodyRequest, calls) == await _exchange(ClientRequest, calls)
    closing = [await _exchange(cls, calls, connector=aiohttp.TCPConnector(force_close=True))
               for cls in (ClientRequest, InlineBodyRequest)]
    assert closing[0] == closing[1]
    assert b"Connection: close" in closing[0]


async def test_inline_body_path_is_taken_only_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[bool] = []
    decide = InlineBodyRequest._inline_body

    def recorded(self: InlineBodyRequest, conn: Any) -> bool:
        taken.append(decide(self, conn))
        return taken[-1]

    monkeypatch.setattr(InlineBodyRequest, "_inline_body", recorded)
    created: list[str] = []
    create_task = asyncio.create_task

    def counted(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro.__qualname__)
        return create_task(coro, **kwargs)

    monkeypatch.setattr(asyncio, "create_task", counted)
    await _exchange(InlineBodyRequest, [{"data": b'{"a":1}'}, {"data": b"z" * (INLINE_BODY_LIMIT + 1)},
                                        {"data": b'{"c":3}', "chunked": True}], **_SESSION)
    assert taken == [True, False, False]
    assert created.count("ClientRequest.write_bytes") == (2 if sys.version_info < (3, 12) else 0)


async def test_a_failed_body_write_surfaces_as_a_client_error() -> None:
    """A connection closed under the request: a `ClientError` when the response is awaited, from either class
    (which one, a write's or a read's, depends on when the close arrives, with aiohttp's own path too)."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for request_cls in (ClientRequest, InlineBodyRequest):
            async with aiohttp.ClientSession(request_class=request_cls) as client:
                with pytest.raises(aiohttp.ClientError):
                    async with client.post(f"http://127.0.0.1:{port}/", data=b'{"a":1}') as response:
                        await response.read()
    finally:
        server.close()
        await server.wait_closed()


def test_request_class_falls_back_on_an_unchecked_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    assert request_class() is InlineBodyRequest
    monkeypatch.setattr(inline.aiohttp, "__version__", "4.0.0")
    assert request_class() is ClientRequest
