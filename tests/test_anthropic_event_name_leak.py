"""An Anthropic stream's event that comes before `message_start` is named in the client's error only when it is one
of Anthropic's own event types: its `type` is upstream text, and a provider key sent back as one reached the client.

The error for an event out of order named the event by its `type` whenever that was a Python identifier under 40
characters, without the scrub every other upstream text goes through; an Anthropic key shaped like an identifier
(or any secret) sent as the first event's type was in the client's error, on a chat stream and on /v1/messages.
Now the error names only Anthropic's event types and says "an unknown event" for anything else.

End to end: a running gateway in front of the mock Anthropic API, which for a model `first-<what>` opens its stream
with the event `{"type": <what>}`: the key it was sent (`first-key`), or a known type out of order.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import _RECORD

KEY = "AnthropicCredential0123456789xyz"  # an identifier under 40 characters, neither key-shaped nor opaque
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
PATHS = {"chat": ("/chat/completions", {}), "messages": ("/messages", {"max_tokens": 10})}


class FirstEventAnthropic(MockAnthropic):
    """The mock Anthropic API; a model `first-key` opens its stream with an event whose `type` is the key it was
    sent, `first-<type>` with an event of that type (out of order: before `message_start`)."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_RECORD].json
        model = str(body.get("model")) if isinstance(body, dict) else ""
        if not model.startswith("first-"):
            return await super()._messages(request)
        kind = model.removeprefix("first-")
        if kind == "key":
            kind = request.headers.get("x-api-key", "")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(f"event: {kind}\ndata: {json.dumps({'type': kind, 'index': 0})}\n\n".encode())
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with FirstEventAnthropic(KEY) as claude:
        text = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              claude: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: CLAUDE_KEY}}
            models:
              key-first: {{provider: claude, model: first-key}}
              delta-first: {{provider: claude, model: first-content_block_delta}}
            """)
        running = RunningGateway(text, {"CLAUDE_KEY": KEY}).start()
        try:
            yield running
        finally:
            running.stop()


def stream_error(gateway: RunningGateway, path: str, model: str) -> str:
    """The message of the error event that ends the client's stream (chat's `error` or Anthropic's `error` event)."""
    url, extra = PATHS[path]
    body: dict[str, Any] = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = httpx.post(gateway.base_url + url, headers=AUTH, json=body, timeout=30)
    assert response.status_code == 200, response.text
    errors = [json.loads(line.removeprefix("data: "))["error"]["message"] for line in response.text.splitlines()
              if line.startswith("data: {") and '"error"' in line]
    assert len(errors) == 1, response.text
    assert KEY not in response.text, response.text
    return str(errors[0])


@pytest.mark.parametrize("path", PATHS)
def test_an_unknown_event_before_message_start_is_not_named(gateway: RunningGateway, path: str) -> None:
    message = stream_error(gateway, path, "key-first")
    assert "an unknown event" in message and "before message_start" in message, message


@pytest.mark.parametrize("path", PATHS)
def test_a_known_event_before_message_start_is_still_named(gateway: RunningGateway, path: str) -> None:
    message = stream_error(gateway, path, "delta-first")
    assert "`content_block_delta` before message_start" in message, message
