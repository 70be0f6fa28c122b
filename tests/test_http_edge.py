"""The HTTP edge of a real gateway, on raw sockets: what the protocol's fixes mean for requests end to end.

Trailer fields of a chunked body never act as request headers (credentials, request ids, routing
rules); a client that pipelines a request and leaves still cancels the request in flight, with nothing
written to its closed connection; what the parser refuses, and a WebSocket upgrade, get an OpenAI error.
The protocol's own tests (every HTTP implementation, a tiny app) are in tests/test_http_limits.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn

from gateway.app import Gateway, create_app, served_app
from gateway.policy import compile_text
from gateway.server import uvicorn_config
from tests.conftest import FULL_KEY, LIMITED_KEY, UPSTREAM_KEY, RunningGateway, free_port, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.test_http_limits import HAVE_UVLOOP, closed_by_server, read_response

Make = Callable[..., RunningGateway]
MESSAGES = [{"role": "user", "content": "hi"}]
RULE = """\
rules:
  - name: beta-header
    when: {header: {X-Beta: ["*"]}}
    deny: "beta header seen"
"""


def chunked_request(path: str, head: dict[str, str], body: bytes, trailer: bytes = b"") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", "Transfer-Encoding: chunked"]
    lines += [f"{name}: {value}" for name, value in head.items()]
    return (("\r\n".join(lines) + "\r\n\r\n").encode() + b"%x\r\n%b\r\n0\r\n" % (len(body), body)
            + trailer + b"\r\n")


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        return read_response(sock, timeout=10)


@pytest.fixture(scope="module")
def ruled(upstream: MockUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(policy_text(upstream.base_url) + RULE, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def chat(model: str) -> bytes:
    return json.dumps({"model": model, "messages": MESSAGES}).encode()


def test_a_trailer_authorization_does_not_replace_the_heads(ruled: RunningGateway) -> None:
    """The limited key may not use `demo`; a trailer with the full key must not change that."""
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    refused = exchange(ruled.port, chunked_request("/v1/chat/completions", limited, chat("demo")))
    assert refused[0] in (403, 404)
    trailer = f"Authorization: Bearer {FULL_KEY}\r\n".encode()
    status, _, body = exchange(ruled.port, chunked_request("/v1/chat/completions", limited, chat("demo"), trailer))
    assert (status, json.loads(body)["error"]["code"]) == (refused[0], json.loads(refused[2])["error"]["code"])
    full = {"Authorization": f"Bearer {FULL_KEY}"}  # the same request with the key in its head is served
    assert exchange(ruled.port, chunked_request("/v1/chat/completions", full, chat("demo"), b"X-T: 1\r\n"))[0] == 200


def test_a_trailer_request_id_does_not_replace_the_heads(ruled: RunningGateway) -> None:
    head = {"Authorization": f"Bearer {FULL_KEY}", "X-Request-Id": "from-head"}
    status, headers, _ = exchange(ruled.port, chunked_request(
        "/v1/chat/completions", head, chat("demo"), b"X-Request-Id: from-trailer\r\n"))
    assert (status, headers["x-request-id"]) == (200, "from-head")


def test_routing_rules_do_not_see_trailer_fields(ruled: RunningGateway) -> None:
    auth = {"Authorization": f"Bearer {FULL_KEY}"}
    in_head = exchange(ruled.port, chunked_request("/v1/chat/completions", {**auth, "X-Beta": "1"}, chat("demo")))
    assert in_head[0] == 400 and b"beta header seen" in in_head[2]  # the rule works on the head
    in_trailer = exchange(ruled.port, chunked_request("/v1/chat/completions", auth, chat("demo"), b"X-Beta: 1\r\n"))
    assert in_trailer[0] == 200


def test_the_parser_and_websocket_refusals_are_openai_errors(gateway: RunningGateway) -> None:
    for raw, code in [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
         "invalid_http_request"),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
         "invalid_http_request"),
        (b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
         "websocket_not_supported"),
    ]:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
            sock.sendall(raw)
            status, headers, body = read_response(sock)
            assert (status, headers["content-type"], headers["connection"]) == (400, "application/json", "close")
            error = json.loads(body)["error"]
            assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, None)
            assert closed_by_server(sock, 3)


# -- a pipelining client that leaves -------------------------------------------------------------------

EDGE_POLICY = """\
version: 1
server:
  host: 127.0.0.1
auth: none
providers:
  mock: {{kind: openai, base_url: "{url}", api_key_env: MOCK_UPSTREAM_KEY}}
models:
  thinking: {{provider: mock, model: fault-slow-first-byte-6000}}
  gappy: {{provider: mock, model: fault-slow-stream-3000}}
"""


class Served:
    """The gateway as `gateway serve` configures uvicorn, on the given event loop, in a thread."""

    def __init__(self, text: str, loop: str) -> None:
        policy = compile_text(text, "edge-policy.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
        self.port = free_port()
        config = uvicorn_config(served_app(create_app(Gateway(policy))), policy, host="127.0.0.1", port=self.port,
                                loop=loop, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)

    def in_flight(self) -> int:
        return len(self.server.server_state.tasks)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


LOOPS = [pytest.param("uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop missing")), "asyncio"]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_pipelining_client_that_leaves_cancels_the_request_in_flight(
    upstream: MockUpstream, caplog: pytest.LogCaptureFixture, loop: str, stream: bool,
) -> None:
    """A request (the upstream thinking 6 s, or streaming an event every 3 s) with a GET pipelined behind it: the
    client leaves; the request in flight (not only the last one parsed) is cancelled at once, and nothing is
    written to the closed connection (uvloop raised RuntimeError there: "unhandled error", then uvicorn's
    "Exception in ASGI application")."""
    served = Served(EDGE_POLICY.format(url=upstream.base_url), loop)
    try:
        body = json.dumps({"model": "gappy" if stream else "thinking", "stream": stream, "messages": MESSAGES})
        # (`Host: localhost`: without keys the gateway answers requests for itself only, `direct_routes.LoopbackGate`)
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                   ).encode()
        with caplog.at_level(logging.WARNING), socket.create_connection(("127.0.0.1", served.port), 10) as sock:
            sock.sendall(request)
            if stream:
                got = b""
                while b"data:" not in got:  # the first event has come: the upstream is now between events
                    got += sock.recv(65536)
            else:
                time.sleep(0.5)  # the gateway now waits for the upstream's first byte
            left = time.monotonic()
        assert upstream.wait_for_disconnect(timeout=1.5), "the upstream call was not cancelled"
        assert time.monotonic() - left < 1.5
        deadline = time.monotonic() + 5
        while served.in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert served.in_flight() == 0
    finally:
        served.stop()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors


def _expecting(body: bytes, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + auth.encode() + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))


def test_an_answer_before_an_expected_body_closes_the_connection(ruled: RunningGateway) -> None:
    """A 401 to `Expect: 100-continue` before the body was asked for kept the connection open: the body was still
    awaited, so the client's next request on it was read as that body, never answered, until `body_timeout_s`."""
    with socket.create_connection(("127.0.0.1", ruled.port), timeout=10) as sock:
        sock.sendall(_expecting(chat("demo")))
        status, headers, _ = read_response(sock)
        assert status == 401 and headers.get("connection") == "close", headers
        assert closed_by_server(sock, 5)
    with socket.create_connection(("127.0.0.1", ruled.port), timeout=10) as sock:  # asked for, sent: kept open
        sock.sendall(_expecting(chat("demo"), FULL_KEY))
        assert read_response(sock)[0] == 100
        sock.sendall(chat("demo"))
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
