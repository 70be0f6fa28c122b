"""A limits guard's `max_messages` counts messages ("most messages in one request") on every endpoint, not texts.

On `/v1/chat/completions` it counted `messages` (the system message one of them). Every other endpoint counted the
texts the guards read: on `/v1/responses` one message of three `input_text` parts was three, `instructions` one more,
a tool call's arguments and its output one each; on `/v1/completions` the `suffix` was a message. With
`max_messages: 2`, one Responses message of three parts was refused (400, MAX_MESSAGES) where the same chat request
passed. Now a Responses request counts its `input` items (an input string: one) and its `instructions` as one, as
chat counts its system message; a completion its prompts; `/v1/messages` arrives as chat, its `system` one message.

A real gateway with a `limits` guard (`max_messages: 2`) in front of a scripted OpenAI upstream; httpx as the client.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}


def _parts(*texts: str, kind: str = "input_text") -> list[dict[str, str]]:
    return [{"type": kind, "text": text} for text in texts]


def _said(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


class _Upstream(ThreadedApp):
    """Answers chat, completions and Responses requests with "ok"."""

    def routes(self, app: web.Application) -> None:
        async def chat(request: web.Request) -> web.Response:
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
                                      "usage": USAGE, "choices": [{"index": 0, "finish_reason": "stop",
                                                                   "message": _said("assistant", "ok")}]})

        async def completions(request: web.Request) -> web.Response:
            return web.json_response({"id": "t1", "object": "text_completion", "created": 1, "model": "m",
                                      "usage": USAGE, "choices": [{"index": 0, "text": "ok", "logprobs": None,
                                                                   "finish_reason": "stop"}]})

        async def responses(request: web.Request) -> web.Response:
            message = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": "ok", "annotations": []}]}
            return web.json_response({"id": "resp_1", "object": "response", "created_at": 1, "model": "m",
                                      "status": "completed", "output": [message],
                                      "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}})

        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/v1/completions", completions)
        app.router.add_post("/v1/responses", responses)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        policy = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1}}
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              up: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY}}
            models:
              m: {{provider: up, model: m}}
            guards:
              models:
                m:
                  limits: {{kind: limits, max_messages: 2}}
            """)
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


ONE_OF_THREE_PARTS = [_said("user", _parts("a", "b", "c"))]
# (endpoint, request, whether it holds more than 2 messages)
CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    "responses-one-message-three-parts": ("responses", {"input": ONE_OF_THREE_PARTS}, False),
    "responses-instructions-one-message-three-parts": (
        "responses", {"instructions": "be brief", "input": ONE_OF_THREE_PARTS}, False),
    "responses-string-and-instructions": ("responses", {"instructions": "be brief", "input": "hello"}, False),
    "responses-a-call-and-its-output": ("responses", {"input": [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "done"}]}, False),
    "responses-three-items": ("responses", {"input": [_said("user", "a"), _said("assistant", "b"),
                                                      _said("user", "c")]}, True),
    "responses-instructions-and-two-items": (
        "responses", {"instructions": "be brief", "input": [_said("user", "a"), _said("user", "b")]}, True),
    "chat-system-one-message-three-parts": (
        "chat/completions", {"messages": [_said("system", "be brief"), _said("user", _parts(
            "a", "b", "c", kind="text"))]}, False),
    "chat-system-and-two-messages": (
        "chat/completions", {"messages": [_said("system", "be brief"), _said("user", "a"), _said("user", "b")]},
        True),
    "completions-two-prompts-and-a-suffix": ("completions", {"prompt": ["a", "b"], "suffix": "end"}, False),
    "completions-three-prompts": ("completions", {"prompt": ["a", "b", "c"]}, True),
    "messages-system-one-message-three-parts": (
        "messages", {"max_tokens": 5, "system": "be brief", "messages": [_said("user", _parts(
            "a", "b", "c", kind="text"))]}, False),
    "messages-system-and-two-messages": (
        "messages", {"max_tokens": 5, "system": "be brief", "messages": [
            _said("user", "a"), _said("assistant", "b"), _said("user", "c")]}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_max_messages_counts_messages(gw: RunningGateway, case: str) -> None:
    endpoint, request, over = CASES[case]
    response = httpx.post(f"{gw.base_url}/{endpoint}", headers=AUTH, json={"model": "m", **request}, timeout=30)
    if over:
        assert response.status_code == 400, response.text
        assert "MAX_MESSAGES" in response.text
    else:
        assert response.status_code == 200, response.text
