"""The OpenAI stream's `forward(sink)`: batches written from the connection's read while the reader waits.

Compared with the same stream read only through `reads()` (the edge's polling loop): the same frames in the
same order, whatever the sink declines (it is then handed over by `ready()`), the same end on `[DONE]`, on a
cut connection and on an idle timeout; and the reader's task resumes only for what the sink declined.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from types import SimpleNamespace

import aiohttp
import httpx
import pytest

from gateway.api.sse import frame
from gateway.providers.openai_chunks import peek_chunk, peek_chunk_choices
from gateway.providers.openai_stream import OpenAIStream
from gateway.schemas.events import Chunk, StreamEvent
from gateway.upstream.handler import install
from tests.conftest import FULL_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _events(count: int) -> list[bytes]:
    return [b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}],"usage":null}\n\n' % i for i in range(count)]


async def _serve(events: list[bytes], end: str) -> tuple[asyncio.AbstractServer, int]:
    """Every request gets `events` (a chunk each, some split across writes, some two in one write), then `end`:
    "done" ([DONE] and the end of the body), "cut" (the connection closes mid-chunk) or "stall" (nothing more)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(_HEAD)
                for i, event in enumerate(events):
                    framed = b"%x\r\n%b\r\n" % (len(event), event)
                    if i % 6 == 2:  # split inside the chunk's head and inside its event
                        for piece in (framed[:1], framed[1:12], framed[12:]):
                            writer.write(piece)
                            await writer.drain()
                            await asyncio.sleep(0.002)
                        continue
                    writer.write(framed)
                    if i % 6 != 4:  # (4 and 5 leave in one write)
                        await writer.drain()
                        await asyncio.sleep(0.002)
                if end == "done":
                    done = b"data: [DONE]\n\n"
                    writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
                elif end == "cut":
                    writer.write(b"40\r\ndata: {")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.close()
                    return
                else:
                    await asyncio.sleep(5)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _read(stream: OpenAIStream, sink: Callable[[list[StreamEvent]], bool] | None) -> tuple[list[bytes], int]:
    """The edge's polling loop (`api.proxy`): the frames written, in order, and how often the reader's task resumed."""
    ready, wait = stream.reads()
    if sink is not None:
        assert stream.forward(sink)
    written: list[bytes] = []
    resumed = 0
    try:
        while True:
            batch = ready()
            if batch:
                written.append(frame(batch, False))
                continue
            if batch is not None:
                return written, resumed
            try:
                await wait()
            except Exception:  # noqa: BLE001 -- as the edge: `ready()` ends the stream with it
                pass
            resumed += 1
    finally:
        await stream.aclose()


def _short_path_session() -> aiohttp.ClientSession:
    """A session whose connections take the short path for streamed bodies (`upstream/handler.install`)."""
    connector = aiohttp.TCPConnector(limit=0)
    assert install(connector)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def _stream(session: aiohttp.ClientSession, port: int, idle_s: float) -> OpenAIStream:
    response = await session.post(f"http://127.0.0.1:{port}/", data=b"{}")
    provider = SimpleNamespace(name="p", sanitize=str, release=lambda: None, stream_usage_expected=True)
    loop = asyncio.get_running_loop()
    return OpenAIStream(provider, response, loop.time() + 60, True, idle_s)  # type: ignore[arg-type]


@pytest.mark.parametrize("end", ["done", "cut", "stall"])
async def test_forwarding_writes_what_polling_writes(end: str) -> None:
    events = _events(30)
    server, port = await _serve(events, end)
    outcomes: list[list[bytes]] = []
    try:
        async with _short_path_session() as session:
            taken: list[bytes] = []
            declined = 0

            def sink(batch: list[StreamEvent]) -> bool:
                nonlocal declined
                if len(batch) != 1 or type(batch[0]) is not Chunk or len(taken) % 5 == 3:  # some declined
                    declined += 1
                    return False
                taken.append(frame(batch, False))
                return True

            polled, polled_resumes = await asyncio.wait_for(_read(await _stream(session, port, 0.3), None), 10)
            outcomes.append(polled)
            forwarded, resumed = await asyncio.wait_for(_read(await _stream(session, port, 0.3), sink), 10)
            # the sink's frames and the reader's, in the order they were written: the reader writes what the
            # sink declined (each resumes it); a merge by position is not needed to compare the bytes
            outcomes.append(taken + forwarded)
    finally:
        server.close()
        await server.wait_closed()
    assert b"".join(outcomes[1]) != b"" and sorted(outcomes[0]) == sorted(outcomes[1])
    assert b"".join(outcomes[0]).count(b"data: ") == b"".join(outcomes[1]).count(b"data: ")
    assert taken and resumed < polled_resumes - len(taken) // 2  # the task slept through what the sink took
    last = outcomes[0][-1]
    assert last == b"data: [DONE]\n\n" if end == "done" else last.startswith(b'data: {"error"')


async def test_forwarding_keeps_the_order_of_frames() -> None:
    """One list for the sink and the reader: the frames in the order they were written."""
    events = _events(24)
    server, port = await _serve(events, "done")
    try:
        async with _short_path_session() as session:
            written: list[bytes] = []
            count = 0

            def sink(batch: list[StreamEvent]) -> bool:
                nonlocal count
                count += 1
                if len(batch) != 1 or count % 4 == 0:
                    return False
                written.append(frame(batch, False))
                return True

            stream = await _stream(session, port, 5)
            ready, wait = stream.reads()
            assert stream.forward(sink)
            while True:
                batch = ready()
                if batch:
                    written.append(frame(batch, False))
                    continue
                if batch is not None:
                    break
                await wait()
            await stream.aclose()
    finally:
        server.close()
        await server.wait_closed()
    # (the stream hides the `"usage": null` its own usage request added)
    assert b"".join(written) == b"".join(events).replace(b',"usage":null', b"") + b"data: [DONE]\n\n"


async def test_forward_declines_a_connection_without_the_short_path() -> None:
    server, port = await _serve(_events(3), "done")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:  # aiohttp's protocol
            stream = await _stream(session, port, 5)
            stream.reads()
            assert not stream.forward(lambda batch: True)
            frames, _ = await asyncio.wait_for(_read(stream, None), 10)
    finally:
        server.close()
        await server.wait_closed()
    assert frames[-1] == b"data: [DONE]\n\n" and len(frames) >= 2



def _raw_stream(gateway: RunningGateway, model: str) -> bytes:
    """A streamed answer's body as the client got it, ids and timestamps blanked."""
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        raw = response.read()
    return re.sub(rb'"created":\s*\d+', b'"created":0', re.sub(rb'"id":\s*"[^"]*"', b'"id":""', raw))


def test_the_edge_writes_a_slow_stream_from_the_connection_read(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the gateway, a slow stream's chunks are written by the sink from the upstream connection's read
    (the edge's `reads(sink)`), and the client gets the bytes it gets when every chunk wakes the request's task."""
    pumped: list[bool] = []
    pump = OpenAIStream._pump

    def counted(self: OpenAIStream) -> bool:
        took = pump(self)
        pumped.append(took)
        return took

    monkeypatch.setattr(OpenAIStream, "_pump", counted)
    paced = policy_text(upstream.base_url).replace("model: fault-slow-stream-250}", "model: fault-slow-stream-5}")
    gateway = make_gateway(paced)
    forwarded = _raw_stream(gateway, "fault-slow-stream-250")
    assert forwarded.count(b"data: ") > 40 and forwarded.endswith(b"data: [DONE]\n\n")
    assert pumped.count(True) > 25  # most of the 50 paced chunks never woke the task
    pumped.clear()
    monkeypatch.setattr(OpenAIStream, "forward", lambda self, sink: False)
    assert _raw_stream(gateway, "fault-slow-stream-250") == forwarded
    assert not pumped


async def test_a_chunk_a_reader_cannot_type_passes_as_when_nobody_reads_it() -> None:
    """When a stage reads every chunk's choices (quality signals), a chunk whose choices do not fit the typed
    form (`"content": 5`) is passed on untyped, as without such a stage, instead of ending the stream."""
    events = _events(6)
    events[3] = b'data: {"choices":[{"index":0,"delta":{"content":5}}],"usage":null}\n\n'
    server, port = await _serve(events, "done")
    written: list[list[bytes]] = []
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            for read_choices in (False, True):
                stream = await _stream(session, port, 5)
                stream._read_choices = read_choices
                stream._peek = peek_chunk_choices if read_choices else peek_chunk
                written.append((await asyncio.wait_for(_read(stream, None), 10))[0])
    finally:
        server.close()
        await server.wait_closed()
    assert written[0] == written[1]
    assert b"".join(written[1]).count(b"data: ") == 7 and written[1][-1] == b"data: [DONE]\n\n"
