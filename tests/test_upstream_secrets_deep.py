"""A failed Responses answer loses the provider's credential from every string of its body, at any depth.

docs/security.md: a Responses answer with `"status": "failed"` (and a `response.failed` event) is forwarded with
its `error` scrubbed and "every other string of the body or event" rid of the configured secrets. The walk that did
so stopped eight levels down, so a credential an upstream echoed deeper (request metadata, an echoed tool schema)
reached the client as it was. The mock upstream here echoes the key it was sent that way, streamed and not.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.providers.scrub import scrubbed_error
from gateway.sanitize import remove_secrets, sanitize_upstream_message
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream, responses_answer, sse

KEY = "plain-upstream-credential-b10"  # not key-shaped: only its removal by value can take it out
DEPTH = 40  # well past the old limit of 8


def nested(leaf: Any, depth: int) -> Any:
    """`leaf` under `depth` levels of objects and arrays, alternating."""
    for level in range(depth):
        leaf = {"detail": leaf} if level % 2 else [leaf]
    return leaf


def failed(body: dict[str, Any], key: str) -> dict[str, Any]:
    """A failed Responses answer whose metadata echoes the request's credential deep down, as a value and as a key."""
    answer = responses_answer({**body, "stream": False}, ["unused"], 1)
    assert isinstance(answer, dict)
    echo = nested({"sent": f"Authorization: Bearer {key}", f"Bearer {key}": "header"}, DEPTH)
    return {**answer, "status": "failed", "output": [], "metadata": {"echo": echo},
            "error": {"code": "server_error", "message": "The model failed."}}


class DeepEchoUpstream(MockUpstream):
    """The mock OpenAI upstream; model `deep-echo` answers a failed Responses answer (streamed: `response.failed`)
    whose metadata holds the credential it was sent, `DEPTH` levels down."""

    def _route(self, build: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handle = super()._route(build)

        async def route(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            if not isinstance(body, dict) or body.get("model") != "deep-echo":
                return await handle(request)
            answer = failed(body, request.headers.get("Authorization", "").removeprefix("Bearer "))
            if not body.get("stream"):
                return web.json_response(answer)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(sse({"type": "response.failed", "sequence_number": 0, "response": answer}))
            await response.write_eof()
            return response

        return route


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    with DeepEchoUpstream(api_key=KEY) as upstream:
        running = RunningGateway(f"""\
version: 1
auth: keys
keys:
  - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
providers:
  up: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: B10_UPSTREAM_KEY}}
models:
  deep-echo: {{provider: up, model: deep-echo}}
""", {"B10_UPSTREAM_KEY": KEY}).start()
        try:
            with openai.OpenAI(base_url=running.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
                yield sdk
        finally:
            running.stop()


def deepest(echo: Any) -> Any:
    for level in reversed(range(DEPTH)):
        echo = echo["detail"] if level % 2 else echo[0]
    return echo


def test_a_failed_answer_loses_the_credential_at_any_depth(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="deep-echo", input="hi")
    assert KEY not in raw.text, raw.text
    answer = raw.parse()
    assert answer.status == "failed" and answer.error is not None and answer.error.message == "The model failed."
    leaf = deepest(json.loads(raw.text)["metadata"]["echo"])
    assert leaf == {"sent": "Authorization: Bearer [redacted]", "Bearer [redacted]": "header"}  # the rest of it kept


def test_a_response_failed_event_loses_the_credential_at_any_depth(client: openai.OpenAI) -> None:
    with client.responses.with_streaming_response.create(model="deep-echo", input="hi", stream=True) as response:
        text = response.read().decode()
    assert KEY not in text, text
    (event,) = [json.loads(line.removeprefix("data: ")) for line in text.splitlines() if line.startswith("data: ")]
    assert event["type"] == "response.failed" and event["response"]["error"]["message"] == "The model failed."
    assert deepest(event["response"]["metadata"]["echo"])["sent"] == "Authorization: Bearer [redacted]"


def test_the_walk_needs_no_recursion_however_deep_the_body() -> None:
    """Nested near the decoder's own limit (msgspec's, Python's recursion limit): every level is walked."""
    sanitize, unsecret = partial(sanitize_upstream_message, secrets=[KEY]), partial(remove_secrets, secrets=[KEY])
    body = json.dumps({"error": {"message": "no"}, "metadata": nested(f"key {KEY}", 600)}).encode()
    out = scrubbed_error(body, sanitize, unsecret)
    assert KEY.encode() not in out and b"key [redacted]" in out
    clean = json.dumps({"error": {"message": "no"}, "metadata": nested("nothing here", 600)}).encode()
    assert scrubbed_error(clean, sanitize, unsecret) is clean  # nothing changed: the bytes as they came
