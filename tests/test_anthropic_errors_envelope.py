"""Every error a Messages API client can get comes in Anthropic's envelope, whichever layer refuses the request.

The pipeline's errors on `/v1/messages` and `count_tokens` were Anthropic's already (tests/test_messages_ingress.py);
these are the answers given outside it: litestar's own (no route under `/v1/messages/`, an invalid `Host`) and the
HTTP server's refusals before the app (a head too large, malformed HTTP, a WebSocket upgrade, a slow head or body,
an endless trailer section, too many incomplete heads, too many requests). Each is checked with the Anthropic SDK
where the SDK gets it, and on raw sockets for both HTTP parsers; the same refusals on an OpenAI path keep OpenAI's
envelope. Status codes and headers stay the gateway's: the SDK's exception class and its retries follow the status
(and `x-should-retry`) only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import uvicorn

from gateway.http_server import server_limits
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.test_http_limits import VARIANTS, chunked_bytes, closed_by_server, read_response, request_bytes, wait_until

ANTHROPIC_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
                   "request_too_large", "rate_limit_error", "api_error", "overloaded_error", "timeout_error"}
HEAD_LIMIT = 4096
MESSAGES = "/v1/messages"
COUNT = "/v1/messages/count_tokens?beta=true"  # the SDK's beta calls carry a query
CHAT = "/v1/chat/completions"
BODY = {"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def assert_anthropic(body: Any, type_: str, message: str) -> None:
    """Anthropic's envelope and nothing of OpenAI's: a top-level `type`, an `error` of `type` and `message` only
    (`request_id` beside it when the request had one)."""
    assert isinstance(body, dict), body
    assert body["type"] == "error" and set(body) <= {"type", "error", "request_id"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_ and type_ in ANTHROPIC_TYPES
    assert message in body["error"]["message"], body


def assert_openai(body: Any, code: str | None) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code, body


def assert_refusal(raw: tuple[int, dict[str, str], bytes], status: int, target: str, type_: str, code: str,
                   message: str) -> None:
    """A refusal of the HTTP server: its status, `connection: close`, the envelope of the target's API."""
    got, headers, body = raw
    assert got == status and headers["content-type"] == "application/json" and headers["connection"] == "close"
    if target.startswith(MESSAGES) or target.startswith("http://127.0.0.1/v1/messages"):
        assert_anthropic(json.loads(body), type_, message)
    else:
        assert_openai(json.loads(body), code)
        assert message in json.loads(body)["error"]["message"]


# -- a gateway, through the SDKs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    text = policy_text(upstream.base_url, max_header_bytes=HEAD_LIMIT, max_requests=3)
    text += "  slow: {provider: mock, model: fault-slow-first-byte-3000}\n"  # holds a request slot for 3 s
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def sdk(gw: RunningGateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


PAD = {"x-pad": "p" * (HEAD_LIMIT + 100)}


@pytest.mark.parametrize("call", ["create", "count_tokens"])
def test_a_head_too_large_is_anthropics_error_for_the_sdk(call: str, sdk: anthropic.Anthropic,
                                                          gw: RunningGateway) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        if call == "create":
            sdk.messages.create(model="chat", max_tokens=5, messages=[{"role": "user", "content": "hi"}],
                                extra_headers=PAD)
        else:
            sdk.messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hi"}], extra_headers=PAD)
    assert caught.value.status_code == 431
    assert_anthropic(caught.value.body, "invalid_request_error", f"exceed {HEAD_LIMIT} bytes")
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0) as client:  # OpenAI's keeps its own
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                           extra_headers=PAD)
    assert refused.value.status_code == 431
    assert_openai(refused.value.response.json(), "headers_too_large")


def test_an_unknown_route_under_messages_is_anthropics_404(sdk: anthropic.Anthropic, gw: RunningGateway) -> None:
    """The gateway serves no Message Batches: the SDK's call gets Anthropic's `not_found_error`, with the request id
    where the SDK reads it."""
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk.messages.batches.list()
    error = caught.value
    assert error.request_id == error.response.headers["x-request-id"]
    assert_anthropic(error.body, "not_found_error", "no route for GET /v1/messages/batches")
    assert error.body["request_id"] == error.request_id  # type: ignore[index]
    for path in ("/v1/messages/nope", "/v1/messages/count_tokens/nope"):
        response = httpx.post(gw.url + path, json=BODY, headers={"x-api-key": FULL_KEY}, timeout=10)
        assert response.status_code == 404 and response.headers["request-id"] == response.headers["x-request-id"]
        assert_anthropic(response.json(), "not_found_error", f"no route for POST {path}")
    for path in ("/v1/nope", "/v1/messagesnope", "/v1/chat/completions/nope"):  # not the Messages API's
        response = httpx.post(gw.url + path, json=BODY, headers={"x-api-key": FULL_KEY}, timeout=10)
        assert response.status_code == 404 and "request-id" not in response.headers
        assert_openai(response.json(), "not_found")


def test_an_invalid_host_gets_the_envelope_of_its_path(gw: RunningGateway) -> None:
    """litestar's own 400, before any route: Anthropic's under `/v1/messages`, OpenAI's elsewhere."""
    for path in (MESSAGES, "/v1/messages/count_tokens", CHAT):
        response = httpx.post(gw.url + path, json=BODY, headers={"x-api-key": FULL_KEY, "host": "bad host!"},
                              timeout=10)
        assert response.status_code == 400 and response.headers["x-request-id"]
        if path == CHAT:
            assert_openai(response.json(), None)
            assert "request-id" not in response.headers
        else:
            assert_anthropic(response.json(), "invalid_request_error", "Invalid host header")
            assert response.json()["request_id"] == response.headers["request-id"] == response.headers["x-request-id"]


def test_requests_over_the_limit_are_anthropics_overloaded_error(sdk: anthropic.Anthropic,
                                                                 gw: RunningGateway) -> None:
    """`max_requests` in flight: the 503 (with `retry-after`) that the SDK retries, in Anthropic's envelope."""
    def hold() -> None:
        httpx.post(gw.base_url + "/chat/completions", timeout=20, headers={"authorization": f"Bearer {FULL_KEY}"},
                   json={"model": "slow", "messages": [{"role": "user", "content": "x"}]})

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for holder in holders:
        holder.start()
    try:
        wait_until(lambda: len(gw.server.server_state.tasks) == 3)
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk.messages.create(**BODY)  # type: ignore[arg-type]
        assert caught.value.status_code == 503 and caught.value.response.headers["retry-after"] == "1"
        assert_anthropic(caught.value.body, "overloaded_error", "limit of concurrent requests")
        with pytest.raises(anthropic.APIStatusError) as counted:
            sdk.messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert counted.value.status_code == 503
        assert_anthropic(counted.value.body, "overloaded_error", "limit of concurrent requests")
        chat = httpx.post(gw.base_url + "/chat/completions", json=BODY, timeout=10)
        assert chat.status_code == 503 and chat.headers["retry-after"] == "1"
        assert_openai(chat.json(), "server_overloaded")
    finally:
        for holder in holders:
            holder.join(20)


# -- the HTTP server's refusals, on raw sockets, for both parsers ---------------------------------------------


class Server:
    """uvicorn with `server_limits(**limits)` in a thread, serving an app that reads each body and answers 200
    (`/hold` waits until released)."""

    def __init__(self, variant: tuple[str, str], **limits: Any) -> None:
        http, loop = variant
        self.release = threading.Event()
        self.holding = 0
        self.opened: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off", loop=loop,
                                interface="asgi3", timeout_graceful_shutdown=2,
                                **server_limits(http=http, **limits))  # type: ignore[arg-type]
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 10)
        assert self.server.started, "server did not start"

    async def app(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["path"] == "/hold":
            self.holding += 1
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    def held(self) -> int:
        """The bytes of incomplete heads the server holds (its state is made by its first connection)."""
        shared = getattr(self.server.server_state, "_gateway_http_limits", None)
        return -1 if shared is None else int(shared.held)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.opened.append(sock)
        return sock

    def stop(self) -> None:
        for sock in self.opened:
            sock.close()
        self.release.set()
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(params=[v for v in VARIANTS if v.id != "httptools-uvloop"])  # uvloop: the same protocol code
def serve(request: pytest.FixtureRequest) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(**limits: Any) -> Server:
        servers.append(Server(request.param, **limits))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


TARGETS = [MESSAGES, COUNT]  # each test also sends the same request to CHAT, which keeps OpenAI's envelope


def both(target: str) -> list[str]:
    return [target, CHAT]


@pytest.mark.parametrize("target", [*TARGETS, "http://127.0.0.1/v1/messages"])
def test_a_head_too_large(serve: Callable[..., Server], target: str) -> None:
    server = serve(max_header_bytes=HEAD_LIMIT)
    for path in both(target):
        sock = server.connect()
        sock.sendall(request_bytes("POST", path, {"X-Pad": "p" * HEAD_LIMIT}, b"{}"))
        assert_refusal(read_response(sock), 431, path, "invalid_request_error", "headers_too_large",
                       f"the request line and headers exceed {HEAD_LIMIT} bytes")
        assert closed_by_server(sock, 3)


@pytest.mark.parametrize("target", TARGETS)
def test_what_the_parser_refuses(serve: Callable[..., Server], target: str, request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["serve"][0] == "h11":
        pytest.skip("h11 consumes the head it refuses: its target is not known, so OpenAI's envelope (the fallback "
                    "parser only)")
    server = serve()
    for path in both(target):
        sock = server.connect()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}".encode())
        assert_refusal(read_response(sock), 400, path, "invalid_request_error", "invalid_http_request",
                       "the request is not valid HTTP/1.1")


@pytest.mark.parametrize("target", TARGETS)
def test_a_websocket_upgrade(serve: Callable[..., Server], target: str) -> None:
    server = serve()
    for path in both(target):
        sock = server.connect()
        sock.sendall(request_bytes("GET", path, {
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}))
        assert_refusal(read_response(sock), 400, path, "invalid_request_error", "websocket_not_supported",
                       "WebSocket upgrades are not supported")


@pytest.mark.parametrize("target", TARGETS)
def test_a_slow_head(serve: Callable[..., Server], target: str) -> None:
    server = serve(header_timeout_s=0.5)
    socks = {path: server.connect() for path in both(target)}
    for path, sock in socks.items():
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode())  # never ends
    for path, sock in socks.items():
        assert_refusal(read_response(sock), 408, path, "invalid_request_error", "request_timeout",
                       "the request headers were not received within 0.5 s")


@pytest.mark.parametrize("target", TARGETS)
def test_a_stalled_body(serve: Callable[..., Server], target: str) -> None:
    server = serve(body_timeout_s=0.5)
    socks = {path: server.connect() for path in both(target)}
    for path, sock in socks.items():
        sock.sendall(request_bytes("POST", path, body=b"x" * 100)[:-90])  # 10 of 100 body bytes
    for path, sock in socks.items():
        assert_refusal(read_response(sock), 408, path, "invalid_request_error", "request_timeout",
                       "no request body bytes were received for 0.5 s")


@pytest.mark.parametrize("target", TARGETS)
def test_an_endless_trailer_section(serve: Callable[..., Server], target: str) -> None:
    server = serve(max_header_bytes=HEAD_LIMIT)
    for path in both(target):
        sock = server.connect()
        sock.sendall(chunked_bytes(path, {}, [b'{"model":']).removesuffix(b"0\r\n\r\n") + b"0\r\nX-Trailer: ")
        for _ in range(4):
            time.sleep(0.05)
            sock.sendall(b"t" * HEAD_LIMIT)
        assert_refusal(read_response(sock), 431, path, "invalid_request_error", "headers_too_large",
                       f"exceed {HEAD_LIMIT} bytes")  # httptools: "the trailer fields ..."; h11 bounds them as a head


@pytest.mark.parametrize("target", TARGETS)
def test_too_many_incomplete_heads(serve: Callable[..., Server], target: str) -> None:
    server = serve(max_pending_head_bytes=64 * 1024, header_timeout_s=10)
    partial = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 30_000  # never ends
    for _ in range(2):
        server.connect().sendall(partial)
    wait_until(lambda: server.held() == 2 * len(partial))
    for path in both(target):
        extra = server.connect()
        extra.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode() + b"p" * 30_000)
        assert_refusal(read_response(extra), 503, path, "overloaded_error", "server_overloaded",
                       "the gateway holds too many incomplete requests")


@pytest.mark.parametrize("target", TARGETS)
def test_too_many_requests(serve: Callable[..., Server], target: str) -> None:
    server = serve(max_requests=1)
    server.connect().sendall(request_bytes("GET", "/hold"))
    wait_until(lambda: server.holding == 1)
    for path in both(target):
        sock = server.connect()
        sock.sendall(request_bytes("POST", path, body=b"{}"))
        raw = read_response(sock)
        assert raw[1]["retry-after"] == "1"
        assert_refusal(raw, 503, path, "overloaded_error", "server_overloaded",
                       "the gateway is at its limit of concurrent requests")

