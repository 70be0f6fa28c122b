"""A prompt too long for its alias, handed to a `context_fallback` that cannot take the request either (its targets'
API lacks the endpoint, or a field the request asks), is the client's 400 `context_length_exceeded`, not a 502: no
target could have answered, so no upstream failed (`routing.attempts.aggregate`, `_handed_on`). The client can act
on it (a shorter prompt fits the first alias), and must not retry it as is (`x-should-retry: false`).

Every other shape answers as before: a fallback that answers, or fails with a 5xx or a 429 (those decide the answer:
a 502, a 429, which a retry may clear). End to end, against the mock upstream, with raw HTTP and the openai SDK.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.test_routing import AUTH, routing_policy

Make = Callable[..., RunningGateway]
TOO_LONG = {"model": "big", "input": "hello there"}


@pytest.fixture(scope="module")
def upstream_b() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


def _policy(upstream: MockUpstream, upstream_b: MockUpstream) -> str:
    claude = (f'  claude: {{kind: anthropic, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}\n'
              f'  claude2: {{kind: anthropic, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}\n')
    return routing_policy(upstream, upstream_b, """\
        big: {provider: a, model: fault-context-length, context_fallback: chat_only}
        chat_only: {provider: claude, model: claude-x}
        big_two: {provider: a, model: fault-context-length, context_fallback: chat_only_two}
        chat_only_two:
          targets: [{provider: claude, model: claude-x}, {provider: claude2, model: claude-y}]
        to_fine: {provider: a, model: fault-context-length, context_fallback: fine}
        fine: {provider: b, model: mock-model}
        to_broken: {provider: a, model: fault-context-length, context_fallback: broken}
        broken: {provider: b, model: fault-status-500}
        to_limited: {provider: a, model: fault-context-length, context_fallback: limited}
        limited: {provider: b, model: fault-status-429}
        to_mixed: {provider: a, model: fault-context-length, context_fallback: mixed}
        mixed:
          targets: [{provider: claude, model: claude-x}, {provider: b, model: fault-status-500}]
        """, providers=claude)


@pytest.fixture
def running(make_gateway: Make, upstream: MockUpstream, upstream_b: MockUpstream) -> RunningGateway:
    upstream_b.clear()
    return make_gateway(_policy(upstream, upstream_b))


def _post(running: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(running.base_url + path, headers=AUTH, json=body, timeout=30)


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


def _assert_too_long(response: httpx.Response, alias: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "context_length_exceeded", None)
    assert f"the prompt is too long for `{alias}`" in error["message"]
    assert "exceeds its context window" in error["message"]  # each attempt is named, the refusal first
    headers = response.headers
    assert headers["x-gateway-attempts"] == "1"  # sent once; the fallback's target was passed over, nothing sent
    assert headers["x-should-retry"] == "false"  # the same request meets the same answer
    assert headers["x-gateway-fallback-reason"] == "context_length"


@pytest.mark.parametrize("path", ["/responses", "/embeddings"])
def test_a_fallback_whose_targets_lack_the_endpoint_answers_the_prompt_too_long(
        running: RunningGateway, upstream_b: MockUpstream, path: str) -> None:
    for alias in ("big", "big_two"):
        response = _post(running, path, {**TOO_LONG, "model": alias})
        _assert_too_long(response, alias)
        assert "cannot serve /v1" + path in response.json()["error"]["message"]
    assert not upstream_b.requests
    metrics = running.metrics()
    assert 'gateway_upstream_attempts_total{outcome="unsupported",target="claude/claude-x"} 2.0' in metrics
    assert 'gateway_upstream_attempts_total{outcome="unsupported",target="claude2/claude-y"} 1.0' in metrics


def test_a_fallback_that_lacks_a_field_answers_the_prompt_too_long(running: RunningGateway) -> None:
    response = _post(running, "/chat/completions", _chat("big", temperature=1.5))
    _assert_too_long(response, "big")
    assert "`temperature` above 1 is not supported" in response.json()["error"]["message"]


def test_the_openai_sdk_raises_a_bad_request_it_does_not_retry(running: RunningGateway) -> None:
    client = openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=2, timeout=15)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="big", input="hello there")
    assert caught.value.code == "context_length_exceeded"
    assert 'gateway_upstream_attempts_total{outcome="context_length",target="a/fault-context-length"} 1.0' in (
        running.metrics())  # once: the SDK did not send it again


def test_a_fallback_without_the_endpoint_for_every_target_is_still_unsupported(running: RunningGateway) -> None:
    response = _post(running, "/embeddings", {"model": "chat_only_two", "input": "hello"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "unsupported_endpoint", "model")
    assert response.headers["x-gateway-attempts"] == "0" and response.headers["x-should-retry"] == "false"


def test_a_fallback_that_answers_still_answers(running: RunningGateway, upstream_b: MockUpstream) -> None:
    response = _post(running, "/responses", {**TOO_LONG, "model": "to_fine"})
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-target"] == "b/mock-model"
    assert response.headers["x-gateway-attempts"] == "2"
    assert [r.path for r in upstream_b.requests] == ["/v1/responses"]


@pytest.mark.parametrize("path,body", [
    ("/responses", {**TOO_LONG, "model": "to_broken"}),
    ("/chat/completions", _chat("to_mixed", temperature=1.5)),  # claude lacks the field: b's 500 decides
])
def test_a_fallback_that_fails_upstream_stays_a_502(running: RunningGateway, path: str, body: dict[str, Any]) -> None:
    response = _post(running, path, body)
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "all_targets_failed")
    assert response.headers["x-gateway-attempts"] == "2"
    assert "x-should-retry" not in response.headers  # a 5xx may clear
    assert response.headers["x-gateway-target"] == "b/fault-status-500"


def test_a_rate_limited_fallback_stays_a_429(running: RunningGateway) -> None:
    response = _post(running, "/responses", {**TOO_LONG, "model": "to_limited"})
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert "all 2 attempts for `to_limited` failed" in error["message"]
    assert response.headers["retry-after"] == "7"  # the upstream's wait, passed on
    assert response.headers["x-gateway-attempts"] == "2"
    assert "x-should-retry" not in response.headers
