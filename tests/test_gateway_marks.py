"""The gateway's own body fields are never a client's, and mistyped fields a translator reads are a 400.

The `/v1/messages` ingress marks the internal chat body it builds (`translate.common.MARKS`) so that each provider
knows what to strip or send: `_gateway_anthropic_only` names fields every other provider removes,
`_gateway_cache_control` says there is something to remove, `_gateway_anthropic_beta` carries the client's
`anthropic-beta` values. A Chat Completions client could send them too: `"_gateway_anthropic_only": ["max_tokens"]`
had the gateway reserve a hard budget for one token and then send the request with no cap at all (spend ten times
the budget in one answer), `["stream"]` made the upstream answer (and bill) a whole completion the gateway then
failed as not a stream, and a beta value with a line break made the request unsendable: either opened the target's
breaker, shared by every tenant, in five requests. Now any of them is a 400 and nothing is sent.

Anthropic and Gemini targets read `response_format.json_schema` and an assistant's `tool_calls` themselves: a
`json_schema` that is not an object or `tool_calls` that is not a list was a 500.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_gemini import MockGemini
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-marks-test-key-00000000000000"
GEMINI_KEY = "gemini-marks-test-key"
MESSAGES = [{"role": "user", "content": "hello"}]
MARKED = [
    ("_gateway_anthropic_only", ["max_tokens"]),
    ("_gateway_cache_control", True),
    ("_gateway_anthropic_beta", ["x\ny"]),
]


def _policy(openai_url: str, anthropic_url: str, gemini_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        server: {{watch_policy: false}}
        auth: none
        routing: {{breaker: {{failures: 1, cooldown_s: 60}}}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
          gemini: {{kind: gemini, base_url: {gemini_url}, api_key_env: GEMINI_KEY}}
        models:
          gpt: {{provider: openai, model: mock-model}}
          claude: {{provider: claude, model: claude-mock}}
          gemini: {{provider: gemini, model: gemini-mock}}
          embed: {{provider: openai, model: text-embedding-3-small}}
        """)


@pytest.fixture(scope="module")
def mocks() -> Iterator[tuple[MockAnthropic, MockGemini]]:
    with MockAnthropic(ANTHROPIC_KEY) as claude, MockGemini(GEMINI_KEY) as gemini:
        yield claude, gemini


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, mocks: tuple[MockAnthropic, MockGemini]) -> Iterator[RunningGateway]:
    claude, gemini = mocks
    running = RunningGateway(_policy(upstream.base_url, claude.base_url, gemini.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY,
                              "GEMINI_KEY": GEMINI_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=30)


def _bad_request(response: httpx.Response, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return str(error["message"])


def _sent(upstream: MockUpstream, mocks: tuple[MockAnthropic, MockGemini]) -> int:
    return len(upstream.requests) + sum(len(mock.requests) for mock in mocks)


@pytest.mark.parametrize(("field", "value"), MARKED)
@pytest.mark.parametrize("alias", ["gpt", "claude", "gemini"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_may_not_set_the_gateways_own_fields(gw: RunningGateway, upstream: MockUpstream,
                                                      mocks: tuple[MockAnthropic, MockGemini], field: str,
                                                      value: Any, alias: str, stream: bool) -> None:
    before = _sent(upstream, mocks)
    body = {"model": alias, "messages": MESSAGES, "max_tokens": 1, "stream": stream, field: value}
    assert field in _bad_request(_post(gw, "/v1/chat/completions", body), field)
    assert _sent(upstream, mocks) == before  # nothing sent: no upstream billed, no breaker told
    assert _post(gw, "/v1/chat/completions", {"model": alias, "messages": MESSAGES}).status_code == 200


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"model": "gpt", "prompt": "hi"}),
    ("/v1/embeddings", {"model": "embed", "input": "hi"}),
    ("/v1/responses", {"model": "gpt", "input": "hi"}),
])
def test_no_endpoint_takes_them(gw: RunningGateway, path: str, body: dict[str, Any]) -> None:
    _bad_request(_post(gw, path, {**body, "_gateway_anthropic_only": ["max_tokens"]}), "_gateway_anthropic_only")


def test_the_messages_ingress_still_marks_its_own_bodies(gw: RunningGateway, mocks: tuple[MockAnthropic, MockGemini]
                                                        ) -> None:
    """`top_k` is Anthropic's alone: sent to the Anthropic target (by the mark), removed for the OpenAI one."""
    claude, _ = mocks
    body = {"model": "claude", "max_tokens": 16, "top_k": 5, "messages": MESSAGES}
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    answer = httpx.post(gw.url + "/v1/messages", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    sent = claude.requests[-1]
    assert sent.json["top_k"] == 5 and not any(key.startswith("_gateway_") for key in sent.json)  # type: ignore[union-attr]
    assert sent.headers.get("anthropic-beta") == "prompt-caching-2024-07-31"
    assert httpx.post(gw.url + "/v1/messages", json={**body, "model": "gpt"}, headers=headers,
                      timeout=30).status_code == 200


@pytest.mark.parametrize("alias", ["claude", "gemini"])
@pytest.mark.parametrize("json_schema", ["oops", ["a"], 5])
def test_a_json_schema_that_is_not_an_object_is_a_400(gw: RunningGateway, alias: str, json_schema: Any) -> None:
    body = {"model": alias, "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": json_schema}}
    _bad_request(_post(gw, "/v1/chat/completions", body), "response_format.json_schema")


@pytest.mark.parametrize("alias", ["claude", "gemini"])
@pytest.mark.parametrize("calls", [5, "call", {"id": "x"}])
def test_tool_calls_that_are_not_a_list_are_a_400(gw: RunningGateway, alias: str, calls: Any) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "user", "content": "go on"}]
    message = _bad_request(_post(gw, "/v1/chat/completions", {"model": alias, "messages": messages}),
                           "messages.1.tool_calls")
    assert "must be an array" in message


def test_a_background_response_is_refused(gw: RunningGateway, upstream: MockUpstream,
                                          mocks: tuple[MockAnthropic, MockGemini]) -> None:
    """`background: true` queues the answer upstream, to be read by `GET /v1/responses/{id}`, which the gateway does
    not serve: the client could never read it, and the request settled its budget at the prompt's estimate while
    the upstream went on generating. Refused before anything is sent."""
    before = _sent(upstream, mocks)
    refused = _post(gw, "/v1/responses", {"model": "gpt", "input": "hi", "background": True})
    assert "background" in _bad_request(refused, "background")
    assert refused.json()["error"]["code"] == "unsupported_parameter" and _sent(upstream, mocks) == before
    assert _post(gw, "/v1/responses", {"model": "gpt", "input": "hi", "background": False}).status_code == 200
