"""A /v1/messages answer the Messages translation refuses is never served from the cache (H49).

The upstream (OpenAI-compatible) answers with a tool call without a name. For `/v1/messages` the gateway refuses
it (`translate.anthropic_answer`: "a tool call's `name` is not a non-empty string"). Two ways that refusal was
pinned in the cache for the entry's TTL, with no upstream call, no retry and no fallback:

1. a streamed `/v1/messages` miss ended with the `error` event, yet its upstream chunks were stored (outcome
   `stored`): every identical request replayed the error (`api.anthropic._Framer` now marks the request failed);
2. a `/v1/chat/completions` client stores the answer (valid for it); a `/v1/messages` request whose translated
   body is the same key hit it and got a 502 (complete) or the error event (streamed), every time (such a hit is
   now a miss: `cache.stage._translate`, `_check_stream`).

Once the upstream names its call again, the Messages client gets its answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import textwrap
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGES = {"x-api-key": FULL_KEY, "anthropic-version": "2023-06-01"}
CALL = {"id": "call_1", "type": "function", "function": {"arguments": "{\"a\": 1}"}}  # no `name`
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return b"data: " + json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1,
                                   "model": "m", "choices": choices, **extra}).encode() + b"\n\n"


class Upstream:
    """An OpenAI-compatible server whose every answer is one tool call, without a name until `named`; counts its
    calls."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.calls = 0
        self.named = False
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls += 1
        call = {**CALL, "function": {**CALL["function"], "name": "echo"}} if self.named else CALL
        if not body.get("stream"):
            return web.json_response({"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "m",
                                      "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                                          "role": "assistant", "content": None, "tool_calls": [call]}}],
                                      "usage": USAGE})
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        await reply.write(_chunk([{"index": 0, "delta": {"role": "assistant", "content": None,
                                                         "tool_calls": [{"index": 0, **call}]},
                                   "finish_reason": None}]))
        await reply.write(_chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
        await reply.write(_chunk([], usage=USAGE))
        await reply.write(b"data: [DONE]\n\n")
        await reply.write_eof()
        return reply

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Upstream:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def served() -> Iterator[tuple[RunningGateway, Upstream]]:
    with Upstream() as upstream:
        gw = RunningGateway(textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              up: {{kind: openai, base_url: {upstream.base_url}, api_key_env: UP_KEY}}
            models:
              chat: {{provider: up, model: m, cache: {{}}}}
            routing:
              breaker: {{enabled: false}}
            """), {"UP_KEY": "sk-up-h49-000000"}).start()
        try:
            yield gw, upstream
        finally:
            gw.stop()


def messages_body(question: str, stream: bool) -> dict[str, Any]:
    return {"model": "chat", "max_tokens": 100, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": question}],
            "tools": [{"name": "echo", "input_schema": {"type": "object"}}]}


def test_a_streamed_messages_answer_that_ended_in_an_error_is_not_stored(
        served: tuple[RunningGateway, Upstream]) -> None:
    gw, upstream = served
    body = messages_body("use the tool " + uuid.uuid4().hex, stream=True)
    first = httpx.post(f"{gw.url}/v1/messages", json=body, headers=MESSAGES, timeout=20)
    assert "event: error" in first.text  # the translation refused the answer: the stream failed
    metrics = gw.metrics()
    assert 'gateway_cache_stores_total{model="chat",outcome="stored"}' not in metrics
    assert 'gateway_cache_stores_total{model="chat",outcome="uncacheable"} 1.0' in metrics
    # recorded as the error its client got, not as a 200
    assert 'gateway_requests_total{endpoint="messages",model="chat",status="502"} 1.0' in metrics
    upstream.named = True
    second = httpx.post(f"{gw.url}/v1/messages", json=body, headers=MESSAGES, timeout=20)
    # was: x-gateway-cache "hit", the same error event, and no upstream call
    assert second.headers.get("x-gateway-cache") == "miss" and upstream.calls == 2
    assert "event: error" not in second.text and '"name":"echo"' in second.text
    third = httpx.post(f"{gw.url}/v1/messages", json=body, headers=MESSAGES, timeout=20)
    assert third.headers.get("x-gateway-cache") == "hit" and third.text.count('"name":"echo"') == 1
    assert upstream.calls == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_entry_the_messages_translation_refuses_is_a_miss_for_messages(
        served: tuple[RunningGateway, Upstream], stream: bool) -> None:
    gw, upstream = served
    question = "use the tool " + uuid.uuid4().hex
    chat = {"model": "chat", "max_tokens": 100, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": question}],
            "tools": [{"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}]}
    assert httpx.post(f"{gw.base_url}/chat/completions", json=chat, headers=AUTH, timeout=20).status_code == 200
    assert upstream.calls == 1
    again = httpx.post(f"{gw.base_url}/chat/completions", json=chat, headers=AUTH, timeout=20)
    assert again.headers["x-gateway-cache"] == "hit"  # valid for a chat client: served to it
    upstream.named = True
    reply = httpx.post(f"{gw.url}/v1/messages", json=messages_body(question, stream), headers=MESSAGES, timeout=20)
    # was: 502 (complete) or a 200 whose stream is the error event (streamed), from the cache, no upstream call,
    # and so for every identical /v1/messages request until the entry expired (never retried, never fallen back)
    assert reply.status_code == 200 and reply.headers["x-gateway-cache"] == "miss"
    assert upstream.calls == 2
    if stream:
        assert "event: error" not in reply.text and '"name":"echo"' in reply.text
    else:
        assert [block["name"] for block in reply.json()["content"]] == ["echo"]
    # the Messages answer replaced the entry: a hit for both APIs from now on
    assert httpx.post(f"{gw.url}/v1/messages", json=messages_body(question, stream), headers=MESSAGES,
                      timeout=20).headers["x-gateway-cache"] == "hit"
    assert httpx.post(f"{gw.base_url}/chat/completions", json=chat, headers=AUTH,
                      timeout=20).headers["x-gateway-cache"] == "hit"
    assert upstream.calls == 2
