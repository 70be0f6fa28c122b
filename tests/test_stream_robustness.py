"""Streams an upstream did not fail, and answers it did: who a passed deadline is charged to, when the gateway
concludes that a provider ignores `include_usage`, and upstream bytes that are not UTF-8.

- `total_s` passing while the gateway is held writing to a slow client is not the upstream's timeout
  (`upstream.read_timer.HeldPastDeadline` -> `errors.StreamDeadlinePassed`, no breaker verdict); unit-tested on the
  timer, and end to end: a fast upstream, clients that read only after the deadline.
- `stream_usage_expected` turns False only after a stream that finished cleanly without usage.
- an answer or a stream event that is not UTF-8 is the upstream's error (502 / the stream's error event).
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from gateway.auth.keys import hash_key
from gateway.errors import StreamDeadlinePassed, UpstreamError, UpstreamTimeout
from gateway.pipeline.streams import StreamEnd
from gateway.providers.base import Call
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.providers.openai_stream import OpenAIStream
from gateway.providers.streaming import ResponsesEvents
from gateway.routing.verdicts import stream_outcome
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import StreamDone, StreamError, StreamEvent
from gateway.upstream.client import transport_error
from gateway.upstream.read_timer import HeldPastDeadline, ReadTimer
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

# --- 1. a deadline that passes while the consumer holds the stream -------------------------------------------


class _Transport:
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def _reader() -> StreamReader:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.transport = _Transport()  # type: ignore[assignment]
    return StreamReader(protocol, 2**16, loop=loop)


def _outcome(exc: BaseException) -> str | None:
    return stream_outcome(StreamEnd("error", transport_error(exc, "p", "mid-stream")))


async def test_a_deadline_passed_while_the_consumer_held_the_stream_is_not_the_upstreams_timeout() -> None:
    loop = asyncio.get_running_loop()
    content = _reader()
    timer = ReadTimer(content, loop.time() + 0.2, 0.1)
    content.feed_data(b"a")
    assert await timer.read() == b"a"  # (arms the timer)
    content.feed_data(b"b")  # the upstream goes on; the consumer is blocked on its client past the deadline
    await asyncio.sleep(0.4)
    assert await timer.read() == b"b"  # (the timer had stopped, the consumer busy: this read arms it again)
    content.feed_data(b"c")
    await asyncio.sleep(0)  # the consumer writes that to its client
    with pytest.raises(HeldPastDeadline) as raised:  # bytes still buffered: the stream ends all the same
        await asyncio.wait_for(timer.read(), 1)
    timer.stop()
    error = transport_error(raised.value, "p", "mid-stream")
    assert isinstance(error, StreamDeadlinePassed) and not isinstance(error, UpstreamTimeout)
    assert error.status == 504 and error.code == "stream_deadline_passed"
    assert _outcome(raised.value) is None  # no verdict on the target: not a breaker failure


async def test_a_deadline_passed_while_a_read_waited_is_the_upstreams_timeout() -> None:
    loop = asyncio.get_running_loop()
    content = _reader()
    timer = ReadTimer(content, loop.time() + 0.2, 5)
    content.feed_data(b"a")
    assert await timer.read() == b"a"
    started = loop.time()
    with pytest.raises(TimeoutError) as raised:
        await asyncio.wait_for(timer.read(), 2)
    timer.stop()
    assert not isinstance(raised.value, HeldPastDeadline) and loop.time() - started < 0.5
    assert isinstance(transport_error(raised.value, "p", "mid-stream"), UpstreamTimeout)
    assert _outcome(raised.value) == "timeout"


async def test_an_idle_read_is_the_upstreams_timeout() -> None:
    loop = asyncio.get_running_loop()
    timer = ReadTimer(_reader(), loop.time() + 60, 0.1)
    with pytest.raises(TimeoutError) as raised:
        await asyncio.wait_for(timer.read(), 2)
    timer.stop()
    assert _outcome(raised.value) == "timeout"


async def test_a_body_wholly_received_before_the_deadline_is_read_to_its_end() -> None:
    loop = asyncio.get_running_loop()
    content = _reader()
    timer = ReadTimer(content, loop.time() + 0.1, 0.05)
    content.feed_data(b"a")
    assert await timer.read() == b"a"
    content.feed_data(b"b")
    content.feed_eof()
    await asyncio.sleep(0.3)  # the consumer held it past the deadline, but the exchange with the upstream was over
    assert await timer.read() == b"b"
    assert await timer.read() == b""
    timer.stop()


class _Upstream(ThreadedApp):
    """An OpenAI-compatible upstream in a thread of its own that answers every request with `self.answer`:
    (content type, the body's parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: tuple[str, list[bytes]] = ("application/json", [b"{}"])

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            await request.read()
            kind, parts = self.answer
            response = web.StreamResponse(headers={"Content-Type": kind})
            await response.prepare(request)
            for part in parts:
                await response.write(part)
            await response.write_eof()
            return response

        app.router.add_post("/v1/chat/completions", handle)


@pytest.fixture(scope="module")
def raw_upstream() -> Iterator[_Upstream]:
    with _Upstream() as upstream:
        yield upstream


@pytest.fixture
def served(raw_upstream: _Upstream) -> Iterator[RunningGateway]:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          raw:
            kind: openai
            base_url: http://127.0.0.1:{raw_upstream.port}/v1
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {{connect_s: 1, first_byte_s: 2, idle_s: 1.5, total_s: 2}}
        models:
          routed: {{targets: [{{provider: raw, model: m}}]}}
          plain: {{provider: raw, model: m}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": "sk"}).start()
    yield running
    running.stop()


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(content: str, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}


def _big_stream(megabytes: int) -> list[bytes]:
    event = _sse(_chunk("x" * 1000))
    batch = event * 64
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    tail = _sse(_chunk("", "stop")) + _sse({**_chunk(""), "choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    return [batch] * (megabytes * 1024 * 1024 // len(batch)) + [tail]


def _slow_client(port: int, body: bytes, wait_s: float, into: list[bytes]) -> None:
    """A client that sends its request and reads nothing for `wait_s`, then everything."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {FULL_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        sock.sendall(head.encode() + body)
        time.sleep(wait_s)
        sock.settimeout(20)
        parts = []
        while data := sock.recv(1 << 20):
            parts.append(data)
        into.append(b"".join(parts))


def test_clients_that_read_after_the_deadline_do_not_make_the_upstream_time_out(
        raw_upstream: _Upstream, served: RunningGateway) -> None:
    raw_upstream.answer = ("text/event-stream", _big_stream(40))  # delivered in well under a second
    body = json.dumps({"model": "routed", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    answers: list[bytes] = []
    clients = [threading.Thread(target=_slow_client, args=(served.port, body.encode(), 3.5, answers))
               for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(40)
    assert len(answers) == 3
    for answer in answers:
        tail = answer[-3000:]
        assert b"upstream_timeout" not in tail and b"timed out (mid-stream)" not in tail
        assert b"stream_deadline_passed" in tail  # every stream alike: cut at its first read after the deadline
    metrics = served.metrics()
    assert 'outcome="timeout"' not in metrics
    assert 'gateway_upstream_attempts_total{outcome="ok",target="raw/m"} 3.0' in metrics  # no verdict: not failed


# --- 2. `stream_usage_expected` --------------------------------------------------------------------------------


async def _read_stream(port: int, provider: Any) -> list[StreamEvent]:
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}")
        loop = asyncio.get_running_loop()
        stream = OpenAIStream(provider, response, loop.time() + 10, True, 5)
        events: list[StreamEvent] = []
        async for batch in stream:
            events += batch
        return events


def _provider() -> SimpleNamespace:
    return SimpleNamespace(name="p", sanitize=str, release=lambda: None, stream_usage_expected=True)


@pytest.mark.parametrize("failure", ["error-event", "malformed", "cut"])
async def test_a_failed_stream_does_not_mark_the_provider_as_ignoring_usage(raw_upstream: _Upstream,
                                                                            failure: str) -> None:
    provider = _provider()
    last = {"error-event": _sse({"error": {"message": "overloaded", "type": "server_error"}}),
            "malformed": b"data: {nope\n\n", "cut": b""}[failure]
    raw_upstream.answer = ("text/event-stream", [_sse(_chunk("a")), _sse(_chunk("b")), last])
    events = await _read_stream(raw_upstream.port, provider)
    assert isinstance(events[-1], StreamError)
    assert provider.stream_usage_expected is True
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    raw_upstream.answer = ("text/event-stream", [_sse(_chunk("a")), _sse(_chunk("", "stop")),
                                                 _sse({**_chunk(""), "choices": [], "usage": usage}),
                                                 b"data: [DONE]\n\n"])
    assert isinstance((await _read_stream(raw_upstream.port, provider))[-1], StreamDone)
    assert provider.stream_usage_expected is True


@pytest.mark.parametrize("end", [b"data: [DONE]\n\n", b""])
async def test_a_clean_stream_without_usage_marks_the_provider(raw_upstream: _Upstream, end: bytes) -> None:
    provider = _provider()
    raw_upstream.answer = ("text/event-stream", [_sse(_chunk("a")), _sse(_chunk("", "stop")), end])
    assert isinstance((await _read_stream(raw_upstream.port, provider))[-1], StreamDone)
    assert provider.stream_usage_expected is False


# --- 3. upstream bytes that are not UTF-8 ----------------------------------------------------------------------

_BAD = b"caf\xe9 \xff"  # Latin-1, and a byte no UTF-8 has
_GOOD = "café ✓ 🙂".encode()


@pytest.mark.parametrize("content, valid", [(_GOOD, True), (_BAD, False), (b"plain", True)])
async def test_a_stream_event_that_is_not_utf8_ends_the_stream(raw_upstream: _Upstream, content: bytes,
                                                              valid: bool) -> None:
    event = _sse(_chunk("@")).replace(b'"@"', b'"' + content + b'"')
    raw_upstream.answer = ("text/event-stream", [_sse(_chunk("a")), event, _sse(_chunk("", "stop")),
                                                 b"data: [DONE]\n\n"])
    events = await _read_stream(raw_upstream.port, _provider())
    if valid:
        assert isinstance(events[-1], StreamDone)
        assert any(getattr(e, "payload", b"") == event[6:-2] for e in events)  # its bytes untouched
    else:
        assert isinstance(events[-1], StreamError) and "invalid UTF-8" in str(events[-1].error)
        assert not any(_BAD in getattr(e, "payload", b"") for e in events)


def test_a_responses_event_that_is_not_utf8_ends_the_stream() -> None:
    feed = ResponsesEvents(_provider()).feed  # type: ignore[arg-type]
    good = feed(b'{"type":"response.output_text.delta","delta":"' + _GOOD + b'"}')
    assert not isinstance(good[-1], StreamError)
    bad = feed(b'{"type":"response.output_text.delta","delta":"' + _BAD + b'"}')
    assert isinstance(bad[-1], StreamError) and isinstance(bad[-1].error, UpstreamError)


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.RESPONSES])
def test_a_whole_answer_that_is_not_utf8_is_the_upstreams_error(endpoint: Endpoint) -> None:
    provider: Any = SimpleNamespace(name="p")
    call = Call(endpoint, {}, False, "r")
    body = b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"content":"%s"}}]}'
    assert OpenAICompatProvider._completion(provider, call, body.replace(b"%s", _GOOD)).body
    with pytest.raises(UpstreamError, match="invalid UTF-8"):
        OpenAICompatProvider._completion(provider, call, body.replace(b"%s", _BAD))


def test_a_whole_answer_that_is_not_utf8_is_a_502(raw_upstream: _Upstream,
                                                                 served: RunningGateway) -> None:
    answer = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "@"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    raw_upstream.answer = ("application/json", [json.dumps(answer).encode().replace(b"@", _BAD)])
    request = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {FULL_KEY}"}
    reply = httpx.post(served.base_url + "/chat/completions", json=request, headers=headers, timeout=10)
    assert reply.status_code == 502 and "invalid UTF-8" in reply.json()["error"]["message"]
    raw_upstream.answer = ("application/json", [json.dumps(answer).encode().replace(b"@", _GOOD)])
    reply = httpx.post(served.base_url + "/chat/completions", json=request, headers=headers, timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == _GOOD.decode()


def test_an_event_stream_named_in_another_case_is_one(raw_upstream: _Upstream, served: RunningGateway) -> None:
    """Media types are case-insensitive (RFC 9110 8.3.1): `Text/Event-Stream` was a 502, "did not answer with an
    event stream"."""
    raw_upstream.answer = ("Text/Event-Stream; charset=UTF-8", [_sse(_chunk("Hi")), _sse(_chunk("", "stop")),
                                                                 b"data: [DONE]\n\n"])
    response = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "plain", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                          timeout=10)
    assert response.status_code == 200, response.text
    assert '"content":"Hi"' in response.text.replace(" ", "") and response.text.endswith("data: [DONE]\n\n")
