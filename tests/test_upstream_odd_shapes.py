"""Upstream answers of odd shapes that the gateway took for its own failure, or read past their end.

1. A Responses stream read on after `response.completed`: an upstream that then dropped the connection, or held it
   open past the idle timeout, had the client read `response.completed` and then an `error` event (the openai SDK
   raised `APIError` on an answer it had whole; the client retried and paid twice). The stream ends at the terminal
   event now, as a Messages stream ends at `message_stop`.
2. An answer nested ~1,500 levels deep (3 KB): msgspec raises `RecursionError`, not `DecodeError`; a complete
   answer was a 500 `internal_error` (every provider kind), a stream event the gateway's failure. Now a malformed
   answer: a 502 `upstream_error` that routing falls back from, or the stream's `upstream_error` event.
3. With the quality signals on, `"choices": 7` (or `true`, `1.5`), or a message's `"tool_calls": true`, was a 500
   (a 200 with them off): the readers iterated what is no list, and a reader's failure failed the request. Now
   read as none; and a failure of the readers is logged, once per kind, never the request's. (A complete answer
   whose `choices` is no array is a malformed answer now, a 502 with the signals on or off; a stream's chunk is
   read as none.)
4. With an output guard, a chunk's `"choices": [null]`, a choice's `"index": [0]`, a tool call's `"index": [0]`, a
   Responses item added with `"content": null` or a part whose `type` is a list ended the stream with
   `internal_error`. Now read as absent (or as 0); and what a guard still cannot read of an upstream event ends
   the stream with `upstream_error` (logged with its traceback), as the providers' translators do.
5. With an output guard, an item that `response.completed` lists but no `response.output_item.added` announced got
   a `response.function_call_arguments.delta` at a new output index: the openai SDK's `responses.stream()` raised
   `RuntimeError`. Such an item gets no delta: its checked text is in `response.completed` alone.

One scripted upstream speaks OpenAI's (chat and Responses), Anthropic's and Gemini's wire formats (the request's
model names the script); three gateways read it: plain, with the quality signals, with an output guard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.guards.stream import ChatChunks
from gateway.telemetry.quality import QualitySignals
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
USER = [{"role": "user", "content": "hi"}]
DEEP = b"[" * 1500 + b"]" * 1500  # past Python's recursion limit (1,000), in 3 KB

CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 5, "output_tokens": 1}}
GEMINI = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}, "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6}}


def _deep(answer: dict[str, Any]) -> bytes:
    """`answer` with one more field nested `DEEP`."""
    return json.dumps(answer).encode()[:-1] + b', "extra": ' + DEEP + b"}"


def _data(payload: dict[str, Any] | bytes) -> bytes:
    return b"data: %s\n\n" % (payload if isinstance(payload, bytes) else json.dumps(payload).encode())


def _chat_stream(odd: dict[str, Any] | bytes, text: str = "Hello") -> list[bytes]:
    """A chat stream with `odd` between its text and its finish."""
    chunks: list[dict[str, Any] | bytes] = [
        {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}]},
        odd, {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return [*map(_data, chunks), b"data: [DONE]\n\n"]


def _events(events: list[dict[str, Any]]) -> list[bytes]:
    """Responses events as OpenAI writes them (`event:` line, `sequence_number`)."""
    return [b"event: %s\ndata: %s\n\n" % (str(event["type"]).encode(),
                                           json.dumps({**event, "sequence_number": number}).encode())
            for number, event in enumerate(events)]


TEXT = {"type": "output_text", "text": "Hello", "annotations": []}
ITEM = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed", "content": [TEXT]}
CALL = {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c1", "name": "f",
        "arguments": "{\"a\": 1}"}
RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": []}
DONE_RESPONSE = {**RESPONSE, "status": "completed", "output": [ITEM],
                 "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}}


def _responses(*, added: dict[str, Any] | None = None, odd: tuple[dict[str, Any], ...] = (),
               final: dict[str, Any] = DONE_RESPONSE) -> list[dict[str, Any]]:
    """A Responses stream of one message item ("Hello"), `odd` events before its end."""
    return [
        {"type": "response.created", "response": RESPONSE},
        {"type": "response.output_item.added", "output_index": 0,
         "item": added or {**ITEM, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", "output_index": 0, "item_id": "msg_1", "content_index": 0,
         "part": {**TEXT, "text": ""}},
        {"type": "response.output_text.delta", "output_index": 0, "item_id": "msg_1", "content_index": 0,
         "delta": "Hello"},
        *odd,
        {"type": "response.output_text.done", "output_index": 0, "item_id": "msg_1", "content_index": 0,
         "text": "Hello"},
        {"type": "response.output_item.done", "output_index": 0, "item": ITEM},
        {"type": "response.completed", "response": final},
    ]


# Complete answers: model -> (status, body).
ANSWERS: dict[str, tuple[int, bytes]] = {
    "oa-deep": (200, _deep(COMPLETION)),
    "an-deep": (200, _deep(MESSAGE)),
    "ge-deep": (200, _deep(GEMINI)),
    "oa-deep-error": (500, _deep({"error": {"message": "boom"}})),
    "oa-hello": (200, json.dumps(COMPLETION).encode()),
    "oa-choices-int": (200, json.dumps({**COMPLETION, "choices": 7}).encode()),
    "oa-choices-true": (200, json.dumps({**COMPLETION, "choices": True}).encode()),
    "oa-choices-float": (200, json.dumps({**COMPLETION, "choices": 1.5}).encode()),
    "oa-tool-calls-true": (200, json.dumps({**COMPLETION, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello", "tool_calls": True},
         "finish_reason": "stop"}]}).encode()),
}
# Streams: model -> (SSE events, how the upstream ends: "end" (cleanly), "reset" (a cut) or "stall" (held open)).
STREAMS: dict[str, tuple[list[bytes], str]] = {
    "oa-stream-deep": (_chat_stream(_deep(CHUNK)), "end"),
    # (what a typed read of the choices refuses before it meets the depth: read again, as a chunk of odd choices)
    "oa-stream-odd-deep": (_chat_stream(_deep({**CHUNK, "choices": 7}), "I can"), "end"),
    "an-stream-deep": ([b"event: message_start\ndata: %s\n\n" % json.dumps(
        {"type": "message_start", "message": {**MESSAGE, "content": [], "stop_reason": None}}).encode(),
        b"event: ping\ndata: %s\n\n" % _deep({"type": "ping"})], "end"),
    "rs-stream-deep": ([*_events(_responses()[:4]), b"event: ping\ndata: %s\n\n" % _deep({"type": "ping"})], "end"),
    # (a first text that may open a refusal: the quality signals read the chunks after it)
    "oa-choices-int-stream": (_chat_stream({**CHUNK, "choices": 7}, "I can"), "end"),
    "oa-choice-null": (_chat_stream({**CHUNK, "choices": [None]}), "end"),
    "oa-index-list": (_chat_stream({**CHUNK, "choices": [{"index": [0], "delta": {"content": "!"},
                                                          "finish_reason": None}]}), "end"),
    "oa-tool-index-list": (_chat_stream({**CHUNK, "choices": [{"index": 0, "finish_reason": None, "delta": {
        "tool_calls": [{"index": [0], "id": "c1", "type": "function", "function": {"name": "f",
                                                                                  "arguments": "{}"}}]}}]}), "end"),
    "rs-content-null": (_events(_responses(added={**ITEM, "status": "in_progress", "content": None})), "end"),
    "rs-part-type-list": (_events(_responses(odd=({"type": "response.content_part.added", "output_index": 0,
                                                   "item_id": "msg_1", "content_index": 1,
                                                   "part": {"type": ["output_text"]}},))), "end"),
    "rs-clean": (_events(_responses()), "end"),
    "rs-reset": (_events(_responses()), "reset"),
    "rs-stall": (_events(_responses()), "stall"),
    "rs-unannounced": (_events(_responses(final={**DONE_RESPONSE, "output": [ITEM, CALL]})), "end"),
}
STALL_S = 2.0  # how long the stalling upstream holds the connection open after its last event
IDLE_S = 1  # the gateway's idle timeout: shorter than the stall


class _Upstream(ThreadedApp):
    """OpenAI's chat and Responses endpoints, Anthropic's Messages and Gemini's `generateContent`, each answering its
    model's script, each SSE event in a write of its own."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._by_body)
        app.router.add_post("/v1/responses", self._by_body)
        app.router.add_post("/v1/messages", self._by_body)
        app.router.add_post("/v1beta/models/{call}", self._gemini)

    async def _by_body(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, (await request.json())["model"])

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, request.match_info["call"].split(":")[0])

    async def _answer(self, request: web.Request, model: str) -> web.StreamResponse:
        if model in ANSWERS:
            status, body = ANSWERS[model]
            return web.Response(status=status, body=body, content_type="application/json")
        events, ending = STREAMS[model]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in events:
                await response.write(event)
                await asyncio.sleep(0.005)
            if ending == "reset":
                assert request.transport is not None
                request.transport.abort()
                return response
            if ending == "stall":
                await asyncio.sleep(STALL_S)
            await response.write_eof()
        except ConnectionResetError:  # the gateway stopped reading, as it should after the last event
            pass
        return response


def _policy(port: int, extra: str = "") -> str:
    url = f"http://127.0.0.1:{port}"
    timeouts = f"{{connect_s: 2, first_byte_s: 5, idle_s: {IDLE_S}, total_s: 20}}"
    models = "\n".join(f"  {model}: {{provider: {model[:2]}, model: {model}}}"  # (its provider: its first letters)
                       for model in [*ANSWERS, *STREAMS])
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          oa: {{kind: openai, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          rs: {{kind: openai, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          an: {{kind: anthropic, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          ge: {{kind: gemini, base_url: "{url}/v1beta", api_key_env: UP_KEY, timeouts: {timeouts}}}
        """) + extra + "models:\n" + models + "\n" + FALLBACK


# An alias whose first target answers nested too deep: routing falls back as from any malformed answer.
FALLBACK = """\
  deep-then-hello:
    targets:
      - {provider: oa, model: oa-deep}
      - {provider: oa, model: oa-hello}
"""


QUALITY = "telemetry:\n  quality: {enabled: true}\n"
GUARD = "guards:\n  global:\n    pii: {kind: pii, places: [output], action: redact}\n"


@pytest.fixture(scope="module")
def wire() -> Iterator[_Upstream]:
    with _Upstream() as running:
        yield running


@pytest.fixture(scope="module")
def plain(wire: _Upstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def quality(wire: _Upstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port, QUALITY), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def guarded(wire: _Upstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port, GUARD + QUALITY), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name.startswith("gateway") and record.exc_info]


def _chat(gateway: RunningGateway, model: str, stream: bool = False) -> httpx.Response:
    return httpx.post(gateway.base_url + "/chat/completions", headers=AUTH, timeout=30,
                      json={"model": model, "messages": USER, "stream": stream})


def _responses_stream(gateway: RunningGateway, model: str) -> tuple[float, list[str], str]:
    """How long the stream took, its events' names, and its text."""
    started = time.monotonic()
    with httpx.stream("POST", gateway.base_url + "/responses", headers=AUTH, timeout=30,
                      json={"model": model, "input": "hi", "stream": True}) as response:
        assert response.status_code == 200
        text = response.read().decode()
    return time.monotonic() - started, [event.split("\n")[0] for event in text.split("\n\n") if event], text


# -- 1. the Responses stream ends at its terminal event


@pytest.mark.parametrize("model", ["rs-clean", "rs-reset", "rs-stall"])
def test_a_responses_stream_ends_at_response_completed(plain: RunningGateway, model: str) -> None:
    took, names, _ = _responses_stream(plain, model)
    assert names[-1] == "event: response.completed", names  # (was: an `error` event after it)
    assert took < IDLE_S, took  # (was: the idle timeout waited out for a stall)


@pytest.mark.parametrize("gateway", ["plain", "guarded"])
def test_the_sdk_gets_the_completed_response_of_a_cut_stream(request: pytest.FixtureRequest, gateway: str) -> None:
    client = openai.OpenAI(base_url=request.getfixturevalue(gateway).base_url, api_key=FULL_KEY, max_retries=0)
    with client.responses.stream(model="rs-reset", input="hi") as stream:
        for _ in stream:  # (was: `openai.APIError` after `response.completed`)
            pass
        assert stream.get_final_response().output_text == "Hello"


# -- 2. an answer nested too deep to decode is a malformed one


@pytest.mark.parametrize("model", ["oa-deep", "an-deep", "ge-deep", "oa-deep-error"])
def test_a_deeply_nested_answer_is_a_502(plain: RunningGateway, model: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    response = _chat(plain, model)
    assert response.status_code == 502, response.text  # (was: 500 internal_error)
    assert response.json()["error"]["code"] == "upstream_error"
    assert _tracebacks(caplog) == []


def test_a_deeply_nested_answer_for_a_messages_client_is_a_502(plain: RunningGateway) -> None:
    response = httpx.post(plain.base_url + "/messages", headers={"x-api-key": FULL_KEY}, timeout=30,
                          json={"model": "oa-deep", "max_tokens": 50, "messages": USER})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"] == "api_error"


def test_routing_falls_back_from_a_deeply_nested_answer(plain: RunningGateway) -> None:
    response = _chat(plain, "deep-then-hello")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello"


@pytest.mark.parametrize("model", ["oa-stream-deep", "oa-stream-odd-deep", "an-stream-deep"])
@pytest.mark.parametrize("gateway", ["plain", "quality", "guarded"])
def test_a_deeply_nested_stream_event_is_an_upstream_error(request: pytest.FixtureRequest, gateway: str, model: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    response = _chat(request.getfixturevalue(gateway), model, stream=True)
    assert response.status_code == 200
    assert '"code":"upstream_error"' in response.text, response.text[-300:]  # (was: "the gateway failed ...")
    assert "internal_error" not in response.text
    assert _tracebacks(caplog) == []


def test_a_deeply_nested_responses_event_is_an_upstream_error(plain: RunningGateway) -> None:
    _, names, text = _responses_stream(plain, "rs-stream-deep")
    assert names[-1] == "event: error"
    assert '"code":"upstream_error"' in text and "internal_error" not in text


# -- 3. the quality signals read what is no list as none, and never fail a request


@pytest.mark.parametrize("model", ["oa-choices-int", "oa-choices-true", "oa-choices-float", "oa-tool-calls-true"])
def test_quality_signals_do_not_change_an_odd_answers_status(plain: RunningGateway, quality: RunningGateway,
                                                             model: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    # `choices` that is no array is a malformed answer, a 502 (tests/test_undeliverable_answers.py); the rest a 200
    status = 200 if model == "oa-tool-calls-true" else 502
    assert _chat(plain, model).status_code == status
    response = _chat(quality, model)
    assert response.status_code == status, response.text  # (was: 500 internal_error)
    assert _tracebacks(caplog) == []


def test_quality_signals_read_an_odd_stream(quality: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    text = _chat(quality, "oa-choices-int-stream", stream=True).text
    assert text.endswith("data: [DONE]\n\n") and "error" not in text
    assert _tracebacks(caplog) == []


def test_a_failure_of_the_quality_signals_is_logged_once_and_fails_no_request(
        quality: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: QualitySignals, *args: object) -> None:
        raise KeyError("the answer's text")

    monkeypatch.setattr(QualitySignals, "read", broken)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        response = _chat(quality, "oa-hello")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hello"
    logged = [record.getMessage() for record in caplog.records if "quality signals failed" in record.getMessage()]
    assert len(logged) == 1, logged
    assert "KeyError" in logged[0] and "the answer's text" not in logged[0]


# -- 4. an output guard reads odd values as absent


@pytest.mark.parametrize("model", ["oa-choice-null", "oa-index-list", "oa-tool-index-list"])
def test_an_output_guard_reads_an_odd_chat_chunk(plain: RunningGateway, guarded: RunningGateway, model: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert _chat(plain, model, stream=True).text.endswith("data: [DONE]\n\n")
    text = _chat(guarded, model, stream=True).text
    assert text.endswith("data: [DONE]\n\n"), text[-300:]  # (was: internal_error)
    assert "error" not in text and "Hello" in text
    assert _tracebacks(caplog) == []


@pytest.mark.parametrize("model", ["rs-content-null", "rs-part-type-list"])
def test_an_output_guard_reads_an_odd_responses_event(plain: RunningGateway, guarded: RunningGateway, model: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert _responses_stream(plain, model)[1][-1] == "event: response.completed"
    _, names, text = _responses_stream(guarded, model)
    assert names[-1] == "event: response.completed", text[-300:]  # (was: internal_error)
    assert _tracebacks(caplog) == []


def test_an_event_a_guard_cannot_read_is_the_upstreams_error(
        guarded: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """What the adapter still fails to read of an upstream event: the upstream's error, never the gateway's, and
    logged with its traceback (it may be the adapter's bug)."""
    async def unreadable(self: ChatChunks, chunk: object) -> list[object]:
        raise TypeError("unhashable type: 'list'")

    monkeypatch.setattr(ChatChunks, "chunk", unreadable)
    caplog.set_level(logging.WARNING)
    text = _chat(guarded, "oa-choice-null", stream=True).text
    assert '"code":"upstream_error"' in text and "internal_error" not in text, text[-300:]
    assert any("could not read an upstream stream event" in message for message in _tracebacks(caplog))


# -- 5. no delta for an item the stream never announced


def test_the_sdk_reads_a_guarded_stream_whose_end_lists_an_unannounced_item(guarded: RunningGateway) -> None:
    client = openai.OpenAI(base_url=guarded.base_url, api_key=FULL_KEY, max_retries=0)
    with client.responses.stream(model="rs-unannounced", input="hi") as stream:
        for _ in stream:  # (was: RuntimeError, a delta for output index 1 before its item)
            pass
        final = stream.get_final_response()
    assert final.output_text == "Hello"
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].model_dump()["arguments"] == "{\"a\": 1}"  # checked, and written as released


def test_the_usage_estimate_reads_an_odd_answer_as_holding_no_text() -> None:
    """The text a usage estimate counts (an upstream without usage) is read from lists only: `"choices": 7`, a
    `tool_calls: true` or an answer nested past the recursion limit hold no text, and fail nothing."""
    from gateway.telemetry.answer_text import answer_text, chunk_text

    parts: list[str] = []
    chunk_text({"choices": 7}, parts)
    chunk_text({"choices": [{"delta": {"content": "a", "tool_calls": True}}]}, parts)
    assert parts == ["a"]
    assert answer_text(b'{"choices": true, "output": 3}') == ""
    assert answer_text(b'{"choices": ' + b"[" * 5000 + b"]" * 5000 + b"}") == ""
