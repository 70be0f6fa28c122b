"""A client that stops reading an answer is cut off after `server.send_timeout_s`, and what waited to be sent to it is
freed; a client that reads slowly, but reads, is not.

A non-streamed answer nobody read stayed in the gateway's write buffers for as long as its client kept the connection
open with its TCP window shut: the request was over (its `max_requests` slot free, `gateway_requests_in_flight` 0),
and uvicorn's keep-alive close waits for the buffer to drain, which never happens. Ten such connections asking for
60 MB answers held 939 MB for good (H60).
"""

from __future__ import annotations

import json
import socket
import textwrap
import time
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.conftest import RunningGateway
from tests.support.threaded_app import ThreadedApp

BIG = 8 * 1024 * 1024


class BigAnswer(ThreadedApp):
    """Answers a chat with a text of `max_tokens` bytes."""

    def routes(self, app: web.Application) -> None:
        async def chat(request: web.Request) -> web.Response:
            asked = await request.json()
            body = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * asked["max_tokens"]},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
            return web.Response(body=json.dumps(body).encode(), content_type="application/json")

        app.router.add_post("/v1/chat/completions", chat)


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with BigAnswer() as upstream:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, send_timeout_s: 2}}
            auth: none
            providers:
              up: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1"}}
            models:
              big: {{provider: up, model: m}}
            """)
        running = RunningGateway(text, {}).start()
        try:
            yield running
        finally:
            running.stop()


def _ask(gateway: RunningGateway, size: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gateway.port))
    body = json.dumps({"model": "big", "max_tokens": size, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%b" % (len(body), body))
    return sock


def _pending(gateway: RunningGateway) -> int:
    """The bytes the gateway's open client connections still have to write."""
    assert gateway.server is not None
    return sum(protocol.transport.get_write_buffer_size() for protocol in list(gateway.server.server_state.connections)
               if protocol.transport is not None)


def test_an_answer_nobody_reads_is_freed_after_the_send_timeout(gateway: RunningGateway) -> None:
    socks = [_ask(gateway, BIG) for _ in range(3)]  # never read
    try:
        deadline = time.monotonic() + 10
        while _pending(gateway) < BIG and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pending(gateway) >= BIG  # answered, and held: the clients read nothing
        deadline = time.monotonic() + 15
        while _pending(gateway) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _pending(gateway) == 0  # cut off after 2 s, its bytes freed
        with pytest.raises(OSError):  # (reset: what the kernel still held for it is dropped)
            for _ in range(10_000):
                if not socks[0].recv(65536):
                    raise ConnectionResetError
    finally:
        for sock in socks:
            sock.close()


def test_a_client_that_reads_slowly_gets_its_whole_answer(gateway: RunningGateway) -> None:
    """It reads in bursts 1.5 s apart, for longer than the 2 s timeout in all: each burst resumes the writing."""
    size = BIG
    sock = _ask(gateway, size)
    received = b""
    started = time.monotonic()
    try:
        sock.settimeout(0.2)
        deadline = time.monotonic() + 30
        while not (received.endswith(b"}") and len(received) > size) and time.monotonic() < deadline:
            time.sleep(1.5)
            burst = len(received) + 2 * 1024 * 1024  # 2 MiB a burst: four of them, the answer held between
            try:
                while len(received) < burst and (piece := sock.recv(65536)):
                    received += piece
            except TimeoutError:
                continue
            if len(received) < burst:
                break  # (closed)
    finally:
        sock.close()
    assert time.monotonic() - started > 2.5  # (longer than the timeout: it was paused, and resumed, on the way)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["choices"][0]["message"]["content"] == "x" * size
