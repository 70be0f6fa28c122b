"""The HTTP protocol's limits (gateway/http_server.py), on real sockets on 127.0.0.1.

Each test starts uvicorn in a thread with a tiny raw ASGI app and `server_limits(...)`, for
httptools on uvloop (production), httptools on asyncio (the test harness) and h11 (the fallback).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import select
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

from gateway.api.asgi import DIRECT_BODY, ChunkWriter, chunk_writer
from gateway.api.whole_reply import send_head, send_whole
from gateway.head_joined import HeadJoined
from gateway.http_server import HAVE_HTTPTOOLS, server_limits

try:
    import uvloop  # noqa: F401
except ImportError:  # pragma: no cover
    HAVE_UVLOOP = False
else:
    HAVE_UVLOOP = True

LIMIT = 64 * 1024

VARIANTS = [
    pytest.param(("httptools", "uvloop"), id="httptools-uvloop",
                 marks=pytest.mark.skipif(not (HAVE_HTTPTOOLS and HAVE_UVLOOP), reason="httptools or uvloop missing")),
    pytest.param(("httptools", "asyncio"), id="httptools-asyncio",
                 marks=pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")),
    pytest.param(("h11", "asyncio"), id="h11-asyncio"),
]


class AppState:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = 0
        self.disconnects = 0
        self.direct_writes = 0


def make_app(state: AppState) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        assert scope["type"] == "http"
        path, status = scope["path"], 200
        if path == "/healthz":
            body = b'{"status":"ok"}'
        elif path == "/echo":
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    state.disconnects += 1
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
        elif path == "/headers":  # the request's headers as the app sees them, after its whole body
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    state.disconnects += 1
                    return
                if not message.get("more_body", False):
                    break
            body = json.dumps([[name.decode("latin-1"), value.decode("latin-1")]
                               for name, value in scope["headers"]]).encode()
        elif path == "/stream":  # as the proxy streams: body parts through `ChunkWriter` when the server allows
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            writer = chunk_writer(send)
            for part in (b"one ", b"two ", b"three"):
                if writer is not None and writer.write(part):
                    state.direct_writes += 1
                else:
                    await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        elif path == "/whole":  # as the proxy answers: at once when the server allows, else through `send`
            body = b'{"id":"x"}'
            state.direct_writes += 1  # before: the client may read the reply before this thread goes on
            if send_whole(send, 200, b"application/json", [(b"x-request-id", b"req_1")], body):
                return
            state.direct_writes -= 1
            headers = [(b"content-type", b"application/json"), (b"content-length", b"10"), (b"x-request-id", b"req_1")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        elif path == "/wait":  # as the proxy waits for its upstream: until the client leaves
            state.holding += 1
            while (await receive())["type"] != "http.disconnect":
                pass
            state.disconnects += 1
            return
        elif path == "/hold":
            state.holding += 1
            while not state.release.is_set():
                await asyncio.sleep(0.01)
            body = b"released"
        else:
            status, body = 404, b"{}"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class Server:
    """uvicorn with `server_limits(**limits)` in a thread, on a socket bound here (no port race)."""

    def __init__(self, variant: tuple[str, str], **limits: Any) -> None:
        http, loop = variant
        self.state = AppState()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(make_app(self.state), log_config=None, access_log=False, lifespan="off",
                                loop=loop, timeout_graceful_shutdown=2, **server_limits(http=http, **limits))  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("server did not start")
            time.sleep(0.01)

    @property
    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.state.release.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def serve(variant: tuple[str, str]) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**limits: Any) -> Server:
        servers.append(Server(variant, **limits))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def connect() -> Iterator[Callable[[Server], socket.socket]]:
    """Client sockets, every one closed at the end of the test."""
    opened: list[socket.socket] = []

    def open_(server: Server) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        opened.append(sock)
        return sock

    yield open_
    for sock in opened:
        sock.close()


# -- a minimal HTTP/1.1 client on raw sockets ----------------------------------------------------

def request_bytes(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_unread: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One response; what was read past its end is kept for the next call (pipelining)."""
    sock.settimeout(timeout)
    buf = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    _unread[sock] = rest[length:]
    return int(status_line.split()[1]), headers, rest[:length]


def get(server: Server, path: str = "/healthz", **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request_bytes("GET", path, **kwargs))
        return read_response(sock)


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True if the server closes (FIN or reset) within `timeout`; any response before is read and dropped."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def assert_error(status: int, headers: dict[str, str], body: bytes, expected: int, code: str) -> None:
    assert status == expected
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == code and error["param"] is None and error["message"]
    assert error["type"] == ("server_error" if expected == 503 else "invalid_request_error")


# -- head size -------------------------------------------------------------------------------------

def test_huge_header_is_refused_before_it_is_buffered(serve: Callable[..., Server],
                                                      connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    assert get(server)[0] == 200  # warm up everything a request allocates
    before = rss_bytes()
    sock = connect(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    piece, total, sent = b"a" * 65536, 32 * 1024 * 1024, 0
    answered = False
    try:
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answered = True
                break
    except (BrokenPipeError, ConnectionResetError):
        answered = True
    grown = rss_bytes() - before
    assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert answered, "the server took 32 MiB of header without answering"
    assert sent < total
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 431, "headers_too_large")
    assert closed_by_server(sock, 3)


def test_one_mib_header_gets_431_and_close(serve: Callable[..., Server],
                                           connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/healthz", {"X-Big": "b" * (1024 * 1024)}))
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 431, "headers_too_large")
    assert closed_by_server(sock, 3)
    assert get(server)[0] == 200


def test_head_limit_is_exact_and_counts_only_the_head(serve: Callable[..., Server],
                                                      connect: Callable[[Server], socket.socket]) -> None:
    server = serve(max_header_bytes=LIMIT)
    bare = len(request_bytes("GET", "/healthz", {"X-Pad": ""}))
    assert get(server, headers={"X-Pad": "p" * (LIMIT - bare)})[0] == 200  # exactly the limit
    assert get(server, headers={"X-Pad": "p" * (LIMIT - bare + 1)})[0] == 431  # one byte over
    assert get(server, headers={"X-Big": "c" * (60 * 1024)})[0] == 200  # a 60 KiB header
    # A 60 KiB head with a 32 KiB body in one write: the body does not count toward the head.
    sock = connect(server)
    body = bytes(range(256)) * 128
    sock.sendall(request_bytes("POST", "/echo", {"X-Big": "d" * (60 * 1024)}, body))
    status, _, echoed = read_response(sock)
    assert (status, echoed) == (200, body)
    # ... and the connection is still good for the next request.
    sock.sendall(request_bytes("GET", "/healthz"))
    assert read_response(sock)[0] == 200


def test_pipelined_requests_still_work_and_an_oversized_one_is_refused(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/healthz") + request_bytes("POST", "/echo", body=b"abc")
                 + request_bytes("GET", "/healthz", {"X-Pad": "e" * 60_000}))
    assert read_response(sock)[0] == 200
    assert read_response(sock)[::2] == (200, b"abc")
    assert read_response(sock)[0] == 200
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/healthz") + request_bytes("GET", "/healthz", {"X-Big": "f" * 2**20}))
    assert read_response(sock)[0] == 200
    try:
        status, headers, body = read_response(sock)
    except (EOFError, ConnectionResetError):
        pass  # refused while the first response was in flight: closed without a reply
    else:
        assert_error(status, headers, body, 431, "headers_too_large")
    assert closed_by_server(sock, 3)
    assert get(server)[0] == 200


def test_bytes_held_in_incomplete_heads_are_bounded_across_connections(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve(max_pending_head_bytes=256 * 1024, header_timeout_s=10)
    def held() -> int:  # the server's count (its state is made by its first connection)
        shared = getattr(server.server.server_state, "_gateway_http_limits", None)
        return -1 if shared is None else int(shared.held)

    partial = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 60_000  # never ends
    slow = [connect(server) for _ in range(4)]
    for sock in slow:
        sock.sendall(partial)
    wait_until(lambda: held() == 4 * len(partial))
    extra = connect(server)
    extra.sendall(partial)  # 5 x 60 KB > 256 KiB
    status, headers, body = read_response(extra)
    assert_error(status, headers, body, 503, "server_overloaded")
    assert closed_by_server(extra, 3)
    assert get(server)[0] == 200  # a head that arrives in one read is never held
    for sock in slow[:2]:  # the held heads still complete...
        sock.sendall(b"\r\n\r\n")
        assert read_response(sock)[0] == 200
    for sock in slow[2:]:  # ... or go away, and their bytes are released
        sock.close()
    wait_until(lambda: held() == 0)


# -- timeouts --------------------------------------------------------------------------------------

def test_silent_and_half_sent_connections_are_closed_after_the_head_timeout(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    timeout = 1.0
    server = serve(header_timeout_s=timeout)
    started = time.monotonic()
    silent = [connect(server) for _ in range(300)]
    half = [connect(server) for _ in range(300)]
    for sock in half:
        sock.sendall(b"GET /healthz HT")
    assert get(server)[0] == 200  # a real client is not locked out
    wait_until(lambda: server.connections >= 600)
    selector = selectors.DefaultSelector()
    try:
        for sock in silent + half:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        received: dict[socket.socket, bytes] = {sock: b"" for sock in silent + half}
        closed: set[socket.socket] = set()
        deadline = started + timeout + 4
        while len(closed) < len(received) and time.monotonic() < deadline:
            for key, _ in selector.select(0.2):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    chunk = ready.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                received[ready] += chunk
                if not chunk:
                    closed.add(ready)
                    selector.unregister(ready)
    finally:
        selector.close()
    assert len(closed) == 600, f"{600 - len(closed)} connections still open"
    assert time.monotonic() - started >= timeout * 0.9
    assert all(received[sock] == b"" for sock in silent)  # nothing to answer
    assert all(received[sock].startswith(b"HTTP/1.1 408 ") for sock in half)
    wait_until(lambda: server.connections == 0)
    assert get(server)[0] == 200


def test_keep_alive_idle_is_not_a_head_timeout_but_a_slow_next_head_is(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve(header_timeout_s=0.5, keep_alive_s=5)
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/healthz"))
    assert read_response(sock)[0] == 200
    time.sleep(1.2)  # idle between requests: longer than the head timeout, shorter than keep-alive
    sock.sendall(request_bytes("GET", "/healthz"))
    assert read_response(sock)[0] == 200
    sock.sendall(b"GET /heal")  # the third head never completes
    started = time.monotonic()
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 408, "request_timeout")
    assert closed_by_server(sock, 2)
    assert 0.4 < time.monotonic() - started < 2


def test_stalled_body_times_out_and_a_slow_one_does_not(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve(body_timeout_s=0.5)
    steady = connect(server)
    body = b"x" * 100
    steady.sendall(request_bytes("POST", "/echo", body=body)[:-len(body)])
    for i in range(0, 100, 20):  # a piece every 0.3 s: slower than nothing, never idle for 0.5 s
        time.sleep(0.3)
        steady.sendall(body[i:i + 20])
    status, _, echoed = read_response(steady)
    assert (status, echoed) == (200, body)
    stalled = connect(server)
    stalled.sendall(request_bytes("POST", "/echo", body=body)[:-90])  # 10 of 100 body bytes
    started = time.monotonic()
    status, headers, reply = read_response(stalled)
    assert_error(status, headers, reply, 408, "request_timeout")
    assert closed_by_server(stalled, 2)
    assert 0.4 < time.monotonic() - started < 2
    wait_until(lambda: server.state.disconnects == 1)  # the app's receive() saw the disconnect


def test_a_trickled_body_is_cut_at_the_whole_body_deadline_and_frees_its_slot(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    """A byte every 0.2 s is never idle for `body_timeout_s` (0.5 s), but the whole body is due within
    4 x `body_timeout_s`: then 408, and the request slots the tricklers held serve again."""
    server = serve(body_timeout_s=0.5, max_requests=2)
    tricklers = [connect(server) for _ in range(2)]
    for sock in tricklers:
        sock.sendall(request_bytes("POST", "/echo", body=b"x" * 1000)[:-1000])
    started = time.monotonic()
    wait_until(lambda: len(server.server.server_state.tasks) == 2)
    assert get(server, "/whole")[0] == 503  # both slots held (a liveness probe, /healthz, would pass)
    answered: set[socket.socket] = set()
    while len(answered) < len(tricklers) and time.monotonic() - started < 6:
        for sock in tricklers:
            if sock not in answered:
                try:
                    sock.send(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    answered.add(sock)
        readable, _, _ = select.select(tricklers, [], [], 0.2)
        answered.update(readable)
    elapsed = time.monotonic() - started
    assert len(answered) == 2, "the trickled bodies were never cut"
    assert 1.8 < elapsed < 3.5, elapsed
    for sock in tricklers:
        status, headers, body = read_response(sock)
        assert_error(status, headers, body, 408, "request_timeout")
        assert "2 s" in json.loads(body)["error"]["message"]
        assert closed_by_server(sock, 3)
    wait_until(lambda: server.state.disconnects == 2)  # the app's receive() saw the disconnect
    assert get(server)[0] == 200


# -- chunked bodies: trailer fields ----------------------------------------------------------------

def chunked_bytes(path: str, headers: dict[str, str], chunks: list[bytes], trailer: bytes = b"") -> bytes:
    """A chunked POST; `trailer`: its trailer section's field lines (each ending in CRLF)."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    body = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body + b"0\r\n" + trailer + b"\r\n"


def test_trailer_fields_never_become_request_headers(serve: Callable[..., Server],
                                                     connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    head = {"X-Request-Id": "from-head", "Authorization": "Bearer head-key"}
    trailer = b"X-Request-Id: from-trailer\r\nAuthorization: Bearer trailer-key\r\nX-Beta: 1\r\n"
    for pieces in ([chunked_bytes("/headers", head, [b'{"a":', b"1}"], trailer)],  # in one write
                   [chunked_bytes("/headers", head, [b'{"a":1}']).removesuffix(b"0\r\n\r\n") + b"0\r\n",
                    trailer[:10], trailer[10:], b"\r\n"]):  # the trailer section in reads of its own
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.05)
        status, _, body = read_response(sock)
        assert status == 200
        seen = [tuple(pair) for pair in json.loads(body)]
        assert ("x-request-id", "from-head") in seen and ("authorization", "Bearer head-key") in seen
        assert not [pair for pair in seen if "trailer" in pair[1] or pair[0] == "x-beta"], seen
    sock.sendall(request_bytes("GET", "/healthz"))  # the connection is still good
    assert read_response(sock)[0] == 200


@pytest.mark.parametrize("shape", ["one-endless-field", "many-fields"])
def test_an_endless_trailer_section_is_refused_with_431_before_it_is_buffered(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket], shape: str) -> None:
    server = serve()
    assert get(server)[0] == 200  # warm up everything a request allocates
    before = rss_bytes()
    sock = connect(server)
    sock.sendall(chunked_bytes("/echo", {}, [b'{"model":']).removesuffix(b"0\r\n\r\n") + b"0\r\n")
    if shape == "one-endless-field":
        sock.sendall(b"X-Trailer: ")
        piece = b"a" * 65536
    else:
        piece = b"".join(b"X-T%d: %s\r\n" % (n, b"a" * 1000) for n in range(64))
    total, sent, answered = 32 * 1024 * 1024, 0, False
    try:
        while sent < total:
            sock.sendall(piece)
            sent += len(piece)
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                answered = True
                break
    except (BrokenPipeError, ConnectionResetError):
        answered = True
    grown = rss_bytes() - before
    assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB"
    assert answered, "the server took 32 MiB of trailer without answering"
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 431, "headers_too_large")
    assert closed_by_server(sock, 3)
    wait_until(lambda: server.state.disconnects == 1)  # the app's receive() saw the disconnect
    assert get(server)[0] == 200


# -- what the parser refuses -----------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad\x01: v\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n",  # a bad chunk
], ids=["two-lengths", "length-and-chunked", "bad-name", "not-http", "bad-chunk"])
def test_what_the_parser_refuses_gets_an_openai_400_and_close(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket], raw: bytes,
        variant: tuple[str, str]) -> None:
    if variant[0] == "h11" and b"Content-Length: 2\r\nTransfer-Encoding" in raw:
        pytest.skip("h11 takes Transfer-Encoding over Content-Length (RFC 9112 6.3) rather than refusing")
    server = serve()
    sock = connect(server)
    sock.sendall(raw)
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 400, "invalid_http_request")
    assert closed_by_server(sock, 3)
    assert get(server)[0] == 200


def test_a_refused_pipelined_request_is_answered_after_the_one_before_it(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/healthz") + b"GARBAGE\r\n\r\n")
    assert read_response(sock)[0] == 200
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 400, "invalid_http_request")
    assert closed_by_server(sock, 3)


def test_a_websocket_upgrade_gets_an_openai_400(serve: Callable[..., Server],
                                                connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/v1/realtime", {
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}))
    status, headers, body = read_response(sock)
    assert_error(status, headers, body, 400, "websocket_not_supported")
    assert closed_by_server(sock, 3)
    assert get(server)[0] == 200


# -- connections and requests ----------------------------------------------------------------------

def test_connections_over_the_limit_are_refused_not_left_hanging(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve(max_connections=20, header_timeout_s=10)
    idle = [connect(server) for _ in range(20)]
    wait_until(lambda: server.connections == 20)
    extra = connect(server)
    try:
        extra.sendall(request_bytes("GET", "/healthz"))
    except (BrokenPipeError, ConnectionResetError):
        pass
    started = time.monotonic()
    assert closed_by_server(extra, 3)
    assert time.monotonic() - started < 2
    for sock in idle[:5]:
        sock.close()
    wait_until(lambda: server.connections <= 15)
    assert get(server)[0] == 200


def test_requests_over_the_limit_get_503(serve: Callable[..., Server],
                                         connect: Callable[[Server], socket.socket]) -> None:
    server = serve(max_requests=5)
    held = [connect(server) for _ in range(5)]
    for sock in held:
        sock.sendall(request_bytes("GET", "/hold"))
    wait_until(lambda: server.state.holding == 5)
    idle = [connect(server) for _ in range(10)]  # idle connections do not count as requests
    status, headers, body = get(server, "/whole")
    assert_error(status, headers, body, 503, "server_overloaded")
    assert headers["retry-after"] == "1"
    assert get(server)[0] == 200  # /healthz: a liveness probe passes (tests/test_probes_at_max_requests.py)
    server.state.release.set()
    for sock in held:
        assert read_response(sock)[0] == 200
    wait_until(lambda: not server.server.server_state.tasks)  # a task ends just after its response
    for sock in idle:
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_response(sock)[0] == 200


def test_a_lost_connection_reaches_the_request_running_not_only_the_one_pipelined_behind_it(
        serve: Callable[..., Server], connect: Callable[[Server], socket.socket]) -> None:
    server = serve()
    sock = connect(server)
    sock.sendall(request_bytes("GET", "/wait") + request_bytes("GET", "/healthz"))
    wait_until(lambda: server.state.holding == 1)
    sock.close()  # the client leaves while /wait runs and /healthz waits behind it
    wait_until(lambda: server.state.disconnects == 1)  # /wait's receive() said http.disconnect
    wait_until(lambda: not server.server.server_state.tasks)


def test_server_limits_validates_and_replaces_the_uvicorn_arguments() -> None:
    kwargs = server_limits()
    assert set(kwargs) == {"http", "timeout_keep_alive", "limit_concurrency", "h11_max_incomplete_event_size"}
    assert kwargs["limit_concurrency"] is None and kwargs["h11_max_incomplete_event_size"] == LIMIT
    import pickle

    assert pickle.loads(pickle.dumps(kwargs["http"])).keywords == kwargs["http"].keywords  # --workers N
    with pytest.raises(ValueError):
        server_limits(header_timeout_s=0)


class _Recorded:
    """A transport that records what is written and closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.writes.append(b"<close>")
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


async def test_a_response_head_leaves_with_its_body_or_at_the_next_loop_turn() -> None:
    loop = asyncio.get_running_loop()
    answer = _Recorded()
    joined = HeadJoined(answer, loop)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    joined.write(b"BODY")
    joined.write(b"MORE")
    assert answer.writes == [b"HEADBODY", b"MORE"]  # one send for a complete answer
    stream = _Recorded()
    joined = HeadJoined(stream, loop)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    assert stream.writes == []
    await asyncio.sleep(0)
    assert stream.writes == [b"HEAD"]  # a head alone is not kept past the loop turn
    stream, cycle = _Recorded(), SimpleNamespace()
    cycle.transport = joined = HeadJoined(stream, loop, cycle)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    assert cycle.transport is joined
    await asyncio.sleep(0)
    assert cycle.transport is stream and stream.writes == [b"HEAD"]  # the events go straight to the transport
    answer, cycle = _Recorded(), SimpleNamespace()
    cycle.transport = joined = HeadJoined(answer, loop, cycle)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    joined.write(b"BODY")
    assert cycle.transport is answer and answer.writes == [b"HEADBODY"]
    closing = _Recorded()
    joined = HeadJoined(closing, loop)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    joined.close()
    await asyncio.sleep(0)
    assert closing.writes == [b"HEAD", b"<close>"]  # written before the close, once


class _Lost(_Recorded):
    """A transport whose connection was lost: uvloop raises RuntimeError on a write then (asyncio drops it)."""

    def __init__(self, closing: bool = True) -> None:
        super().__init__()
        self.closed = closing

    def write(self, data: bytes) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")


async def test_a_write_to_a_lost_connection_is_dropped_quietly_and_any_other_failure_is_not() -> None:
    loop = asyncio.get_running_loop()
    joined = HeadJoined(_Lost(), loop)  # type: ignore[arg-type]
    joined.write(b"HEAD")
    joined.write(b"BODY")
    joined.write(b"MORE")
    HeadJoined(_Lost(), loop).write_all(b"ALL")  # type: ignore[arg-type]
    writer = ChunkWriter(SimpleNamespace(transport=_Lost(), flow=SimpleNamespace(write_paused=False),
                                         chunked_encoding=True, disconnected=False, response_complete=False))
    from gateway.schemas.events import Chunk

    assert writer.write(b"data: x\n\n") and writer.write_chunk([Chunk(b"{}")])
    if HAVE_HTTPTOOLS:
        cycle = _cycle(_Lost())
        assert send_whole(cycle.send, 200, b"application/json", TAIL, b"{}")
        assert cycle.response_complete and cycle.responded  # the cycle ends as after any answer
    open_but_failing = HeadJoined(_Lost(closing=False), loop)  # type: ignore[arg-type]
    open_but_failing.write(b"HEAD")
    with pytest.raises(RuntimeError):  # not a lost connection: a bug, not hidden
        open_but_failing.write(b"BODY")
    await asyncio.sleep(0)


def test_a_streamed_body_written_directly_reads_as_any_chunked_body(serve: Callable[..., Server],
                                                                    variant: tuple[str, str]) -> None:
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(2):  # twice on one connection: the cycle ends cleanly, keep-alive holds
            conn.request("GET", "/stream")
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("transfer-encoding") == "chunked"
            assert response.read() == b"one two three"
    finally:
        conn.close()
    assert server.state.direct_writes == (6 if variant[0] == "httptools" else 0)  # h11: through `send`


def test_the_chunk_writer_declines_whenever_send_must_write() -> None:
    transport = _Recorded()

    def cycle(**state: Any) -> SimpleNamespace:
        fields = {"chunked_encoding": True, "disconnected": False, "response_complete": False, **state}
        return SimpleNamespace(transport=transport, flow=SimpleNamespace(write_paused=state.pop("paused", False)),
                               **{k: v for k, v in fields.items() if k != "paused"})

    assert ChunkWriter(cycle()).write(b"data: x\n\n")
    assert transport.writes == [b"9\r\ndata: x\n\n\r\n"]
    for state in ({"chunked_encoding": None}, {"paused": True}, {"disconnected": True}, {"response_complete": True}):
        assert not ChunkWriter(cycle(**state)).write(b"x"), state
    assert not ChunkWriter(cycle()).write(b"")  # an empty part would end the chunked body
    assert transport.writes == [b"9\r\ndata: x\n\n\r\n"]
    assert chunk_writer(lambda message: None) is None  # a server that does not set DIRECT_BODY
    assert not ChunkWriter(SimpleNamespace(chunked_encoding=True, transport=transport)).write(b"x")  # renamed: send
    assert transport.writes == [b"9\r\ndata: x\n\n\r\n"]


# -- a whole reply in one write (`api.whole_reply.send_whole`) -------------------------------------------


def _cycle(transport: Any, *, keep_alive: bool = True, method: str = "POST", access_log: bool = False,
           marked: bool = True) -> Any:
    """uvicorn's own httptools request cycle, writing to `transport`, as the gateway's protocol makes it."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    responded: list[int] = []
    cycle = RequestResponseCycle(
        scope={"type": "http", "method": method}, transport=transport, flow=FlowControl(transport),  # type: ignore[typeddict-item]
        logger=logging.getLogger("test"), access_logger=logging.getLogger("test.access"), access_log=access_log,
        default_headers=[(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT")], message_event=asyncio.Event(),
        expect_100_continue=False, keep_alive=keep_alive, on_response=lambda: responded.append(1))
    if marked:
        setattr(cycle, DIRECT_BODY, True)
    cycle.responded = responded
    return cycle


def _state(cycle: Any) -> tuple[Any, ...]:
    return (cycle.response_started, cycle.response_complete, cycle.message_event.is_set(), cycle.chunked_encoding,
            cycle.expected_content_length, cycle.keep_alive, len(cycle.responded))


TAIL = [(b"x-request-id", b"req_1"), (b"x-gateway-policy", b"v1"), (b"x-gateway-target", b"up/m")]


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("joined", [False, True])
async def test_a_whole_reply_is_written_as_uvicorns_send_writes_it(keep_alive: bool, joined: bool) -> None:
    loop = asyncio.get_running_loop()
    fast, public = _Recorded(), _Recorded()
    fast_cycle, public_cycle = _cycle(fast, keep_alive=keep_alive), _cycle(public, keep_alive=keep_alive)
    if joined:  # behind the protocol's head-joining transport, as served
        fast_cycle.transport = HeadJoined(fast, loop, fast_cycle)  # type: ignore[arg-type]
        public_cycle.transport = HeadJoined(public, loop, public_cycle)  # type: ignore[arg-type]
    body = b'{"id":"x"}'
    assert send_whole(fast_cycle.send, 200, b"application/json", TAIL, body)
    await public_cycle.send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *TAIL]})
    await public_cycle.send({"type": "http.response.body", "body": body, "more_body": False})
    await asyncio.sleep(0)
    assert b"".join(fast.writes) == b"".join(public.writes)
    assert fast.writes[0].startswith(b"HTTP/1.1 200 OK\r\ndate: ") and fast.writes[0].endswith(b"\r\n\r\n" + body)
    assert (b"connection: close\r\n" in fast.writes[0]) is (not keep_alive) and fast.closed is (not keep_alive)
    assert _state(fast_cycle) == _state(public_cycle)
    if joined:
        assert fast_cycle.transport is fast and len(fast.writes) == 1 + (not keep_alive)  # one write, now


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
@pytest.mark.parametrize("keep_alive", [True, False])
async def test_a_streams_head_is_written_as_uvicorns_send_writes_it(keep_alive: bool) -> None:
    loop = asyncio.get_running_loop()
    fast, public = _Recorded(), _Recorded()
    fast_cycle, public_cycle = _cycle(fast, keep_alive=keep_alive), _cycle(public, keep_alive=keep_alive)
    fast_cycle.transport = HeadJoined(fast, loop, fast_cycle)  # type: ignore[arg-type]
    public_cycle.transport = HeadJoined(public, loop, public_cycle)  # type: ignore[arg-type]
    head = [(b"content-type", b"text/event-stream; charset=utf-8"), *TAIL]
    assert send_head(fast_cycle.send, 200, head)
    await public_cycle.send({"type": "http.response.start", "status": 200, "headers": head})
    assert fast.writes == public.writes == []  # held, to leave with the first event
    for cycle in (fast_cycle, public_cycle):
        await cycle.send({"type": "http.response.body", "body": b"data: x\n\n", "more_body": True})
        await cycle.send({"type": "http.response.body", "body": b"", "more_body": False})
    assert fast.writes == public.writes
    assert b"transfer-encoding: chunked\r\n" in fast.writes[0]
    assert (b"connection: close\r\n" in fast.writes[0]) is (not keep_alive)
    assert _state(fast_cycle) == _state(public_cycle)
    for status, tail in [(204, TAIL), (200, [(b"content-length", b"2")]), (200, [(b"transfer-encoding", b"gzip")])]:
        cycle = _cycle(_Recorded())
        assert not send_head(cycle.send, status, tail) and not cycle.response_started, (status, tail)


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
def test_a_whole_reply_goes_through_send_whenever_send_would_do_more() -> None:
    transport = _Recorded()
    for cycle, status, tail in [
        (_cycle(transport, marked=False), 200, TAIL),  # a cycle the gateway's protocol did not make
        (_cycle(transport, access_log=True), 200, TAIL),  # uvicorn logs the access
        (_cycle(transport, method="HEAD"), 200, TAIL),  # no body for HEAD
        (_cycle(transport), 200, [(b"X-Upper", b"v")]),  # uvicorn lower-cases names
        (_cycle(transport), 200, [(b"x-bad", b"a\r\nb")]),  # uvicorn refuses the value
        (_cycle(transport), 200, [(b"bad name", b"v")]),  # and the name
        (_cycle(transport), 200, [(b"connection", b"close")]),  # headers that change the framing
        (_cycle(transport), 200, [(b"content-length", b"1")]),
        (_cycle(transport), 200, [(b"transfer-encoding", b"chunked")]),
        (_cycle(transport), 999, TAIL),  # no status line for it
    ]:
        assert not send_whole(cycle.send, status, b"application/json", tail, b"{}"), (status, tail)
        assert not cycle.response_started and not cycle.responded
    for flag in ("response_started", "disconnected"):
        cycle = _cycle(transport)
        setattr(cycle, flag, True)
        assert not send_whole(cycle.send, 200, b"application/json", TAIL, b"{}"), flag
    cycle = _cycle(transport)
    cycle.flow.write_paused = True  # `send` waits for the drain
    assert not send_whole(cycle.send, 200, b"application/json", TAIL, b"{}")
    assert not send_whole(lambda message: None, 200, b"application/json", TAIL, b"{}")  # another server
    assert transport.writes == []


RATE_LIMITED = [*TAIL, (b"x-ratelimit-limit-requests", b"100000000"),
                (b"x-ratelimit-remaining-requests", b"99998765"), (b"x-ratelimit-reset-requests", b"37s")]
MANY = [(b"x-extra-%d" % n, b"value %d" % n) for n in range(60)]  # past the kept head formats (`_LINES`)


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
@pytest.mark.parametrize("tail", [RATE_LIMITED, MANY, []], ids=["rate-limited", "many", "none"])
async def test_kept_header_names_write_the_same_bytes_as_send(tail: list[tuple[bytes, bytes]]) -> None:
    """The second head with the same names takes the kept names (`_good_names`): still uvicorn's bytes."""
    for keep_alive in (True, False, True):
        for stream in (False, True):
            fast, public = _Recorded(), _Recorded()
            fast_cycle, public_cycle = _cycle(fast, keep_alive=keep_alive), _cycle(public, keep_alive=keep_alive)
            if stream:
                head = [(b"content-type", b"text/event-stream; charset=utf-8"), *tail]
                assert send_head(fast_cycle.send, 200, head)
                await public_cycle.send({"type": "http.response.start", "status": 200, "headers": head})
            else:
                assert send_whole(fast_cycle.send, 200, b"application/json", tail, b"{}")
                await public_cycle.send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", b"2"), *tail]})
                await public_cycle.send({"type": "http.response.body", "body": b"{}", "more_body": False})
            assert b"".join(fast.writes) == b"".join(public.writes) and _state(fast_cycle) == _state(public_cycle)


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
def test_kept_header_names_do_not_skip_the_other_checks() -> None:
    assert send_whole(_cycle(_Recorded()).send, 200, b"application/json", RATE_LIMITED, b"{}")  # names kept
    transport = _Recorded()
    remaining = (b"x-ratelimit-remaining-requests", b"1\r\nx-injected: 1")
    for status, tail in [
        (200, [*RATE_LIMITED, remaining]),  # a value is checked every time
        (200, [*RATE_LIMITED, (b"X-Ratelimit-Limit-Requests", b"1")]),  # a name not kept is checked
        (200, [*RATE_LIMITED, (b"connection", b"close")]),
        (200, [*RATE_LIMITED, (b"content-length", b"2")]),  # a kept name, counted
        (200, [*RATE_LIMITED, (b"transfer-encoding", b"chunked")]),
    ]:
        cycle = _cycle(transport)
        assert not send_whole(cycle.send, status, b"application/json", tail, b"{}"), tail
        assert not cycle.response_started and not cycle.responded
    cycle = _cycle(transport)
    assert not send_head(cycle.send, 200, [*RATE_LIMITED, (b"content-length", b"2")]) and not cycle.response_started
    assert transport.writes == []


def test_a_whole_reply_reads_as_any_reply_on_a_kept_connection(serve: Callable[..., Server],
                                                               variant: tuple[str, str]) -> None:
    server = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        for _ in range(2):  # twice on one connection: the cycle ends cleanly, keep-alive holds
            conn.request("POST", "/whole", body=b"{}")
            response = conn.getresponse()
            assert response.status == 200 and response.getheader("x-request-id") == "req_1"
            assert response.getheader("content-length") == "10" and response.read() == b'{"id":"x"}'
    finally:
        conn.close()
    assert server.state.direct_writes == (2 if variant[0] == "httptools" else 0)  # h11: through `send`


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="httptools missing")
def test_the_header_checks_find_what_uvicorns_patterns_find() -> None:
    import re

    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from gateway.api.whole_reply import _finder

    samples = [bytes([byte]) for byte in range(256)] + [b"", b"x-request-id", b"req_1 ok", b"a\r\nb", b"v\tw"]
    for pattern in (HEADER_RE, HEADER_VALUE_RE, re.compile(rb"\r\n"), re.compile(rb"[a-c]+x")):
        found = _finder(pattern)
        for sample in (*samples, b"ab\r\n", b"bbx"):
            assert found(sample) is (pattern.search(sample) is not None), (pattern, sample)


def test_the_chunk_writer_writes_a_lone_chunk_as_write_of_its_frame_would() -> None:
    from gateway.api.sse import frame
    from gateway.schemas.events import DONE, Chunk, StreamEvent

    transport = _Recorded()
    writer = ChunkWriter(SimpleNamespace(transport=transport, flow=SimpleNamespace(write_paused=False),
                                         chunked_encoding=True, disconnected=False, response_complete=False))
    batch: list[StreamEvent] = [Chunk(b'{"id":"c1","choices":[]}')]
    assert writer.write_chunk(batch)
    assert writer.write(frame(batch, False))
    assert transport.writes[0] == transport.writes[1] == b'20\r\ndata: {"id":"c1","choices":[]}\n\n\r\n'
    for other in ([DONE], [Chunk(b"{}"), DONE], []):  # anything else: `frame` and `write`
        assert not writer.write_chunk(other)
    for size in (0, 1, 2047, 2048, 2049, 70000):  # a looked-up chunk head, and a formatted one past the table
        sized: list[StreamEvent] = [Chunk(b"x" * size)]
        assert writer.write_chunk(sized)
        assert writer.write(frame(sized, False))
        assert transport.writes[-1] == transport.writes[-2]
    del transport.writes[2:]
    paused = ChunkWriter(SimpleNamespace(transport=transport, flow=SimpleNamespace(write_paused=True),
                                         chunked_encoding=True, disconnected=False, response_complete=False))
    assert not paused.write_chunk(batch)
    assert len(transport.writes) == 2
