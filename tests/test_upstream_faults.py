"""Every error status surfaces as the SDK's matching exception; upstream faults never leak or 500."""

from __future__ import annotations

import json
import socket
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, LIMITED_KEY, UPSTREAM_KEY, RunningGateway, policy_text
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


def _stream_events(gateway: RunningGateway, model: str, **extra: Any) -> tuple[int, list[str]]:
    with httpx.stream("POST", gateway.base_url + "/chat/completions", timeout=20,
                      headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": model, "messages": MESSAGES, "stream": True, **extra}) as response:
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


# -- the upstream connection, redirects, error bodies, the end of a stream -----------------------------


def with_models(upstream: MockUpstream, models: str) -> str:
    """The suite's policy with more aliases (`models` is its last section)."""
    return policy_text(upstream.base_url) + textwrap.indent(textwrap.dedent(models), "  ")


ODD = ("fault-split-context-length", "fault-no-done", "fault-end-after-0", "fault-end-after-2", "fault-end-after-41",
       "fault-empty-stream",
       *(f"fault-redirect-{status}" for status in (301, 302, 303, 307, 308)))


@pytest.fixture(scope="module")
def odd(upstream: MockUpstream) -> Iterator[RunningGateway]:
    """A gateway with an alias for each of the odd answers above (on `mock-fast`), and two of its own."""
    models = "".join(f"{f}: {{provider: mock-fast, model: {f}}}\n" for f in ODD) + textwrap.dedent("""\
        cut: {provider: mock-fast, model: fault-stall-after-3, deadline_s: 0.5}
        stalled: {provider: mock, model: fault-stall-after-3}
        """)
    running = RunningGateway(with_models(upstream, models), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def test_a_body_cut_by_the_deadline_closes_its_upstream_connection(odd: RunningGateway, upstream: MockUpstream) -> None:
    response = httpx.post(odd.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "cut", "messages": MESSAGES}, timeout=20)
    assert response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
    # the body was being read when the deadline came: the connection is closed then, not when the upstream ends
    assert upstream.wait_for_disconnect(timeout=3)
    assert upstream.disconnects[0].model == "fault-stall-after-3"


def test_a_client_leaving_while_the_body_is_read_closes_the_upstream_connection(odd: RunningGateway,
                                                                               upstream: MockUpstream) -> None:
    body = json.dumps({"model": "stalled", "messages": MESSAGES}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {FULL_KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", odd.port)) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 5
        while not upstream.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the first bytes of the body are in: the gateway waits for the rest
    assert upstream.wait_for_disconnect(timeout=5)


@pytest.mark.parametrize("streamed", [False, True])
def test_an_upstream_redirect_is_not_followed(odd: RunningGateway, upstream: MockUpstream, streamed: bool) -> None:
    statuses = (301, 302, 303, 307, 308)
    for status in statuses:
        response = httpx.post(odd.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                              json={"model": f"fault-redirect-{status}", "messages": MESSAGES, "stream": streamed},
                              timeout=20)
        assert response.status_code == 502, (status, response.text)
        message = response.json()["error"]["message"]
        assert f"redirect (HTTP {status})" in message and "redirected" not in message and "http:" not in message
        assert "location" not in {name.lower() for name in response.headers}
    # the prompt and the credentials went to the upstream named in the policy, and nowhere else
    assert [(r.path, r.model) for r in upstream.requests] == [
        ("/v1/chat/completions", f"fault-redirect-{status}") for status in statuses]


def test_an_error_body_that_arrives_in_pieces_is_read_whole(odd: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(odd, "fault-split-context-length")
    error = caught.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "maximum context length is 128 tokens" in error["message"]


@pytest.mark.parametrize(("model", "bound"), [("fault-error-trickle-3000", "idle_s"),
                                              ("fault-error-trickle-200", "total_s")])
def test_an_error_body_is_read_under_the_targets_own_timeouts(make_gateway, upstream: MockUpstream,  # type: ignore[no-untyped-def]
                                                              model: str, bound: str) -> None:
    # the provider `mock` waits 60 s between reads; the target, half a second, and a second in all
    timeouts = "{connect_s: 0.5, first_byte_s: 0.5, idle_s: 0.5, total_s: 1}"
    running = make_gateway(with_models(upstream, f"""\
        slow-error:
          targets: [{{provider: mock, model: {model}, timeouts: {timeouts}}}]
        """))
    for streamed in (False, True):
        started = time.monotonic()
        response = httpx.post(running.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                              json={"model": "slow-error", "messages": MESSAGES, "stream": streamed}, timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 502 and elapsed < 2, (bound, streamed, response.status_code, elapsed)


def test_a_stream_that_ends_without_done_after_its_finish_reason_is_whole(odd: RunningGateway,
                                                                          upstream: MockUpstream) -> None:
    # as llama.cpp's server (until 2024-09), text-generation-inference (until mid-2024) and ik_llama.cpp end theirs
    status, events = _stream_events(odd, "fault-no-done")
    assert status == 200 and events[-1] == "data: [DONE]"
    assert not any('"error"' in event for event in events)
    text = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text == upstream.reply_text


@pytest.mark.parametrize("model", ["fault-end-after-2", "fault-end-after-0"])
def test_a_stream_that_ends_before_its_answer_is_complete_ends_with_an_error(odd: RunningGateway, model: str) -> None:
    status, events = _stream_events(odd, model)
    assert status == 200
    assert events[-1].startswith('data: {"error"') and '"code":"upstream_error"' in events[-1], events[-1]
    assert "data: [DONE]" not in events
    with pytest.raises(openai.APIError):
        for _ in client(odd).chat.completions.create(model=model, messages=MESSAGES, stream=True):  # type: ignore[arg-type]
            pass


def test_a_stream_of_several_choices_that_ends_before_each_finished_ends_with_an_error(odd: RunningGateway) -> None:
    """`n: 2`, and the body ends cleanly (no [DONE]) after choice 0's finish chunk: choice 1 never finished. Taken
    as whole (the last chunk had a finish reason), the cache stored it and replayed choice 1 unfinished."""
    status, events = _stream_events(odd, "fault-end-after-41", n=2)
    assert status == 200 and '"code":"upstream_error"' in events[-1] and "data: [DONE]" not in events
    with httpx.stream("POST", odd.base_url + "/completions", timeout=20,
                      headers={"Authorization": f"Bearer {FULL_KEY}"},
                      json={"model": "fault-end-after-41", "prompt": ["p", "q"], "stream": True}) as response:
        cut = [e for e in response.read().decode().split("\n\n") if e]  # two prompts: two answers, one finished
    assert '"code":"upstream_error"' in cut[-1] and "data: [DONE]" not in cut
    status, events = _stream_events(odd, "fault-no-done", n=2)  # both finished, then no [DONE]: whole
    finished = {c["index"] for e in events[:-1] for c in json.loads(e.removeprefix("data: ")).get("choices", ())
                if c.get("finish_reason")}
    assert status == 200 and events[-1] == "data: [DONE]" and finished == {0, 1}


def test_a_stream_without_any_event_is_an_error_not_an_empty_answer(odd: RunningGateway) -> None:
    status, events = _stream_events(odd, "fault-empty-stream")
    assert "data: [DONE]" not in events
    assert status == 502 or events[-1].startswith('data: {"error"'), (status, events)
