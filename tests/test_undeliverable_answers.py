"""An upstream answer the gateway cannot deliver is a failed attempt, not an answer; a stream of only `[DONE]` is none.

1. `/v1/messages`, not streamed: a 200 chat completion the Messages translation refuses (a tool call without a
   `name`) was a 502 to the client written after routing, the breaker, the cache and the telemetry had taken it for
   an answer: logged and counted as a 200, a breaker success, stored by the cache (every identical request got the
   502 from it), never a second target, no routing headers. It is translated within the attempt now: a
   `server_error` attempt, retried and fallen back from, never cached, logged 502; its usage counts as a refused
   answer's (docs/accounting.md), as Gemini's refused answers do.
2. An upstream stream that is only `data: [DONE]` (or whose only chunk has no choice and no usage) was a successful
   empty answer (chat: no content, no finish reason; Messages: `end_turn` with no content), with no fallback. It
   fails now as a stream that ends without sending anything does: the next target takes it.
3. A whole OpenAI-shaped answer whose `choices` is not an array reached an OpenAI client as a 200 (the SDK's
   `choices` a str). It is a malformed answer now: a 502 that routing falls back from.

One scripted OpenAI-compatible upstream (the request's model names the script); the real anthropic and openai SDKs.
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

USER = [{"role": "user", "content": "hi"}]
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
GOOD = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "fine"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
NAMELESS = {**GOOD, "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
    "role": "assistant", "content": None,
    "tool_calls": [{"id": "call_1", "type": "function", "function": {"arguments": "{}"}}]}}]}
BLANK = {**CHUNK, "choices": []}  # a chunk with no choice and no usage (Azure's first, its prompt filter results)


def _sse(*payloads: dict[str, Any] | str) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, str) else json.dumps(p)).encode() + b"\n\n" for p in payloads)


GOOD_STREAM = _sse(*({**CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                     for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": "fine"}, None),
                                           ({}, "stop"))), "[DONE]")
STREAMS = {"done-only": _sse("[DONE]"), "blank-then-done": _sse(BLANK, "[DONE]"),
           # A first chunk whose `choices` is no array, then a good answer: the first is malformed.
           **{f"odd-{name}": _sse({**CHUNK, "choices": odd}) + GOOD_STREAM
              for name, odd in (("object", {"index": 0}), ("string", "nope"), ("number", 5))}}
ANSWERS = {"nameless": NAMELESS, "choices-str": {"id": "x", "object": "chat.completion", "choices": "nope"}}


class Upstream(ThreadedApp):
    """Chat completions, answered by the request's model: a script of `ANSWERS` or `STREAMS`, else a good answer."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self.chat)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        self.calls.append(model)
        if not body.get("stream"):
            return web.json_response(ANSWERS.get(model, GOOD))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(STREAMS.get(model, GOOD_STREAM))
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def scripted() -> Iterator[Upstream]:
    with Upstream() as running:
        yield running


@pytest.fixture(scope="module")
def served(scripted: Upstream) -> Iterator[RunningGateway]:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1, access_log: true}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{retry: {{attempts: 0}}}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{scripted.port}/v1", api_key_env: UP_KEY}}
        prices:
          up/nameless: {{input_per_mtok: 1000000, output_per_mtok: 1000000}}
        models:
          nameless: {{provider: up, model: nameless}}
          nameless-then-good: {{targets: [{{provider: up, model: nameless}}, {{provider: up, model: good}}]}}
          nameless-cached: {{provider: up, model: nameless, cache: {{ttl_s: 600}}}}
          good-cached: {{provider: up, model: good, cache: {{ttl_s: 600}}}}
          choices-str: {{provider: up, model: choices-str}}
          choices-str-then-good: {{targets: [{{provider: up, model: choices-str}}, {{provider: up, model: good}}]}}
          done-only: {{provider: up, model: done-only}}
          done-only-then-good: {{targets: [{{provider: up, model: done-only}}, {{provider: up, model: good}}]}}
          blank-then-done: {{provider: up, model: blank-then-done}}
          odd-object: {{provider: up, model: odd-object}}
          odd-string: {{provider: up, model: odd-string}}
          odd-number: {{provider: up, model: odd-number}}
          odd-then-good: {{targets: [{{provider: up, model: odd-object}}, {{provider: up, model: good}}]}}
        """)
    running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _anthropic(served: RunningGateway, retries: int = 0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=served.url, api_key=FULL_KEY, max_retries=retries, timeout=20)


def _openai(served: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=20)


def _access(caplog: pytest.LogCaptureFixture, model: str, count: int) -> list[dict[str, Any]]:
    """The access log lines of `model`'s requests, once `count` of them were written (after each reply went)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [r.fields for r in caplog.records  # type: ignore[attr-defined]
                 if r.name == "gateway.access" and r.fields["model"] == model]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def _requests(served: RunningGateway, model: str, status: int) -> float:
    line = f'gateway_requests_total{{endpoint="messages",model="{model}",status="{status}"}}'
    return sum(float(found.rsplit(" ", 1)[1]) for found in served.metrics().splitlines() if found.startswith(line))


# -- 1. a complete answer the Messages translation refuses


def test_a_refused_messages_answer_is_a_failed_attempt(served: RunningGateway, caplog: pytest.LogCaptureFixture,
                                                       scripted: Upstream) -> None:
    counted = _requests(served, "nameless", 502)
    caplog.set_level(logging.INFO, logger="gateway.access")
    with pytest.raises(anthropic.InternalServerError) as caught:
        _anthropic(served).messages.create(model="nameless", max_tokens=20, messages=USER)
    assert caught.value.status_code == 502 and caught.value.type == "api_error"  # type: ignore[attr-defined]
    assert "a tool call's `name`" in caught.value.message
    headers = caught.value.response.headers
    assert headers["x-gateway-target"] == "up/nameless" and headers["x-gateway-attempts"] == "1"
    [line] = _access(caplog, "nameless", 1)
    assert (line["status"], line["error"]) == (502, "upstream_error")  # (was: 200, null)
    assert [attempt["outcome"] for attempt in line["attempts"]] == ["server_error"]  # (was: ok)
    assert _requests(served, "nameless", 502) == counted + 1
    # The answer was generated: its usage counts as a refused answer's, at its target's prices (5 + 1 tokens at $1)
    assert line["cost_usd"] == pytest.approx(6.0)
    # The chat dialect has nothing to refuse: an OpenAI client gets the call as the upstream sent it
    completion = _openai(served).chat.completions.create(model="nameless", messages=USER)  # type: ignore[arg-type]
    calls = completion.choices[0].message.tool_calls
    assert calls is not None and calls[0].id == "call_1"


def test_a_refused_messages_answer_falls_back(served: RunningGateway, scripted: Upstream) -> None:
    scripted.calls.clear()
    raw = _anthropic(served).messages.with_raw_response.create(model="nameless-then-good", max_tokens=20,
                                                                messages=USER)
    message = raw.parse()
    assert [block.text for block in message.content if block.type == "text"] == ["fine"]
    assert scripted.calls == ["nameless", "good"]  # (was: ["nameless"], and a 502)
    assert raw.headers["x-gateway-target"] == "up/good" and raw.headers["x-gateway-attempts"] == "2"


def test_a_refused_messages_answer_is_never_cached(served: RunningGateway, scripted: Upstream,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    scripted.calls.clear()
    caplog.set_level(logging.INFO, logger="gateway.access")
    for _ in range(3):
        with pytest.raises(anthropic.InternalServerError):
            _anthropic(served).messages.create(model="nameless-cached", max_tokens=20, messages=USER,
                                                extra_body={"temperature": 0})
    lines = _access(caplog, "nameless-cached", 3)
    assert [line["status"] for line in lines] == [502, 502, 502]
    assert [line["cache"] for line in lines] == ["miss", "miss", "miss"]  # (was: miss, hit, hit)
    assert scripted.calls == ["nameless"] * 3
    # An answer the translation takes is stored in OpenAI's form, and translated again when a hit serves it
    scripted.calls.clear()
    client = _anthropic(served)
    first, again = (client.messages.with_raw_response.create(model="good-cached", max_tokens=20, messages=USER,
                                                             extra_body={"temperature": 0}) for _ in range(2))
    assert (first.headers["x-gateway-cache"], again.headers["x-gateway-cache"]) == ("miss", "hit")
    for raw in (first, again):
        message = raw.parse()
        assert message.model == "good-cached" and message.stop_reason == "end_turn"
        assert [block.text for block in message.content if block.type == "text"] == ["fine"]
        assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 1)
        assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert scripted.calls == ["good"]


# -- 2. a stream that says nothing before its end


def test_a_done_only_stream_falls_back(served: RunningGateway, scripted: Upstream) -> None:
    scripted.calls.clear()
    chunks = _openai(served).chat.completions.create(model="done-only-then-good", messages=USER, stream=True)  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "fine" and scripted.calls == ["done-only", "good"]  # (was: "", and no second target)


def test_a_done_only_stream_is_no_empty_answer(served: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    for alias in ("done-only", "blank-then-done"):  # (the blank chunk may reach the client first: it says nothing)
        with pytest.raises(openai.APIError, match="ended the stream without sending anything"):
            for _ in _openai(served).chat.completions.create(model=alias, messages=USER, stream=True):  # type: ignore[arg-type]
                pass
    with pytest.raises(anthropic.APIStatusError, match="ended the stream without sending anything"):
        with _anthropic(served).messages.stream(model="done-only", max_tokens=20, messages=USER) as stream:
            stream.get_final_message()  # (was: `end_turn`, no content)
    lines = _access(caplog, "done-only", 2)
    assert [(line["status"], line["error"]) for line in lines] == [(502, "upstream_error")] * 2


# -- 3. an OpenAI-shaped answer whose `choices` is not an array


def test_an_answer_whose_choices_is_no_array_is_malformed(served: RunningGateway, scripted: Upstream) -> None:
    with pytest.raises(openai.InternalServerError, match="malformed answer") as caught:
        _openai(served).chat.completions.create(model="choices-str", messages=USER)  # type: ignore[arg-type]
    assert caught.value.status_code == 502  # (was: a 200, the SDK's `choices` the str "nope")
    scripted.calls.clear()
    completion = _openai(served).chat.completions.create(model="choices-str-then-good", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "fine" and scripted.calls == ["choices-str", "good"]


@pytest.mark.parametrize("alias", ["odd-object", "odd-string", "odd-number"])
def test_a_stream_whose_first_chunks_choices_is_no_array_is_malformed(served: RunningGateway, alias: str) -> None:
    """It reached a check that raised outside the stream's error handling: an `internal_error` event (a 500 with a
    fallback target), an ERROR with a traceback in the log."""
    with pytest.raises(openai.APIError, match="malformed stream event"):
        for _ in _openai(served).chat.completions.create(model=alias, messages=USER, stream=True):  # type: ignore[arg-type]
            pass


def test_a_stream_whose_first_chunks_choices_is_no_array_falls_back(served: RunningGateway,
                                                                     scripted: Upstream) -> None:
    scripted.calls.clear()
    chunks = _openai(served).chat.completions.create(model="odd-then-good", messages=USER, stream=True)  # type: ignore[arg-type]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "fine" and scripted.calls == ["odd-object", "good"]  # (was: a 500)
