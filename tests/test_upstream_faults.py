"""Every error status surfaces as the SDK's matching exception; upstream faults never leak or 500."""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, LIMITED_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream

MESSAGES = [{"role": "user", "content": "hello"}]
LEAKS = ("10.0.0.5", "sk-upstream-test", "/internal", "http://")


def client(gateway: RunningGateway, key: str = FULL_KEY, timeout: float = 20) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=timeout)


def chat(gateway: RunningGateway, model: str, key: str = FULL_KEY) -> object:
    return client(gateway, key).chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("model", "key", "exception", "status"),
    [
        ("chat", "gw-wrong-key", openai.AuthenticationError, 401),
        ("chat", "", openai.AuthenticationError, 401),
        ("embed", LIMITED_KEY, openai.NotFoundError, 404),  # as unknown: a key cannot enumerate aliases
        ("no-such-alias", FULL_KEY, openai.NotFoundError, 404),
        ("fault-status-429", FULL_KEY, openai.RateLimitError, 429),
        ("fault-status-500", FULL_KEY, openai.APIStatusError, 502),
        ("fault-status-503", FULL_KEY, openai.APIStatusError, 502),
        ("fault-status-401", FULL_KEY, openai.APIStatusError, 502),
        ("fault-status-404", FULL_KEY, openai.APIStatusError, 502),
        ("fault-status-400", FULL_KEY, openai.BadRequestError, 400),
        ("fault-slow-first-byte-3000", FULL_KEY, openai.APIStatusError, 504),
        ("fault-reset-before", FULL_KEY, openai.APIStatusError, 502),
        ("fault-reset-after-3", FULL_KEY, openai.APIStatusError, 502),
        ("fault-malformed-json", FULL_KEY, openai.APIStatusError, 502),
        ("fault-stall-after-3", FULL_KEY, openai.APIStatusError, 504),
    ],
)
def test_error_statuses_map_to_sdk_exceptions(
    gateway: RunningGateway, model: str, key: str, exception: type[openai.APIStatusError], status: int
) -> None:
    api = openai.OpenAI(base_url=gateway.base_url, api_key=key or "unused", max_retries=0, timeout=20,
                        default_headers={"Authorization": ""} if not key else None)
    with pytest.raises(exception) as caught:
        api.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == status
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert not any(leak in body["error"]["message"] for leak in LEAKS), body
    assert error.response.headers["x-request-id"]


def test_rate_limit_passes_retry_after(gateway: RunningGateway) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gateway, "fault-status-429")
    assert caught.value.response.headers["retry-after"] == "7"


def test_upstream_message_is_sanitized_but_kept(gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(gateway, "fault-status-400")
    message = caught.value.response.json()["error"]["message"]
    assert "rejected the request" in message and "[url]" in message and "[redacted]" in message


def test_connection_refused_is_502(make_gateway, upstream: MockUpstream) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    running = make_gateway(policy_text(f"http://127.0.0.1:{dead_port}/v1"))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(running, "chat")
    assert caught.value.status_code == 502
    assert str(dead_port) not in caught.value.response.text


def _stream_events(gateway: RunningGateway, model: str) -> tuple[int, list[str]]:
    with httpx.stream("POST", gateway.base_url + "/chat/completions", timeout=20,
                      headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": model, "messages": MESSAGES, "stream": True}) as response:
        body = response.read().decode()
    return response.status_code, [e for e in body.split("\n\n") if e]


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("fault-stall-after-3", "upstream_timeout"),
        ("fault-reset-after-3", "upstream_error"),
        ("fault-malformed-json", "upstream_error"),
    ],
)
def test_failure_mid_stream_ends_with_an_error_event(gateway: RunningGateway, model: str, code: str) -> None:
    status, events = _stream_events(gateway, model)
    assert status == 200
    assert events[-1].startswith("data: {\"error\"")
    assert f'"code":"{code}"' in events[-1]
    assert not any(leak in events[-1] for leak in LEAKS)
    with pytest.raises(openai.APIError):
        for _ in client(gateway).chat.completions.create(model=model, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            pass


def test_failure_before_the_stream_starts_is_a_plain_error(gateway: RunningGateway) -> None:
    with pytest.raises(openai.RateLimitError):
        client(gateway).chat.completions.create(model="fault-status-429", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway).chat.completions.create(model="fault-reset-before", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    assert caught.value.status_code == 502


def test_client_disconnect_mid_stream_cancels_the_upstream(gateway: RunningGateway, upstream: MockUpstream) -> None:
    with httpx.stream("POST", gateway.base_url + "/chat/completions", timeout=20,
                      headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": "fault-slow-stream-100", "messages": MESSAGES, "stream": True}) as response:
        received = b""
        for piece in response.iter_raw():
            received += piece
            if received.count(b"\n\n") >= 3:
                break
    assert upstream.wait_for_disconnect(timeout=5)
    assert upstream.disconnects[0].model == "fault-slow-stream-100"
    deadline = time.monotonic() + 5
    while "gateway_requests_in_flight 0.0" not in gateway.metrics() and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = gateway.metrics()
    assert "gateway_requests_in_flight 0.0" in metrics
    assert 'model="fault-slow-stream-100",status="499"' in metrics


def test_errors_are_counted_by_status(gateway: RunningGateway) -> None:
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "made-up-model-name-xyz")
    metrics = gateway.metrics()
    assert 'gateway_requests_total{endpoint="chat",model="unknown",status="404"}' in metrics
    assert "made-up-model-name-xyz" not in metrics  # client text never becomes a label


def test_invalid_and_oversized_requests_raise_the_sdk_exceptions(gateway: RunningGateway) -> None:
    api = client(gateway)
    with pytest.raises(openai.BadRequestError) as invalid:
        api.chat.completions.create(model="chat", messages=[])
    assert invalid.value.status_code == 400 and invalid.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as oversized:
        api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x" * 2_000_000}])
    assert oversized.value.status_code == 413
    assert oversized.value.body["code"] == "request_too_large"  # type: ignore[index]
