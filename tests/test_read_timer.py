"""Unit tests of `upstream.read_timer.ReadTimer`: the idle timeout and the deadline of an upstream body's reads.

One lazily re-armed timer replaces a timeout per read; these tests pin the bound it must keep:
a read that waits fails at `min(deadline, its start + idle_s)`, reads that keep getting data
never do, and time the consumer spends between reads (a slow client) does not count.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from gateway.upstream.read_timer import ReadTimer


class Transport:
    """Enough of a transport for aiohttp's flow control to call."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def reader() -> StreamReader:
    """A real aiohttp body reader, fed by the test instead of a connection."""
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.transport = Transport()  # type: ignore[assignment]
    return StreamReader(protocol, 2**16, loop=loop)


async def test_an_idle_read_times_out_at_its_idle_bound() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 60, 0.2)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(timer.read(), 5)  # (a broken timer fails the bound below instead of hanging)
    assert 0.19 <= loop.time() - started < 0.6
    timer.stop()


async def test_reads_that_keep_getting_data_outlive_many_idle_periods() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 60, 0.15)

    async def feed() -> None:
        for _ in range(10):
            await asyncio.sleep(0.05)
            content.feed_data(b"data: {}\n\n")
        content.feed_eof()

    feeding = asyncio.ensure_future(feed())
    received = b""
    while data := await timer.read():
        received += data
    await feeding
    timer.stop()
    assert received == b"data: {}\n\n" * 10  # 0.5 s in all, 3x idle_s, never idle for 0.15 s


async def test_the_deadline_cuts_a_stream_that_never_idles() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    started = loop.time()
    timer = ReadTimer(content, started + 0.3, 0.2)

    async def feed() -> None:
        while True:
            await asyncio.sleep(0.05)
            content.feed_data(b"x")

    async def read_all() -> None:
        while True:
            await timer.read()

    feeding = asyncio.ensure_future(feed())
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_all(), 5)
    finally:
        feeding.cancel()
        timer.stop()
    assert 0.29 <= loop.time() - started < 0.7


async def test_time_spent_between_reads_does_not_count_against_the_idle_bound() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 60, 0.1)
    content.feed_data(b"first")
    assert await timer.read() == b"first"
    await asyncio.sleep(0.35)  # the consumer is busy (a slow client) for 3.5x idle_s; the timer fires meanwhile
    content.feed_data(b"second")
    assert await timer.read() == b"second"  # data waiting: no timeout
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(timer.read(), 5)  # and the next read that waits still gets its full idle bound
    assert 0.09 <= loop.time() - started < 0.4
    timer.stop()


async def test_begin_and_end_time_a_read_as_read_does() -> None:
    """The stream loops' frameless form: the consumer's time after `end()` does not count, a wait after
    `begin()` does."""
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 60, 0.1)
    content.feed_data(b"first")
    assert await timer.begin() == b"first"
    timer.end()
    await asyncio.sleep(0.35)  # the consumer is busy past idle_s: not counted after end()
    content.feed_data(b"second")
    assert await timer.begin() == b"second"
    timer.end()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(timer.begin(), 5)
    assert 0.09 <= loop.time() - started < 0.4
    timer.stop()


async def test_a_read_started_past_the_deadline_fails_only_if_it_has_to_wait() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 0.05, 5)
    await asyncio.sleep(0.1)
    content.feed_data(b"late")
    assert await timer.read() == b"late"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(timer.read(), 1)  # fails at once, not after wait_for's 1 s
    timer.stop()


async def test_stop_cancels_the_timer() -> None:
    loop = asyncio.get_running_loop()
    content = reader()
    timer = ReadTimer(content, loop.time() + 60, 0.05)
    content.feed_data(b"x")
    assert await timer.read() == b"x"
    timer.stop()
    await asyncio.sleep(0.15)
    content.feed_data(b"y")
    assert await timer.read() == b"y"  # the stopped timer did not poison the reader
    assert content.exception() is None


async def test_a_timed_out_read_is_a_timeout_for_the_transport_mapping() -> None:
    from gateway.errors import UpstreamTimeout
    from gateway.upstream.client import transport_error

    loop = asyncio.get_running_loop()
    timer = ReadTimer(reader(), loop.time() + 60, 0.05)
    try:
        await timer.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        assert isinstance(transport_error(exc, "p", "mid-stream"), UpstreamTimeout)
    else:  # pragma: no cover
        pytest.fail("no timeout")
    finally:
        timer.stop()


# --- `ready()` / `wait()`: aiohttp's StreamReader read without `readany()` (upstream/body.py) -----------------

def test_the_fast_path_is_taken_for_aiohttps_own_reader() -> None:
    """Fails after an aiohttp upgrade until `body.take` is checked against the new StreamReader (then add the
    release to `_CHECKED_RELEASES`); until then the gateway reads through `readany()`, correct but slower."""
    from gateway.upstream.body import adopt

    async def check() -> None:
        content = reader()
        assert adopt(content)
        assert not adopt(content)  # once per body
        assert not adopt(public_only(reader()))
        assert not adopt(object())

    asyncio.run(check())


class _PublicOnly(StreamReader):
    """A reader that `body.adopt` declines: `ReadTimer` reads it through `readany()`."""

    __slots__ = ()


def public_only(content: StreamReader) -> StreamReader:
    content.__class__ = _PublicOnly
    return content


async def _read_all(timer: ReadTimer) -> tuple[list[bytes], str]:
    """Every read of a body through `ready()`/`wait()`, and how it ended."""
    reads: list[bytes] = []
    try:
        while True:
            data = timer.ready()
            while data is None:
                await timer.wait()
                timer.end()
                data = timer.ready()
            if not data:
                return reads, "eof"
            reads.append(data)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return reads, type(exc).__name__
    finally:
        timer.stop()


async def test_ready_and_wait_read_what_readany_reads_from_a_fed_reader() -> None:
    loop = asyncio.get_running_loop()
    outcomes = []
    for public in (True, False):
        content = public_only(reader()) if public else reader()

        async def feed(content: StreamReader = content) -> None:
            content.begin_http_chunk_receiving()  # as aiohttp's parser feeds a chunked body
            content.feed_data(b"data: 1\n\n")
            content.end_http_chunk_receiving()
            await asyncio.sleep(0)
            content.feed_data(b"data: 2")
            content.end_http_chunk_receiving()
            content.feed_data(b"\n\n")  # two parts buffered before the read: one read of both
            content.end_http_chunk_receiving()
            await asyncio.sleep(0.01)
            content.end_http_chunk_receiving()  # a chunk that brought nothing wakes no read
            content.feed_data(b"data: 3\n\n")
            content.end_http_chunk_receiving()
            await asyncio.sleep(0.01)
            content.feed_eof()

        feeding = asyncio.ensure_future(feed())
        outcomes.append(await _read_all(ReadTimer(content, loop.time() + 60, 5)))
        await feeding
    assert outcomes[0] == outcomes[1] == ([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"], "eof")


async def test_ready_and_wait_time_out_and_fail_as_readany_does() -> None:
    loop = asyncio.get_running_loop()
    for public in (True, False):
        content = public_only(reader()) if public else reader()
        content.feed_data(b"x")
        assert await _read_all(ReadTimer(content, loop.time() + 60, 0.05)) == ([b"x"], "TimeoutError")
        content = public_only(reader()) if public else reader()
        loop.call_later(0.01, content.set_exception, aiohttp.ClientPayloadError("cut"))
        assert await _read_all(ReadTimer(content, loop.time() + 60, 5)) == ([], "ClientPayloadError")


async def _serve_chunked(parts: list[bytes], cut: bool) -> tuple[asyncio.AbstractServer, int]:
    """A raw HTTP/1.1 server: a chunked SSE body in `parts` (each one HTTP chunk, a short pause between), then
    its end, or a connection cut mid-chunk."""

    async def handle(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader_.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, part in enumerate(parts):
            writer.write(b"%x\r\n%b\r\n" % (len(part), part))
            if i % 7 == 0:
                await writer.drain()
                await asyncio.sleep(0.002)
        if cut:
            await asyncio.sleep(0.2)  # the client has read everything before: a failure drops what is buffered
        writer.write(b"40\r\npartial" if cut else b"0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("cut", [False, True])
async def test_ready_and_wait_read_a_real_response_as_readany_does(cut: bool) -> None:
    """Over a connection, with flow control pausing and resuming the transport (a small read buffer and a
    burst of 200 kB): the same bytes and the same end through both paths."""
    parts = [b"data: {\"n\": %d}\n\n" % i for i in range(40)] + [b"x" * 5000] * 40
    server, port = await _serve_chunked(parts, cut)
    loop = asyncio.get_running_loop()
    outcomes = []
    try:
        timeout = aiohttp.ClientTimeout(total=None)  # as the gateway's sessions (`upstream.client.new_session`)
        async with aiohttp.ClientSession(read_bufsize=1024, timeout=timeout) as session:
            for public in (True, False):
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    content = public_only(response.content) if public else response.content
                    timer = ReadTimer(content, loop.time() + 60, 5)
                    assert timer._fast is not public
                    reads, end = await asyncio.wait_for(_read_all(timer), 10)
                    outcomes.append((b"".join(reads), end))
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes[0] == outcomes[1]
    # (the cut chunk's first bytes arrive as they are, then the failure)
    assert outcomes[0] == (b"".join(parts) + b"partial", "ClientPayloadError") if cut else (b"".join(parts), "eof")


async def _read_all_waiting_first(timer: ReadTimer) -> tuple[list[bytes], str]:
    """`_read_all` as the edge polls a stream: after each read it waits at once, without asking `ready()` (which
    would say None: a read takes everything there is); a wait with bytes, the end or a failure there already
    is over at once."""
    reads: list[bytes] = []
    try:
        data = timer.ready()
        while True:
            while data is None:
                await timer.wait()
                data = timer.ready()
            if not data:
                return reads, "eof"
            reads.append(data)
            await timer.wait()
            data = timer.ready()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return reads, type(exc).__name__
    finally:
        timer.stop()


@pytest.mark.parametrize("cut", [False, True])
async def test_waiting_right_after_a_read_reads_what_asking_first_reads(cut: bool) -> None:
    parts = [b"data: {\"n\": %d}\n\n" % i for i in range(40)] + [b"x" * 5000] * 40
    server, port = await _serve_chunked(parts, cut)
    loop = asyncio.get_running_loop()
    outcomes = []
    try:
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(read_bufsize=1024, timeout=timeout) as session:
            for read_all in (_read_all, _read_all_waiting_first):
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    timer = ReadTimer(response.content, loop.time() + 60, 5)
                    assert timer._fast
                    reads, end = await asyncio.wait_for(read_all(timer), 10)
                    outcomes.append((b"".join(reads), end))
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == (b"".join(parts) + b"partial", "ClientPayloadError") if cut else (b"".join(parts), "eof")


async def test_a_wait_with_bytes_the_end_or_a_failure_there_already_is_over_at_once() -> None:
    loop = asyncio.get_running_loop()
    for arrange in (lambda c: c.feed_data(b"x"), lambda c: c.feed_eof(),
                    lambda c: c.set_exception(aiohttp.ClientPayloadError("cut"))):
        content = reader()
        timer = ReadTimer(content, loop.time() + 60, 5)
        arrange(content)
        waiting = timer.wait()
        assert isinstance(waiting, asyncio.Future) and waiting.done()
        await waiting
        timer.stop()


# --- the connection's short path for a streamed body's bytes (upstream/handler.py) -------------------------------

_SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _serve_keep_alive(parts: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """A raw HTTP/1.1 server that answers every request on a connection with the chunked SSE body `parts`, some
    chunks split across writes, and keeps the connection open for the next request."""

    async def handle(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader_.readuntil(b"\r\n\r\n")
                writer.write(_SSE_HEAD)
                for i, part in enumerate(parts):
                    framed = b"%x\r\n%b\r\n" % (len(part), part)
                    if i % 5 == 1:  # a chunk split inside its head, and inside its data
                        for piece in (framed[:1], framed[1:9], framed[9:]):
                            writer.write(piece)
                            await writer.drain()
                            await asyncio.sleep(0.001)
                    else:
                        writer.write(framed)
                    if i % 7 == 0:
                        await writer.drain()
                        await asyncio.sleep(0.002)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _session(short: bool, **options: Any) -> aiohttp.ClientSession:
    """A session on the connection's short path (`short`) or on aiohttp's own protocol."""
    from gateway.upstream.handler import install

    connector = aiohttp.TCPConnector(limit=0)
    assert install(connector) if short else True
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None), **options)


async def test_the_connections_short_path_reads_what_aiohttps_reads_and_keeps_the_connection() -> None:
    """Through `StreamingResponseHandler` (three bodies in turn on one pooled connection) and through aiohttp's own
    protocol: the same bytes; the connection is reused after each streamed body, whose end puts it back on
    aiohttp's path for the next response's head."""
    from gateway.upstream.handler import StreamingResponseHandler

    parts = [b"data: {\"n\": %d}\n\n" % i for i in range(30)] + [b"y" * 3000] * 30
    server, port = await _serve_keep_alive(parts)
    loop = asyncio.get_running_loop()
    outcomes = []
    try:
        for short in (False, True):
            async with _session(short, read_bufsize=1024) as session:
                protocols = set()
                for _ in range(3):
                    async with session.get(f"http://127.0.0.1:{port}/") as response:
                        protocol = response.connection.protocol if response.connection else None
                        protocols.add(id(protocol))
                        assert isinstance(protocol, StreamingResponseHandler) is short
                        timer = ReadTimer(response.content, loop.time() + 60, 5)
                        assert timer._fast
                        assert (getattr(protocol, "_streamed", None) is response.content) is short
                        reads, end = await asyncio.wait_for(_read_all_waiting_first(timer), 10)
                        outcomes.append((b"".join(reads), end))
                        assert getattr(protocol, "_streamed", None) is None  # the end of the body ended the short path
                assert len(protocols) == 1  # one keep-alive connection carried the three
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes == [(b"".join(parts), "eof")] * 6


async def test_the_connections_short_path_fails_a_cut_body_as_aiohttp_does() -> None:

    parts = [b"data: {\"n\": %d}\n\n" % i for i in range(20)]
    server, port = await _serve_chunked(parts, cut=True)
    loop = asyncio.get_running_loop()
    outcomes = []
    try:
        for short in (False, True):
            async with _session(short) as session:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    reads, end = await asyncio.wait_for(_read_all(ReadTimer(response.content, loop.time() + 60, 5)), 10)
                    outcomes.append((b"".join(reads), end))
    finally:
        server.close()
        await server.wait_closed()
    assert outcomes[0] == outcomes[1] == (b"".join(parts) + b"partial", "ClientPayloadError")


def test_install_takes_only_aiohttps_own_protocol_factory() -> None:
    """Fails after an aiohttp upgrade until `handler.py` is checked against its `ResponseHandler.data_received`
    (then add the release to `_CHECKED_RELEASES`); until then the connections are aiohttp's own."""
    from gateway.upstream.handler import StreamingResponseHandler, install

    async def check() -> None:
        connector = aiohttp.TCPConnector()
        assert install(connector)
        assert connector._factory.func is StreamingResponseHandler
        assert not install(connector)  # once
        await connector.close()

    asyncio.run(check())
