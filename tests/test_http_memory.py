"""Smaller per-connection objects for uvicorn's protocol (gateway/http_memory.py): same behaviour, less memory."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

from gateway.http_memory import SmallDeque, slim_connection, slim_cycle
from gateway.http_server import server_limits
from tests.test_http_limits import VARIANTS, request_bytes

BIG = 8 * 1024 * 1024  # far past any socket buffer: the server must wait for a slow reader


def test_small_deque_does_what_the_pipeline_asks_of_a_deque() -> None:
    ours, theirs = SmallDeque(), deque[int]()
    for queue in (ours, theirs):
        for item in (1, 2, 3):
            queue.appendleft(item)
    assert [ours.pop(), ours.popleft(), bool(ours)] == [theirs.pop(), theirs.popleft(), bool(theirs)] == [1, 3, True]
    assert ours.pop() == theirs.pop() == 2 and not ours and not theirs


def test_an_event_with_list_waiters_waits_wakes_and_forgets_its_waiters() -> None:
    async def scenario() -> None:
        cycle = SimpleNamespace(message_event=asyncio.Event())
        slim_cycle(cycle)
        event = cycle.message_event
        assert type(event._waiters) is list  # asyncio.Event kept its deque if this fails
        waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(event._waiters) == 3 and not any(w.done() for w in waiters)
        event.set()
        assert await asyncio.gather(*waiters) == [True, True, True]
        assert event._waiters == []
        event.clear()
        late = asyncio.create_task(event.wait())
        await asyncio.sleep(0)
        late.cancel()  # a cancelled waiter is removed too
        with pytest.raises(asyncio.CancelledError):
            await late
        assert event._waiters == [] and not event.is_set()

    asyncio.run(scenario())


def test_what_is_not_an_empty_deque_is_left_alone() -> None:
    busy = deque([1])
    flow_event = asyncio.Event()
    flow_event._waiters.append(object())  # someone waits: not ours to swap
    protocol = SimpleNamespace(pipeline=busy, flow=SimpleNamespace(_is_writable_event=flow_event))
    slim_connection(protocol)
    assert protocol.pipeline is busy and type(flow_event._waiters) is deque
    other = SimpleNamespace(message_event=threading.Event())  # not an asyncio.Event
    slim_cycle(other)
    assert isinstance(other.message_event, threading.Event)
    slim_connection(SimpleNamespace())  # nothing to swap: no error
    slim_cycle(SimpleNamespace())


class _Big:
    """An ASGI app that sends BIG bytes through `send` (flow control waits) and notes what it saw."""

    def __init__(self) -> None:
        self.waiters: list[type] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        cycle = getattr(send, "__self__", None)
        for holder, name in ((cycle, "message_event"), (getattr(cycle, "flow", None), "_is_writable_event")):
            event = getattr(holder, name, None)
            if event is not None:
                self.waiters.append(type(event._waiters))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(BIG).encode())]})
        part = b"x" * (64 * 1024)
        for sent in range(0, BIG, len(part)):
            await send({"type": "http.response.body", "body": part, "more_body": sent + len(part) < BIG})


@pytest.fixture(params=VARIANTS)
def big_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, _Big, str]]:
    http, loop = request.param
    app = _Big()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", loop=loop,
                            **server_limits(http=http))  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1], app, http
    server.should_exit = True
    thread.join(10)
    sock.close()


def read_all(sock: socket.socket) -> int:
    """The body length of one 200 answer with a Content-Length, read without keeping the body."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    buffer, got = bytearray(65536), 0
    while got < length:
        n = sock.recv_into(buffer, min(len(buffer), length - got))
        assert n, "closed early"
        got += n
    return got


def test_a_slow_reader_gets_every_byte_and_the_next_answer(big_server: tuple[int, _Big, str]) -> None:
    port, app, http = big_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(2):  # the second request reuses the connection, pipeline and flow control included
            sock.sendall(request_bytes("GET", "/big"))
            time.sleep(0.3)  # the server fills the socket and waits on its flow-control event
            assert read_all(sock) == BIG
    # Both events were slimmed (the h11 fallback's request cycle keeps its own message event).
    expected = [list, list] if http == "httptools" else [deque, list]
    assert app.waiters == expected * 2
