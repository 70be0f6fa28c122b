"""Tests of the mock upstream itself: wire format, SDK compatibility, faults.

The gateway's end-to-end tests trust this mock, so each behaviour they rely on
(shapes, streaming, fault injection, disconnect detection) is pinned here.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.mock_upstream import Fault, MockUpstream, parse_fault
from tests.support.processes import running

KEY = "sk-upstream-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hello there"}]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mock() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture
def sdk(mock: MockUpstream) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=mock.base_url, api_key=KEY, max_retries=0, timeout=10)
    yield client
    client.close()


def post(mock: MockUpstream, path: str, body: dict[str, Any], timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{mock.base_url}{path}", json=body, headers=AUTH, timeout=timeout)


def sse_data(lines: Iterator[str]) -> list[str]:
    """The data payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def stream_chat(mock: MockUpstream, body: dict[str, Any], path: str = "/chat/completions"
                ) -> tuple[httpx.Response, list[str]]:
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{mock.base_url}{path}", json=body, headers=AUTH) as resp:
            return resp, sse_data(resp.iter_lines())


def raw_post(mock: MockUpstream, body: dict[str, Any]) -> socket.socket:
    """Send a chat request over a bare socket, so the test controls the close."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", mock.port), timeout=5)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: mock\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


def read_events(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: ") < count:
        chunk = sock.recv(65536)
        assert chunk, "server closed early"
        received += chunk
    return received


# ---------------------------------------------------------------- plain answers


def test_reply_words() -> None:
    assert len(MockUpstream.REPLY_WORDS) == 20
    assert MockUpstream().reply_text == " ".join(MockUpstream.REPLY_WORDS)


def test_parse_fault() -> None:
    assert parse_fault("fault-status-429") == Fault("status", 429)
    assert parse_fault("fault-reset-before") == Fault("reset-before")
    assert parse_fault("fault-slow-stream-20") == Fault("slow-stream", 20)
    assert parse_fault("gpt-4o-mini") is None
    assert parse_fault(None) is None


def test_chat_non_streamed_shape(mock: MockUpstream) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello there world"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
    ]
    resp = post(mock, "/chat/completions", {"model": "m-1", "messages": messages})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["id"].startswith("chatcmpl-mock-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "m-1"
    assert body["system_fingerprint"] == "fp_mock"
    assert body["choices"] == [{
        "index": 0, "logprobs": None, "finish_reason": "stop",
        "message": {"role": "assistant", "content": mock.reply_text, "refusal": None},
    }]
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (11, 20, 31)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_chat_n_choices(mock: MockUpstream) -> None:
    body = post(mock, "/chat/completions", {"model": "m", "messages": USER, "n": 3}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {mock.reply_text}


def test_chat_stream_with_usage(mock: MockUpstream) -> None:
    resp, data = stream_chat(mock, {"model": "m", "messages": USER, "stream": True,
                                    "stream_options": {"include_usage": True}})
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "m" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert len(words) == 20 and words[0] == "Hello" and words[1] == " from"
    assert "".join(words) == mock.reply_text


def test_chat_stream_without_usage(mock: MockUpstream) -> None:
    _, data = stream_chat(mock, {"model": "m", "messages": USER, "stream": True})
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_stream(mock: MockUpstream) -> None:
    _, data = stream_chat(mock, {"model": "m", "prompt": "say hi", "stream": True,
                                 "stream_options": {"include_usage": True}}, path="/completions")
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == mock.reply_text
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 20, "total_tokens": 22}


def test_requests_are_recorded(mock: MockUpstream) -> None:
    post(mock, "/chat/completions", {"model": "m-rec", "messages": USER})
    httpx.get(f"{mock.base_url}/models", headers={**AUTH, "X-Trace": "abc"})
    first, second = mock.requests
    assert (first.method, first.path, first.model) == ("POST", "/v1/chat/completions", "m-rec")
    assert first.json == {"model": "m-rec", "messages": USER}
    assert json.loads(first.body) == first.json
    assert first.headers["authorization"] == f"Bearer {KEY}"
    assert (second.method, second.path, second.json, second.model) == ("GET", "/v1/models", None, None)
    assert second.headers["x-trace"] == "abc"
    assert mock.disconnects == []
    mock.clear()
    assert mock.requests == [] and mock.disconnects == []


def test_models(mock: MockUpstream) -> None:
    listing = httpx.get(f"{mock.base_url}/models", headers=AUTH).json()
    assert listing["object"] == "list"
    assert all(m["object"] == "model" and m["owned_by"] == "mock" for m in listing["data"])
    one = httpx.get(f"{mock.base_url}/models/org/some-model", headers=AUTH).json()
    assert one["id"] == "org/some-model" and isinstance(one["created"], int)


# ---------------------------------------------------------------- openai SDK


def test_sdk_chat_and_stream(mock: MockUpstream, sdk: openai.OpenAI) -> None:
    reply = sdk.chat.completions.create(model="gpt-x", messages=USER)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == mock.reply_text
    assert reply.usage is not None and reply.usage.completion_tokens == 20
    stream = sdk.chat.completions.create(model="gpt-x", messages=USER, stream=True,  # type: ignore[arg-type]
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == mock.reply_text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 25


def test_sdk_completions_and_models(mock: MockUpstream, sdk: openai.OpenAI) -> None:
    completion = sdk.completions.create(model="davinci-x", prompt=["a b", "c"])
    assert completion.choices[0].text == mock.reply_text
    assert completion.usage is not None and completion.usage.prompt_tokens == 3
    assert "mock-model" in [m.id for m in sdk.models.list()]
    assert sdk.models.retrieve("abc").id == "abc"


def test_sdk_embeddings_float_and_base64(mock: MockUpstream, sdk: openai.OpenAI) -> None:
    floats = sdk.embeddings.create(model="emb", input=["alpha", "beta"], encoding_format="float")
    decoded = sdk.embeddings.create(model="emb", input=["alpha", "beta"])  # SDK asks for base64
    assert mock.requests[1].json["encoding_format"] == "base64"
    assert [d.embedding for d in floats.data] == [d.embedding for d in decoded.data]
    assert len(floats.data[0].embedding) == 8
    assert floats.data[0].embedding != floats.data[1].embedding
    again = sdk.embeddings.create(model="emb", input="alpha", dimensions=16, encoding_format="float")
    assert len(again.data[0].embedding) == 16
    assert again.data[0].embedding[:8] == floats.data[0].embedding
    tokens = sdk.embeddings.create(model="emb", input=[[1, 2, 3], [4]], encoding_format="float")
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 4


def test_embeddings_base64_is_little_endian_float32(mock: MockUpstream) -> None:
    b64 = post(mock, "/embeddings", {"model": "e", "input": "x", "encoding_format": "base64"}).json()
    flt = post(mock, "/embeddings", {"model": "e", "input": "x"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack("<8f", raw)) == flt["data"][0]["embedding"]
    assert b64["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


# ---------------------------------------------------------------- errors


def test_wrong_or_missing_key_is_401(mock: MockUpstream, sdk: openai.OpenAI) -> None:
    for headers in ({"Authorization": "Bearer sk-wrong-key"}, {}):
        resp = httpx.post(f"{mock.base_url}/chat/completions", json={"model": "m"}, headers=headers)
        assert resp.status_code == 401
        error = resp.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)
        assert "sk-wrong-key" not in error["message"]
    bad = openai.OpenAI(base_url=mock.base_url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert len(mock.requests) == 3


def test_no_key_required_when_disabled() -> None:
    with MockUpstream(api_key=None) as server:
        assert httpx.get(f"{server.base_url}/models").status_code == 200


def test_bad_json_is_400(mock: MockUpstream) -> None:
    resp = httpx.post(f"{mock.base_url}/chat/completions", content=b"{nope", headers=AUTH)
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert mock.requests[0].body == b"{nope" and mock.requests[0].json is None


def test_invalid_embeddings_input_is_400(mock: MockUpstream) -> None:
    resp = post(mock, "/embeddings", {"model": "e", "input": {"not": "valid"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(("status", "type_"), [
    (429, "rate_limit_exceeded"), (401, "invalid_request_error"),
    (500, "server_error"), (503, "server_error"),
])
def test_status_fault(mock: MockUpstream, status: int, type_: str) -> None:
    for path, body in (("/chat/completions", {"messages": USER, "stream": True}),
                       ("/completions", {"prompt": "x"}), ("/embeddings", {"input": "x"})):
        resp = post(mock, path, {"model": f"fault-status-{status}", **body})
        assert resp.status_code == status
        error = resp.json()["error"]
        assert error["type"] == type_ and error["param"] is None and "code" in error
        assert "upstream at http://10.0.0.5:8080/internal" in error["message"]
        assert "key sk-upstream-test" in error["message"]
        assert resp.headers.get("retry-after") == ("7" if status == 429 else None)


def test_status_fault_through_sdk(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="fault-status-429", messages=USER)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "7"


def test_slow_first_byte(mock: MockUpstream) -> None:
    started = time.monotonic()
    resp = post(mock, "/chat/completions", {"model": "fault-slow-first-byte-300", "messages": USER})
    assert 0.3 <= time.monotonic() - started < 3
    assert resp.json()["choices"][0]["message"]["content"] == mock.reply_text
    started = time.monotonic()
    with httpx.Client(timeout=10) as client:
        body = {"model": "fault-slow-first-byte-300", "messages": USER, "stream": True}
        with client.stream("POST", f"{mock.base_url}/chat/completions", json=body, headers=AUTH) as r:
            assert 0.3 <= time.monotonic() - started < 3  # headers held back too
            assert sse_data(r.iter_lines())[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_reset_before(mock: MockUpstream, stream: bool) -> None:
    with pytest.raises(httpx.TransportError):
        post(mock, "/chat/completions", {"model": "fault-reset-before", "messages": USER,
                                         "stream": stream})
    assert len(mock.requests) == 1
    time.sleep(0.1)
    assert mock.disconnects == []  # the server hung up, not the client


def test_reset_before_through_sdk(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        sdk.embeddings.create(model="fault-reset-before", input="x")


def test_reset_after_stream(mock: MockUpstream) -> None:
    body = {"model": "fault-reset-after-3", "messages": USER, "stream": True}
    data: list[str] = []
    with pytest.raises(httpx.TransportError):
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", f"{mock.base_url}/chat/completions", json=body, headers=AUTH) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data.append(line)
    assert len(data) <= 4  # role chunk + 3 words at most, never [DONE]
    assert mock.disconnects == []


def test_reset_after_non_streamed(mock: MockUpstream) -> None:
    with pytest.raises(httpx.TransportError):
        post(mock, "/chat/completions", {"model": "fault-reset-after-1", "messages": USER})


def test_malformed_json(mock: MockUpstream) -> None:
    resp = post(mock, "/chat/completions", {"model": "fault-malformed-json", "messages": USER})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    assert resp.content == b'{"id": "chatcmpl-broken", "choices": ['
    with pytest.raises(json.JSONDecodeError):
        resp.json()
    _, data = stream_chat(mock, {"model": "fault-malformed-json", "messages": USER, "stream": True})
    assert data[1] == "{not json}" and data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:1] + data[2:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == mock.reply_text


def test_stall_stream_detected_by_read_timeout(mock: MockUpstream) -> None:
    body = {"model": "fault-stall-after-3", "messages": USER, "stream": True}
    data: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as client:
            with client.stream("POST", f"{mock.base_url}/chat/completions", json=body, headers=AUTH) as r:
                for line in r.iter_lines():
                    data.extend(sse_data(iter([line])))
    contents = [json.loads(d)["choices"][0]["delta"]["content"] for d in data]
    assert contents == ["", "Hello", " from", " the"]
    assert mock.wait_for_disconnect(timeout=3)  # noticed while stalling
    assert mock.disconnects == mock.requests


def test_stall_non_streamed(mock: MockUpstream) -> None:
    body = {"model": "fault-stall-after-0", "messages": USER}
    with httpx.Client(timeout=httpx.Timeout(5, read=0.5)) as client:
        with client.stream("POST", f"{mock.base_url}/chat/completions", json=body, headers=AUTH) as r:
            assert r.status_code == 200 and int(r.headers["content-length"]) > 10
            with pytest.raises(httpx.ReadTimeout):
                r.read()
    assert mock.wait_for_disconnect(timeout=3)


def test_slow_stream_disconnect_is_recorded(mock: MockUpstream) -> None:
    sock = raw_post(mock, {"model": "fault-slow-stream-100", "messages": USER, "stream": True})
    read_events(sock, 2)
    sock.close()
    assert mock.wait_for_disconnect(timeout=3)
    time.sleep(0.3)
    assert len(mock.disconnects) == 1 and mock.disconnects[0].model == "fault-slow-stream-100"


def test_slow_stream_completes_with_fifty_chunks(mock: MockUpstream) -> None:
    started = time.monotonic()
    _, data = stream_chat(mock, {"model": "fault-slow-stream-5", "messages": USER, "stream": True})
    assert time.monotonic() - started >= 0.25
    chunks = [json.loads(d) for d in data[:-1]]
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == 50
    assert mock.disconnects == []


def test_slow_stream_non_streamed_waits(mock: MockUpstream) -> None:
    started = time.monotonic()
    resp = post(mock, "/chat/completions", {"model": "fault-slow-stream-6", "messages": USER})
    assert time.monotonic() - started >= 0.3 and resp.status_code == 200


def test_disconnect_during_slow_first_byte(mock: MockUpstream) -> None:
    sock = raw_post(mock, {"model": "fault-slow-first-byte-3000", "messages": USER})
    time.sleep(0.1)
    sock.close()
    assert mock.wait_for_disconnect(timeout=2)


def test_finished_requests_are_not_disconnects(mock: MockUpstream) -> None:
    stream_chat(mock, {"model": "m", "messages": USER, "stream": True})
    post(mock, "/completions", {"model": "m", "prompt": "x"})
    assert not mock.wait_for_disconnect(timeout=0.2)


def test_stop_with_request_in_flight_is_quick() -> None:
    server = MockUpstream().start()
    sock = raw_post(server, {"model": "fault-stall-after-1", "messages": USER, "stream": True})
    read_events(sock, 2)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 2 and server.disconnects == []
    sock.close()


def test_runs_in_foreground() -> None:
    """`python -m tests.support.mock_upstream` serves until Ctrl-C, then exits 0 (bounded waits throughout:
    the process runs in its own group, which `running` stops whatever happens)."""
    command = [sys.executable, "-m", "tests.support.mock_upstream", "--port", "0"]
    with running(command, cwd=ROOT, env={"PYTHONPATH": str(ROOT)}) as proc:
        assert proc.wait_for_output("listening on", timeout=30), proc.text()
        line = next(line for line in proc.text().splitlines() if "listening on" in line)
        url = line.split()[4]  # "mock upstream listening on <url> ..."
        assert httpx.get(f"{url}/models", headers=AUTH).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
