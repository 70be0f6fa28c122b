"""Upgrades other than WebSocket's (`Upgrade: h2c`, as `curl --http2` sends to an http:// URL) and CONNECT, on raw
sockets: the request is served as HTTP/1.1 and its body read by its `Content-Length` or chunks, as nginx does. With
httptools the parser stops at such a request's head: its body was dropped (the app read an empty body) or, arriving
in a later read, parsed as the next request (a request smuggled past a proxy that passes `Upgrade` on).

Each test runs on every HTTP implementation (`tests/test_http_limits.VARIANTS`), and once on a real gateway.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_http_limits import (
    VARIANTS,
    Server,
    assert_error,
    chunked_bytes,
    closed_by_server,
    read_response,
    request_bytes,
    wait_until,
)

H2C = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}


@pytest.fixture(params=VARIANTS)
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**limits: Any) -> Server:
        servers.append(Server(request.param, **limits))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def nothing_more(sock: socket.socket, seconds: float = 1.0) -> bool:
    """True if the server sends nothing more (no other response) within `seconds`, the connection still open."""
    sock.settimeout(seconds)
    try:
        sock.recv(65536)
    except TimeoutError:
        return True
    return False


def test_an_upgrade_requests_body_in_the_same_read_is_its_body(serve: Callable[..., Server]) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/echo", H2C, b"hello"))
        assert read_response(sock, 10)[::2] == (200, b"hello")
        sock.sendall(request_bytes("GET", "/healthz"))  # the connection goes on in HTTP/1.1
        assert read_response(sock, 10)[::2] == (200, b'{"status":"ok"}')


def test_a_body_in_a_later_read_is_the_body_not_a_request(serve: Callable[..., Server]) -> None:
    """The body is a complete request: it is echoed as the body, never served as a request of its own."""
    server = serve()
    smuggled = request_bytes("POST", "/echo", {}, b"smuggled")
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/echo", H2C, smuggled)[:-len(smuggled)])
        time.sleep(0.3)  # the head is parsed alone
        sock.sendall(smuggled)
        assert read_response(sock, 10)[::2] == (200, smuggled)
        assert nothing_more(sock)
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_response(sock, 10)[::2] == (200, b'{"status":"ok"}')


def test_a_chunked_body_and_its_trailer_are_read_as_the_body(serve: Callable[..., Server]) -> None:
    server = serve()
    raw = chunked_bytes("/echo", H2C, [b"hel", b"lo"], b"X-Trailer: 1\r\n")
    with connect(server) as sock:
        sock.sendall(raw[:40])
        time.sleep(0.2)
        sock.sendall(raw[40:])
        assert read_response(sock, 10)[::2] == (200, b"hello")
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_response(sock, 10)[::2] == (200, b'{"status":"ok"}')


def test_a_stalled_body_after_an_upgrade_head_times_out(serve: Callable[..., Server]) -> None:
    """The body read after an ignored upgrade is timed as any body (`body_timeout_s`): 408 and close."""
    server = serve(body_timeout_s=1)
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/echo", H2C, b"hello")[:-3])
        assert_error(*read_response(sock, 10), 408, "request_timeout")
        assert closed_by_server(sock, 5)
    wait_until(lambda: server.state.disconnects == 1)  # the app waiting for the body was told


def test_bodiless_upgrade_requests_pipelined_in_one_read_are_all_answered(serve: Callable[..., Server]) -> None:
    """Each of them stops httptools' parse: what follows it in the read is parsed on (in a loop: 400 of them)."""
    server = serve()
    with connect(server) as sock:
        sock.sendall(request_bytes("GET", "/healthz", H2C) * 399 + request_bytes("POST", "/echo", H2C, b"last"))
        for _ in range(399):
            assert read_response(sock, 10)[::2] == (200, b'{"status":"ok"}')
        assert read_response(sock, 10)[::2] == (200, b"last")


def test_a_body_the_parser_would_refuse_is_refused_with_an_upgrade_too(serve: Callable[..., Server]) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
                     b"Transfer-Encoding: gzip\r\n\r\nhello")
        assert_error(*read_response(sock, 10), 400, "invalid_http_request")
        assert closed_by_server(sock, 5)


def test_a_websocket_upgrade_with_a_body_is_still_refused(serve: Callable[..., Server]) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(request_bytes("POST", "/echo", {"Connection": "Upgrade", "Upgrade": "websocket"}, b"hello"))
        assert_error(*read_response(sock, 10), 400, "websocket_not_supported")
        assert closed_by_server(sock, 5)


def test_a_connect_gets_an_answer_not_a_silent_close(serve: Callable[..., Server]) -> None:
    """httptools cannot parse an authority-form target (400); h11 hands it to the app (404 here). Both answer."""
    server = serve()
    with connect(server) as sock:
        sock.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        status, headers, body = read_response(sock, 10)
        if status == 400:
            assert_error(status, headers, body, 400, "invalid_http_request")
        else:
            assert status == 404
    with connect(server) as sock:  # an origin-form target is answered (never a 2xx: no tunnel), then what follows
        sock.sendall(b"CONNECT /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" + request_bytes("GET", "/healthz"))
        assert read_response(sock, 10)[0] == 404
        assert read_response(sock, 10)[::2] == (200, b'{"status":"ok"}')


# -- on a real gateway -----------------------------------------------------------------------------------

def chat_request(extra: bytes, body: bytes) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + FULL_KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body)


def test_the_gateway_serves_an_h2c_upgrade_request_and_no_smuggled_one(gateway: RunningGateway,
                                                                       upstream: MockUpstream) -> None:
    h2c = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "one"}]}).encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(chat_request(h2c, body))
        status, headers, answer = read_response(sock, 10)
        assert status == 200 and headers.get("connection") != "close", answer
        assert json.loads(answer)["object"] == "chat.completion"
    # a body that is itself a chat request, in a later read: a bad body (400), not a request served upstream
    inner = chat_request(b"", json.dumps({"model": "chat", "messages": [{"role": "user", "content": "two"}]}).encode())
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(chat_request(h2c, inner)[:-len(inner)])
        time.sleep(0.3)
        sock.sendall(inner)
        status, _, answer = read_response(sock, 10)
        assert status == 400 and "two" not in answer.decode(), answer
        assert nothing_more(sock)
    assert [r.json["messages"][0]["content"] for r in upstream.requests if r.json] == ["one"]
