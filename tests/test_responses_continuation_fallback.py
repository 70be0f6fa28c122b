"""A Responses continuation never falls back to another provider's upstream (`routing.exchange`).

The upstream that made a response keeps it: a `previous_response_id` sent to another provider (another account)
gets a permanent 400 `previous_response_not_found`, which the SDKs do not retry, in place of the first upstream's
5xx, which they do. So after a failed attempt a continuation goes only to targets of the provider tried first
(a retry, another of its models); the others are passed over, never sent, and the client gets the first one's error.
A request that continues nothing falls back as any other.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import openai
import pytest

from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream


@pytest.fixture
def other() -> Iterator[MockUpstream]:
    with MockUpstream(api_key=UPSTREAM_KEY) as mock:
        yield mock


def _policy(upstream: MockUpstream, other: MockUpstream) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          first: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
          second: {{kind: openai, base_url: "{other.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        routing: {{retry: {{attempts: 0}}, breaker: {{enabled: false}}}}
        models:
          chat: {{provider: first, model: mock-model}}
          across: {{targets: [{{provider: first, model: fault-status-500}}, {{provider: second, model: mock-model}}]}}
          within: {{targets: [{{provider: first, model: fault-status-500}}, {{provider: second, model: mock-model}},
                             {{provider: first, model: mock-model}}]}}
        """)


def _client(gateway: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=20)


def _forwarded(upstream: MockUpstream) -> list[dict]:
    return [r.json for r in upstream.requests if r.path.endswith("/responses")]


@pytest.mark.parametrize("stream", [False, True])
def test_a_continuation_gets_its_upstreams_error_rather_than_another_upstreams_400(
        make_gateway, upstream: MockUpstream, other: MockUpstream, stream: bool) -> None:
    client = _client(make_gateway(_policy(upstream, other)))
    made = client.responses.create(model="chat", input="hello")
    with pytest.raises(openai.APIStatusError) as failed:
        answer = client.responses.create(model="across", input="go on", previous_response_id=made.id, stream=stream)
        if stream:
            list(answer)  # type: ignore[arg-type]
    assert failed.value.status_code >= 500, failed.value.response.text  # the first upstream's: worth a retry
    assert failed.value.response.headers.get("x-should-retry") != "false"
    assert failed.value.response.headers["x-gateway-attempts"] == "1"  # the other target was never sent it
    assert _forwarded(other) == []
    # a request continuing nothing falls back as ever
    client.responses.create(model="across", input="hello", stream=stream)
    assert len(_forwarded(other)) == 1
    # a later target of the first provider does take the continuation, past the other provider's
    client.responses.create(model="within", input="go on", previous_response_id=made.id)
    assert _forwarded(upstream)[-1]["previous_response_id"] == made.id
    assert len(_forwarded(other)) == 1
