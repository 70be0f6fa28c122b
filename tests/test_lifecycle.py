"""The request lifecycle end to end: what the client gets, what the upstream sees, what is recorded.

A real gateway on a real port, the mock upstream speaking OpenAI's wire format,
and raw HTTP clients where a test needs to leave at a precise moment.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.openapi_spec import validate

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = [{"role": "user", "content": "hello"}]
Make = Callable[..., RunningGateway]


def stream_payloads(gateway: RunningGateway, path: str, body: dict[str, object]) -> list[str]:
    with httpx.stream("POST", gateway.base_url + path, headers=AUTH, json=body, timeout=20) as response:
        assert response.status_code == 200
        text = response.read().decode()
    return [event.rpartition("\n")[2].removeprefix("data: ") for event in text.split("\n\n") if event]  # (no `event:`)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- what the client gets ---------------------------------------------------------------


@pytest.mark.parametrize(("path", "extra", "component"), [
    ("/chat/completions", {"messages": MESSAGES}, "CreateChatCompletionStreamResponse"),
    ("/completions", {"prompt": "hi"}, "CreateCompletionResponse"),
])
def test_a_client_that_did_not_ask_for_usage_gets_no_trace_of_the_gateways_usage_request(
    gateway: RunningGateway, upstream: MockUpstream, path: str, extra: dict[str, object], component: str,
) -> None:
    payloads = stream_payloads(gateway, path, {"model": "chat", "stream": True, **extra})
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks and all("usage" not in chunk for chunk in chunks)  # not even "usage": null
    assert all(chunk["choices"] for chunk in chunks)  # and no usage-only chunk
    # The spec types a completion chunk's finish_reason as a string, so only the last chunk of a
    # legacy completion stream can validate; with "usage": null it did not (usage must be an object).
    for chunk in chunks if component.endswith("StreamResponse") else chunks[-1:]:
        validate(component, chunk)
    # the gateway did ask the upstream, for its own accounting
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    assert 'gateway_tokens_total{kind="completion",model="chat"}' in gateway.metrics()


def test_a_client_that_asked_for_usage_gets_exactly_what_the_upstream_sent(gateway: RunningGateway) -> None:
    payloads = stream_payloads(gateway, "/chat/completions", {
        "model": "chat", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" in chunk for chunk in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_every_proxied_answer_names_the_policy_version(gateway: RunningGateway) -> None:
    version = gateway.policy.version
    ok = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, json={"model": "chat", "messages": MESSAGES})
    bad = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, json={"model": "nope", "messages": MESSAGES})
    with httpx.stream("POST", gateway.base_url + "/chat/completions", headers=AUTH,
                      json={"model": "chat", "messages": MESSAGES, "stream": True}) as streamed:
        streamed.read()
    assert {r.headers["x-gateway-policy-version"] for r in (ok, bad, streamed)} == {version}


# -- what the upstream sees: a client that leaves cancels the call ----------------------------


def _leave_during_first_byte_wait(gateway: RunningGateway, stream: bool) -> float:
    body = json.dumps({"model": "fault-slow-first-byte-3000", "messages": MESSAGES, "stream": stream}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        sock.sendall(head + body)
        time.sleep(0.5)  # the gateway is now waiting for the upstream's first byte
        left = time.monotonic()
    return left


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_while_the_upstream_thinks_cancels_the_upstream_call(
    gateway: RunningGateway, upstream: MockUpstream, stream: bool,
) -> None:
    left = _leave_during_first_byte_wait(gateway, stream)
    assert upstream.wait_for_disconnect(timeout=1.0), "the upstream connection was not closed within 1 s"
    assert time.monotonic() - left < 1.0
    assert wait_for(lambda: 'model="fault-slow-first-byte-3000",status="499"' in gateway.metrics())
    assert wait_for(lambda: "gateway_requests_in_flight 0.0" in gateway.metrics())


# -- every answer is recorded, errors before the pipeline's work included ------------------------


def test_method_size_and_parse_errors_are_recorded_and_logged(
    make_gateway: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(access_log="true")
    url = running.base_url + "/chat/completions"
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        assert httpx.get(url, headers=AUTH).status_code == 405
        assert httpx.post(url, headers=AUTH, content=b"x" * 2_000_000).status_code == 413
        assert httpx.post(url, headers=AUTH, content=b"{nope").status_code == 400
    metrics = running.metrics()
    for status in ("405", "413", "400"):
        assert f'endpoint="chat",model="unknown",status="{status}"' in metrics
    lines = [getattr(r, "fields", {}) for r in caplog.records if r.name == "gateway.access"]
    assert sorted(line["status"] for line in lines) == [400, 405, 413]
    assert all(line["error"] for line in lines)  # every error line names its code


def test_oversized_headers_are_refused_by_the_server_and_counted(make_gateway: Make) -> None:
    running = make_gateway()
    before = _refused(running)
    response = httpx.post(running.base_url + "/chat/completions", headers={**AUTH, "x-big": "y" * 70_000}, json={})
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"
    assert _refused(running) == before + 1


def _refused(running: RunningGateway) -> float:
    for line in running.metrics().splitlines():
        if line.startswith('gateway_http_refused_total{reason="headers_too_large"}'):
            return float(line.split()[-1])
    return 0.0


def test_the_key_is_checked_before_the_body_is_parsed(gateway: RunningGateway) -> None:
    response = httpx.post(gateway.base_url + "/chat/completions", content=b"{not json")
    assert response.status_code == 401 and "JSON" not in response.text


# -- tokens are counted when the upstream reports none ------------------------------------------


def with_provider(upstream: MockUpstream, provider: str, models: str, **server: object) -> str:
    """The test policy plus one more provider (its YAML flow mapping) and its aliases."""
    text = policy_text(upstream.base_url, **server)
    extra = f"  extra: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY, {provider}}}\n"
    text = text.replace("providers:\n", "providers:\n" + extra, 1)
    return text + models


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.name == "gateway.access"]


def test_tokens_are_estimated_when_a_non_streamed_answer_has_no_usage(
    make_gateway: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(access_log="true")
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        answer = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0).chat.completions.create(
            model="fault-no-usage", messages=[{"role": "user", "content": "count these words please"}])
    assert answer.usage is None  # the client gets the upstream's answer as it was
    line = access_lines(caplog)[-1]
    assert line["tokens_estimated"] is True
    assert isinstance(line["prompt_tokens"], int) and line["prompt_tokens"] > 4
    assert isinstance(line["completion_tokens"], int) and line["completion_tokens"] >= 20  # twenty words
    assert 'gateway_tokens_total{kind="completion",model="fault-no-usage"}' in running.metrics()


def test_tokens_are_estimated_for_a_responses_answer_without_usage(
    make_gateway: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    """A Responses request's instructions and input items are its prompt, its output's text its answer."""
    running = make_gateway(access_log="true")
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        answer = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0).responses.create(
            model="fault-no-usage", instructions="Answer in a few words, as a benchmark upstream would.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "count these words please"}]}])
    assert answer.usage is None
    line = access_lines(caplog)[-1]
    assert line["tokens_estimated"] is True
    assert isinstance(line["prompt_tokens"], int) and line["prompt_tokens"] > 15  # instructions and input
    assert isinstance(line["completion_tokens"], int) and line["completion_tokens"] >= 20  # twenty words


def test_streamed_tokens_are_estimated_when_the_upstream_ignores_the_usage_request(
    make_gateway: Make, caplog: pytest.LogCaptureFixture,
) -> None:
    running = make_gateway(access_log="true")
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        for _ in range(2):  # the first stream reveals it; the second is counted with tiktoken
            stream_payloads(running, "/chat/completions",
                            {"model": "fault-no-usage", "messages": MESSAGES, "stream": True})
    first, second = access_lines(caplog)[-2:]
    assert first["tokens_estimated"] is True and second["tokens_estimated"] is True
    assert isinstance(first["completion_tokens"], int) and first["completion_tokens"] >= 20
    assert isinstance(second["completion_tokens"], int) and second["completion_tokens"] >= 20


def test_a_provider_with_stream_usage_off_is_counted_by_the_gateway(
    make_gateway: Make, upstream: MockUpstream, caplog: pytest.LogCaptureFixture,
) -> None:
    text = with_provider(upstream, "stream_usage: false", "  quiet: {provider: extra, model: mock-model}\n",
                         access_log="true")
    running = make_gateway(text)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        stream_payloads(running, "/chat/completions", {"model": "quiet", "messages": MESSAGES, "stream": True})
    assert "stream_options" not in (upstream.requests[-1].json or {})
    line = access_lines(caplog)[-1]
    assert line["tokens_estimated"] is True
    assert line["completion_tokens"] == running.gateway.tokens.count(upstream.reply_text)


# -- upstream reads are bounded -------------------------------------------------------------------


def test_a_non_streamed_body_that_stalls_is_cut_at_the_idle_timeout(gateway: RunningGateway) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, max_retries=0, timeout=30).chat.completions.create(
            model="fault-stall-after-3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert time.monotonic() - started < 10  # idle_s is 1.5 s; total_s (20 s) would be too late


def test_an_oversized_answer_is_refused_while_it_is_read(make_gateway: Make, upstream: MockUpstream) -> None:
    text = with_provider(upstream, "max_response_bytes: 65536",
                         "  big: {provider: extra, model: fault-huge-body-512}\n")
    running = make_gateway(text)
    response = httpx.post(running.base_url + "/chat/completions", headers=AUTH,
                          json={"model": "big", "messages": MESSAGES}, timeout=20)
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_answer_too_large"


def test_a_non_streamed_body_that_arrives_in_pieces_is_read_whole(make_gateway: Make, upstream: MockUpstream) -> None:
    """Parts already received are taken without waiting; a part still to come is waited for (within idle_s)."""
    answer = json.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "piece " * 200}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 200, "total_tokens": 203}}).encode()
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve_once() -> None:
        conn, _ = server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%b" % (len(answer), answer[:100]))
            for start in (100, 700):  # then two more parts, each after a pause shorter than idle_s
                time.sleep(0.3)
                conn.sendall(answer[start:start + 600] if start == 100 else answer[start:])
            time.sleep(0.3)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    text = with_provider(upstream, "timeouts: {connect_s: 1, first_byte_s: 2, idle_s: 1, total_s: 20}",
                         "  pieces: {provider: extra, model: m}\n")
    extra = "api_key_env: MOCK_UPSTREAM_KEY, timeouts"
    running = make_gateway(text.replace(f"base_url: {upstream.base_url}, {extra}",
                                        f"base_url: http://127.0.0.1:{port}/v1, {extra}"))
    try:
        response = httpx.post(running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                              json={"model": "pieces", "messages": MESSAGES})
    finally:
        thread.join(5)
        server.close()
    assert response.status_code == 200
    assert response.content == answer


def test_a_full_connection_pool_answers_503_after_its_wait(make_gateway: Make, upstream: MockUpstream) -> None:
    text = with_provider(upstream, "pool_size: 1, pool_timeout_s: 0.3",
                         "  narrow: {provider: extra, model: fault-slow-stream-100}\n")
    running = make_gateway(text)
    with httpx.stream("POST", running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                      json={"model": "narrow", "messages": MESSAGES, "stream": True}) as held:
        pieces = held.iter_raw()
        next(pieces)  # the one slot is taken by this stream (kept open: `pieces` is still referenced)
        refused = httpx.post(running.base_url + "/chat/completions", headers=AUTH, timeout=20,
                             json={"model": "narrow", "messages": MESSAGES})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "gateway_busy"
        assert refused.headers["retry-after"] == "1"
        assert 'gateway_upstream_pool_timeouts_total{provider="extra"} 1.0' in running.metrics()
        assert 'gateway_upstream_pool_waiting{provider="extra"} 0.0' in running.metrics()


# -- secrets never reach a client -------------------------------------------------------------------

ECHOED = (UPSTREAM_KEY, "vllm-0.vllm-headless", "vllm-gpu-7", "gpu-worker-17.prod.example.com", "fd00::1")


def test_an_upstream_error_that_echoes_credentials_and_hosts_is_scrubbed(gateway: RunningGateway) -> None:
    response = httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, timeout=20,
                          json={"model": "fault-echo-secrets", "messages": MESSAGES})
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "Incorrect API key provided" in message  # the useful part stays
    assert not any(leak in message for leak in ECHOED), message


def test_a_chat_style_error_event_in_a_responses_stream_is_scrubbed_and_ends_it(gateway: RunningGateway) -> None:
    """`data: {"error": {...}}` mid-stream on `/v1/responses` (as chat-style servers write it) was forwarded byte
    for byte, with the key it echoed: only `type: "error"` events were read as errors."""
    payloads = stream_payloads(gateway, "/responses",
                               {"model": "fault-echo-secrets-midstream", "input": "hello", "stream": True})
    joined = "\n".join(payloads)
    assert "Incorrect API key provided" in joined and not any(leak in joined for leak in ECHOED), joined
    assert "error" in json.loads(payloads[-1]).get("type", "") or "error" in json.loads(payloads[-1])


def test_a_mid_stream_error_that_echoes_credentials_and_hosts_is_scrubbed(gateway: RunningGateway) -> None:
    payloads = stream_payloads(gateway, "/chat/completions",
                               {"model": "fault-echo-secrets-midstream", "messages": MESSAGES, "stream": True})
    error = json.loads(payloads[-1])["error"]
    assert "Incorrect API key provided" in error["message"]
    assert not any(leak in error["message"] for leak in ECHOED), error


# -- a drain deadline cuts what is left, and says so --------------------------------------------------


def test_a_stream_cut_at_the_drain_deadline_ends_with_an_error_event(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    received = b""
    with caplog.at_level(logging.INFO), httpx.stream(
        "POST", gateway.base_url + "/chat/completions", headers=AUTH, timeout=20,
        json={"model": "fault-slow-stream-100", "messages": MESSAGES, "stream": True},
    ) as response:
        for piece in response.iter_raw():
            received += piece
            if received.count(b"\n\n") == 3:
                gateway_loop_call(gateway, gateway.gateway.cut_all)
    last = [e for e in received.decode().split("\n\n") if e][-1]
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down"
    assert wait_for(lambda: 'model="fault-slow-stream-100",status="503"' in gateway.metrics())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


def gateway_loop_call(running: RunningGateway, callback: Callable[[], None]) -> None:
    """Run `callback` on the gateway's event loop (it runs in a thread)."""
    assert running.gateway.loop is not None
    running.gateway.loop.call_soon_threadsafe(callback)


# -- shared state: Redis going away never fails or hangs a request -----------------------------------


def test_redis_stopped_and_restarted_while_requests_run(make_gateway: Make, upstream: MockUpstream) -> None:
    from tests.support.redis_server import RedisServer

    with RedisServer() as redis_server:
        text = policy_text(upstream.base_url, watch_interval_s=0.2).replace(
            "auth: keys", "state: {backend: redis, url_env: GW_TEST_REDIS, op_timeout_s: 0.2}\nauth: keys")
        running = make_gateway(text, env={"GW_TEST_REDIS": redis_server.url})

        def ready() -> dict[str, object]:
            response = httpx.get(running.url + "/readyz", timeout=5)
            assert response.status_code == 200  # the gateway keeps serving either way
            return response.json()  # type: ignore[no-any-return]

        def store_healthy() -> bool:
            return bool(ready()["store"]["healthy"])  # type: ignore[index]

        def chat_ok() -> bool:
            started = time.monotonic()
            response = httpx.post(running.base_url + "/chat/completions", headers=AUTH, timeout=10,
                                  json={"model": "chat", "messages": MESSAGES})
            return response.status_code == 200 and time.monotonic() - started < 2

        assert wait_for(store_healthy)
        assert 'gateway_store_up{backend="redis"} 1.0' in running.metrics()
        redis_server.stop()
        assert wait_for(lambda: not store_healthy())
        assert all(chat_ok() for _ in range(5))
        assert 'gateway_store_up{backend="redis"} 0.0' in running.metrics()
        redis_server.start()
        assert wait_for(store_healthy, timeout=10)
        assert chat_ok()


def test_metrics_can_require_a_token(make_gateway: Make) -> None:
    running = make_gateway(metrics_token_env="GW_METRICS_TOKEN", env={"GW_METRICS_TOKEN": "scrape-token-123456"})
    assert httpx.get(running.url + "/metrics").status_code == 401
    assert httpx.get(running.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scraped = httpx.get(running.url + "/metrics", headers={"Authorization": "Bearer scrape-token-123456"})
    assert scraped.status_code == 200 and "gateway_requests_in_flight" in scraped.text


def test_a_metrics_token_variable_that_is_not_set_locks_metrics(upstream: MockUpstream) -> None:
    from gateway.policy import compile_text

    text = policy_text(upstream.base_url, metrics_token_env="GW_UNSET_TOKEN")
    policy = compile_text(text, "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}, require_env=False)
    assert policy.metrics_token == "" and any("GW_UNSET_TOKEN" in w for w in policy.warnings)


@pytest.mark.parametrize("path", ["/healthz", "/v1/models"])
def test_a_1_mib_header_is_refused_on_every_route_before_it_is_buffered(gateway: RunningGateway, path: str) -> None:
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {FULL_KEY}\r\nX-Big: ".encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head)
        sent, reply = 0, b""
        try:
            while sent < 1024 * 1024:  # stop as soon as the server has answered and closed
                sock.sendall(b"a" * 16384)
                sent += 16384
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
    assert b"headers_too_large" in reply


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_probes_answer_head_as_get_without_a_body(gateway: RunningGateway, path: str) -> None:
    """Load balancers probe with GET or HEAD: HEAD gets GET's status and headers, and no body."""
    got = httpx.get(gateway.url + path, timeout=10)
    head = httpx.head(gateway.url + path, timeout=10)
    assert got.status_code == head.status_code == 200 and got.content
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["x-request-id"]
