"""The bytes of request bodies that requests in flight hold, bounded per process: `server.max_body_bytes_in_flight`.

Nothing bounded them: a 4 MB body of `{}` decodes to about 100 MB of Python objects, and 20 such requests
waiting on a slow upstream took a gateway from 165 MB to 1.27 GB. Past the bound a request gets 503
(`server_overloaded`, `Retry-After: 1`): before its body is read when its Content-Length says so, else as
it arrives. A body counts until its request ends: the whole answer, or the end of its stream.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.pipeline.stages import BODIES
from tests.conftest import FULL_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

BOUND = 300_000
BIG = 200_000  # one fits, two do not
AUTH = {"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"}


def body(alias: str, size: int, *, stream: bool = False) -> bytes:
    head = b'{"model": "%s", "stream": %s, "messages": [{"role": "user", "content": "' % (
        alias.encode(), b"true" if stream else b"false")
    return head + b"a" * (size - len(head) - 4) + b'"}]}'


def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: counted as it arrives
    for at in range(0, len(data), 65536):
        yield data[at:at + 65536]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def gw(make_gateway: Callable[..., RunningGateway], upstream: MockUpstream) -> RunningGateway:
    text = policy_text(upstream.base_url, max_body_bytes_in_flight=BOUND) + (
        "  slow: {provider: mock, model: fault-slow-first-byte-2000}\n"
        "  slow-stream: {provider: mock, model: fault-slow-stream-40}\n")
    return make_gateway(text)


def post(gw: RunningGateway, path: str, content: bytes | Iterator[bytes]) -> httpx.Response:
    return httpx.post(gw.url + path, headers=AUTH, content=content, timeout=30)


def assert_overloaded(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text[:200]
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "server_overloaded"


def test_bodies_past_the_bound_get_503_until_the_held_ones_are_done(gw: RunningGateway,
                                                                    upstream: MockUpstream) -> None:
    base = BODIES.held
    answers: list[httpx.Response] = []
    holder = threading.Thread(target=lambda: answers.append(post(gw, "/v1/chat/completions", body("slow", BIG))))
    holder.start()
    try:
        wait_until(lambda: BODIES.held >= base + BIG, "the slow request's body is held")
        sent = sum(r.model == "mock-model" for r in upstream.requests)
        assert_overloaded(post(gw, "/v1/chat/completions", body("chat", BIG)))  # by its Content-Length
        assert_overloaded(post(gw, "/v1/chat/completions", chunked(body("chat", BIG))))  # as it arrives
        assert sum(r.model == "mock-model" for r in upstream.requests) == sent  # neither reached the upstream
        assert post(gw, "/v1/chat/completions", body("chat", 2_000)).status_code == 200  # a small one fits
    finally:
        holder.join()
    assert answers[0].status_code == 200
    wait_until(lambda: BODIES.held == base, "every body given back")
    assert post(gw, "/v1/chat/completions", body("chat", BIG)).status_code == 200
    assert post(gw, "/v1/chat/completions", chunked(body("chat", BIG))).status_code == 200
    assert BODIES.held == base


def test_a_stream_holds_its_body_until_it_ends(gw: RunningGateway) -> None:
    base = BODIES.held
    streaming = threading.Event()
    lines: list[str] = []

    def read_stream() -> None:
        with httpx.stream("POST", gw.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          content=body("slow-stream", BIG, stream=True)) as response:
            for line in response.iter_lines():
                streaming.set()
                lines.append(line)

    reader = threading.Thread(target=read_stream)
    reader.start()
    try:
        assert streaming.wait(10)
        assert_overloaded(post(gw, "/v1/chat/completions", body("chat", BIG)))
    finally:
        reader.join()
    assert lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
    wait_until(lambda: BODIES.held == base, "the stream's body given back at its end")
    assert post(gw, "/v1/chat/completions", body("chat", BIG)).status_code == 200


def test_anthropic_clients_get_their_overloaded_error(gw: RunningGateway) -> None:
    base = BODIES.held
    holder = threading.Thread(target=lambda: post(gw, "/v1/chat/completions", body("slow", BIG)))
    holder.start()
    try:
        wait_until(lambda: BODIES.held >= base + BIG, "the slow request's body is held")
        messages = (b'{"model": "chat", "max_tokens": 5, "messages": [{"role": "user", "content": "'
                    + b"a" * BIG + b'"}]}')
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response = post(gw, path, messages)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json() == {"type": "error", "error": {
                "type": "overloaded_error", "message": "the gateway holds too many request bodies in flight; "
                                                      "retry shortly"}, "request_id": response.headers["request-id"]}
    finally:
        holder.join()
    wait_until(lambda: BODIES.held == base, "every body given back")


def test_a_lone_body_is_always_taken_and_refused_bodies_are_given_back(gw: RunningGateway) -> None:
    base = BODIES.held
    assert base + BOUND + 100_000 < 1_048_576  # under the test policy's max_body_bytes
    alone = post(gw, "/v1/chat/completions", body("chat", BOUND + 100_000))
    assert alone.status_code == 200 or base > 0  # larger than the bound, but nothing else is held
    too_large = post(gw, "/v1/chat/completions", chunked(body("chat", 2_000_000)))
    assert too_large.status_code == 413
    assert post(gw, "/v1/chat/completions", b'{"model": "chat", "messages": [').status_code == 400
    wait_until(lambda: BODIES.held == base, "every body given back")


def test_heads_that_declare_bodies_and_send_none_hold_nothing(gw: RunningGateway) -> None:
    """A body's bytes count as they arrive, not as its Content-Length declares them: four heads declaring the
    largest bodies (a few hundred bytes in all) and sending none held the whole bound, and every other request got
    the 503 until their body timeouts (H52)."""
    base = BODIES.held
    idle: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", gw.port))
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                         + FULL_KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % BIG)
            idle.append(sock)
        time.sleep(0.3)  # (their heads read: they wait on their bodies)
        assert BODIES.held == base
        assert post(gw, "/v1/chat/completions", body("chat", BIG)).status_code == 200
        idle[0].sendall(body("chat", BIG)[:100_000])  # what arrives counts, and is given back when it ends
        wait_until(lambda: BODIES.held == base + 100_000, "the bytes that arrived are held")
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: BODIES.held == base, "every body given back")
