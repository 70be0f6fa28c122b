"""JSON nested past the interpreter's recursion limit inside a string (a tool call's `arguments`, a tool result, an
answer's text) is read as text that is no JSON, never a crash.

msgspec raises `RecursionError`, not `DecodeError`, for JSON nested about a thousand levels deep; the request body's
own depth is checked at ingress (`pipeline.stages.check_depth`), but the strings inside it, and an answer's text,
are decoded later. The translators to Gemini and Anthropic, the guards reading a tool call's arguments and the quality
signals reading a JSON answer caught `DecodeError` alone: a client's request (or a model echoing one) got a 500
`internal_error`, which the openai SDK sends twice more (H55).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, REPO, RunningGateway, policy_text
from tests.support.mock_upstream import MockUpstream
from tests.support.threaded_app import ThreadedApp

KEY = "gw-deep-json-key-000000000000000000000000000"
DEEP_ARRAY = "[" * 5000 + "]" * 5000  # valid JSON, nested past the recursion limit
DEEP_OBJECT = '{"a":' * 5000 + "1" + "}" * 5000
GEMINI_ANSWER = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}],
                 "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4}}
ANTHROPIC_ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": "ok"}], "usage": {"input_tokens": 3, "output_tokens": 1}}


class Upstream(ThreadedApp):
    """A Gemini and an Anthropic upstream that answer "ok" to anything."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self._gemini)
        app.router.add_post("/v1/messages", self._anthropic)

    async def _gemini(self, request: web.Request) -> web.Response:
        if "streamGenerateContent" in request.match_info["call"]:
            return web.Response(body=b"data: " + json.dumps(GEMINI_ANSWER).encode() + b"\r\n\r\n",
                                content_type="text/event-stream")
        return web.json_response(GEMINI_ANSWER)

    async def _anthropic(self, request: web.Request) -> web.Response:
        return web.json_response(ANTHROPIC_ANSWER)


@pytest.fixture(scope="module")
def translated() -> Iterator[RunningGateway]:
    with Upstream() as upstream:
        base = f"http://127.0.0.1:{upstream.port}"
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}"}}
            providers:
              gemini: {{kind: gemini, base_url: {base}/v1beta, api_key_env: GEMINI_KEY}}
              anthropic: {{kind: anthropic, base_url: {base}/v1, api_key_env: ANTHROPIC_KEY}}
            models:
              gem: {{provider: gemini, model: gemini-2.5-flash}}
              claude: {{provider: anthropic, model: claude-sonnet-4-5}}
            """)
        running = RunningGateway(text, {"GEMINI_KEY": "gemini-deep-json-key", "ANTHROPIC_KEY": "anthropic-deep-json"})
        running.start()
        try:
            yield running
        finally:
            running.stop()


def _messages(arguments: str, result: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": result}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("alias", "messages", "status"), [
    ("gem", _messages(DEEP_ARRAY, "r"), 400), ("gem", _messages("{}", DEEP_OBJECT), 200),
    ("claude", _messages(DEEP_ARRAY, "r"), 400)], ids=["gemini-arguments", "gemini-result", "anthropic-arguments"])
def test_deeply_nested_tool_json_to_a_translated_provider(translated: RunningGateway, alias: str,
                                                          messages: list[dict[str, object]], status: int,
                                                          stream: bool) -> None:
    """Arguments that cannot be decoded are the client's error, as invalid JSON is; a tool result that cannot be
    decoded goes as text (`{"result": text}`), as any that is no JSON object."""
    response = httpx.post(translated.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": alias, "messages": messages, "stream": stream}, timeout=30)
    assert response.status_code == status, response.text[:300]
    if status == 400:
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "arguments" in response.json()["error"]["message"]


def test_the_openai_sdk_gets_a_400_it_does_not_retry(translated: RunningGateway) -> None:
    client = openai.OpenAI(base_url=translated.base_url, api_key=KEY)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="claude", messages=_messages(DEEP_ARRAY, "r"))  # type: ignore[arg-type]


GUARDED = ("guards:\n  global:\n    pii: {kind: pii, engine: patterns}\n"
           "telemetry: {quality: {enabled: true}}\n")


def test_guards_and_quality_signals_read_a_deep_json_text_as_text(make_gateway: Callable[..., RunningGateway],
                                                                 upstream: MockUpstream) -> None:
    """An input guard reads a tool call's deep arguments (and the echoed answer) as text; the quality signals count a
    JSON answer that cannot be decoded as invalid JSON."""
    running = make_gateway(policy_text(upstream.base_url) + GUARDED)
    for body in ({"model": "chat", "messages": _messages(DEEP_ARRAY, "r")},
                 {"model": "fault-echo", "messages": [{"role": "user", "content": DEEP_ARRAY}],
                  "response_format": {"type": "json_object"}},
                 {"model": "fault-echo", "stream": True, "messages": [{"role": "user", "content": DEEP_ARRAY}],
                  "response_format": {"type": "json_object"}}):
        response = httpx.post(running.base_url + "/chat/completions", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {FULL_KEY}"})
        assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize("command", ["explain", "route"])
def test_gateway_explain_and_route_refuse_a_very_deep_request_as_the_gateway_does(tmp_path: Path,
                                                                                 command: str) -> None:
    """`gateway explain` and `gateway route` answered it with a RecursionError traceback (exit 1, H56)."""
    request = tmp_path / "deep.json"
    request.write_text("[" * 100_000 + "]" * 100_000)
    done = subprocess.run([sys.executable, "-m", "gateway", command, "--policy", "policies/gateway.yaml",
                           str(request)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    assert "400" in done.stdout, done.stdout
