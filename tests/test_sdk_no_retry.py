"""An error the gateway judged not worth retrying (an upstream's 404, the gateway's own key refused) says
`x-should-retry: false`, so the official SDKs (their default `max_retries=2`) send the request once, not three
times; an error a retry may help (a 500) goes without it and is still retried by the SDK. On the chat, Responses
and Messages APIs alike."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

MESSAGES = [{"role": "user", "content": "hi"}]


class Counted:
    """An httpx client for an SDK that counts the requests the SDK sends and keeps the last answer's headers."""

    def __init__(self) -> None:
        self.sent = 0
        self.headers: httpx.Headers | None = None
        self.client = httpx.Client(event_hooks={"request": [self._request], "response": [self._response]})

    def _request(self, request: httpx.Request) -> None:
        self.sent += 1

    def _response(self, response: httpx.Response) -> None:
        self.headers = response.headers


@pytest.fixture
def counted() -> Iterator[Counted]:
    made = Counted()
    yield made
    made.client.close()


def _openai(gateway: RunningGateway, counted: Counted) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, http_client=counted.client)  # max_retries=2


def _upstream_calls(upstream: MockUpstream, alias: str) -> int:
    return len([r for r in upstream.requests if r.model == alias])


@pytest.mark.parametrize("alias", ["fault-status-404", "fault-status-401"])
def test_chat_error_the_gateway_would_not_retry_is_sent_once(gateway: RunningGateway, upstream: MockUpstream,
                                                             counted: Counted, alias: str) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(gateway, counted).chat.completions.create(model=alias, messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert counted.sent == 1 and _upstream_calls(upstream, alias) == 1


def test_responses_error_the_gateway_would_not_retry_is_sent_once(gateway: RunningGateway, upstream: MockUpstream,
                                                                  counted: Counted) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(gateway, counted).responses.create(model="fault-status-404", input="hi")
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert counted.sent == 1 and _upstream_calls(upstream, "fault-status-404") == 1


def test_messages_error_the_gateway_would_not_retry_is_sent_once(gateway: RunningGateway,
                                                                 upstream: MockUpstream) -> None:
    api = anthropic.Anthropic(base_url=gateway.url, api_key=FULL_KEY)  # max_retries=2 (its own HTTP client: httpx2)
    with pytest.raises(anthropic.APIStatusError) as caught:
        api.messages.create(model="fault-status-401", max_tokens=20, messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert _upstream_calls(upstream, "fault-status-401") == 1  # the gateway does not retry a refused key itself


@pytest.mark.parametrize("stream", [False, True])
def test_a_server_error_is_still_retried_by_the_sdk(gateway: RunningGateway, counted: Counted, stream: bool) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        _openai(gateway, counted).chat.completions.create(model="fault-status-500", messages=MESSAGES,  # type: ignore[arg-type]
                                                          stream=stream)
    assert "x-should-retry" not in caught.value.response.headers
    assert counted.sent == 3


def test_a_streamed_client_error_is_sent_once(gateway: RunningGateway, upstream: MockUpstream,
                                              counted: Counted) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        _openai(gateway, counted).chat.completions.create(model="fault-status-404", messages=MESSAGES,  # type: ignore[arg-type]
                                                          stream=True)
    assert caught.value.response.headers.get("x-should-retry") == "false"
    assert counted.sent == 1 and _upstream_calls(upstream, "fault-status-404") == 1
