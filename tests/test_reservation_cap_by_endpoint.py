"""The completion cap a request reserves is read from the field the API it came in by honours, never from the
fields its body has (`accounting.outright.requested_cap`).

A legacy completion honours `max_tokens` alone: a chat-only `max_completion_tokens: 1` beside `max_tokens: 50000`
was reserved as 1 token, admitted past a hard budget, and (its cap taken as set by the client) never cut. A
Responses request with a prompt template (`"prompt": {"id": ...}`) was read as a completion, its
`max_output_tokens` unread. Each such request here needs more than the whole hard budget: refused outright.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

HEADERS = {"Authorization": f"Bearer {FULL_KEY}"}
BIG = 50_000  # tokens: $0.10 at the alias's $2 per million output tokens, past the $0.05 budget


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          mock-model: {{input_per_mtok: 1, output_per_mtok: 2}}
        models:
          chat: {{provider: mock, model: mock-model}}
        tenants:
          acme:
            budget: {{usd: 0.05, period: day, mode: hard}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _post(gw: RunningGateway, path: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.stream("POST", gw.base_url + path, json={"model": "chat", **body}, headers=HEADERS,
                      timeout=30) as response:
        response.read()
    return response


@pytest.mark.parametrize(("path", "body"), [
    ("/completions", {"prompt": "hi", "max_tokens": BIG, "max_completion_tokens": 1}),
    ("/completions", {"prompt": "hi", "max_tokens": BIG, "max_completion_tokens": 1, "stream": True}),
    # a chat's fields in a completion's body name no API: the endpoint decides
    ("/completions", {"prompt": "hi", "max_tokens": BIG, "max_completion_tokens": 1, "messages": []}),
    ("/responses", {"input": "hi", "max_output_tokens": BIG, "prompt": {"id": "pmpt_abc", "variables": {}}}),
    ("/responses", {"input": "hi", "max_output_tokens": BIG, "prompt": {"id": "pmpt_abc"}, "stream": True}),
])
def test_a_cap_in_the_field_its_api_honours_is_reserved_whatever_else_the_body_holds(
    gw: RunningGateway, upstream: MockUpstream, path: str, body: dict[str, Any],
) -> None:
    response = _post(gw, path, body)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "budget_exceeded"
    assert not upstream.requests  # refused before any call: the whole budget could not hold it


def test_each_api_reserves_its_own_cap_field(gw: RunningGateway, upstream: MockUpstream) -> None:
    """The chat API honours `max_completion_tokens` (a null one is absent, `max_tokens` then counts); a completion
    honours `max_tokens` alone; the Responses API `max_output_tokens`; a Messages request arrives as chat, its
    `max_tokens` reserved."""
    messages = [{"role": "user", "content": "hi"}]
    assert _post(gw, "/chat/completions", {"messages": messages, "max_tokens": BIG,
                                           "max_completion_tokens": 1}).status_code == 200
    assert _post(gw, "/chat/completions", {"messages": messages, "max_tokens": BIG,
                                           "max_completion_tokens": None}).status_code == 429
    assert _post(gw, "/completions", {"prompt": "hi", "max_completion_tokens": BIG, "max_tokens": 5}).status_code == 200
    assert _post(gw, "/responses", {"input": "hi", "max_output_tokens": BIG, "max_tokens": 5}).status_code == 429
    with httpx.Client(timeout=30) as client:
        anthropic = client.post(gw.url + "/v1/messages", headers={"x-api-key": FULL_KEY},
                                json={"model": "chat", "max_tokens": BIG, "messages": messages})
    assert anthropic.status_code == 429, anthropic.text
    assert _post(gw, "/completions", {"prompt": "hi", "max_tokens": BIG, "max_completion_tokens": 1,
                                      "messages": []}).status_code == 429  # (fails before the fix)
