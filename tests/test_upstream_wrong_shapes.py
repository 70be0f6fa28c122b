"""Upstream answers of valid JSON but the wrong shape (a string where an object belongs), through a real gateway.

A translator read such a value with `.get` and an `AttributeError` escaped:

1. mid-stream (an OpenAI chunk's `"delta": "oops"` or `"function": "x"` for a Messages client, an Anthropic event's
   `"content_block": "oops"` or `"usage": "y"`, a Gemini event's `"candidates": ["x"]`), the edge then sent a second
   response head after the stream's own, the server logged "Expected ASGI message 'http.response.body'" and cut
   the connection: the SDKs raised a connection error, which they retry (the upstream called, and billed, again).
   Now the stream ends with its error event, as for an upstream event that is not JSON;
2. in a complete OpenAI answer for a Messages client (`"choices": ["x"]`, `"message": "str"`, ...), a 500 (which
   the SDKs retry too): now a 502, as an answer that is not JSON is.

One scripted upstream speaks OpenAI's, Anthropic's and Gemini's wire formats (the request's model names the
script); the clients are the official `openai` and `anthropic` SDKs. The last test breaks the Messages framer on
purpose: a failure after a stream's head (a bug) is the stream's error event too, never a second head.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections import Counter
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.translate.anthropic_answer import MessagesStream
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

USER = [{"role": "user", "content": "hi"}]
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
MALFORMED = "malformed"  # what the client's error says (the upstream's bytes never reach it)


def _chunk(delta: Any, finish: str | None = None) -> dict[str, Any]:
    return {**CHUNK, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _openai_stream(bad: dict[str, Any]) -> list[bytes]:
    """A chat stream whose third chunk is `bad`, after some text."""
    chunks = [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}), bad, _chunk({}, "stop")]
    return [b"data: %s\n\n" % json.dumps(chunk).encode() for chunk in chunks] + [b"data: [DONE]\n\n"]


def _completion(**choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "usage": USAGE,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop",
                         **choice}]}


def _event(kind: str, **fields: Any) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps({"type": kind, **fields}).encode())


MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 0}}
TEXT_BLOCK = [_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
              _event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hello"}),
              _event("content_block_stop", index=0)]
ENDING = [_event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3}),
          _event("message_stop")]


def _anthropic_stream(*, start: Any = MESSAGE, bad: list[bytes] = (), ending: list[bytes] = ENDING) -> list[bytes]:
    return [_event("message_start", message=start), *TEXT_BLOCK, *bad, *ending]


def _gemini(candidates: Any) -> bytes:
    return b"data: %s\n\n" % json.dumps({"candidates": candidates, "modelVersion": "gemini-x"}).encode()


GEMINI_TEXT = {"content": {"role": "model", "parts": [{"text": "Hello"}]}, "index": 0}

# Streams whose bad event comes after some text (the client's stream has begun): model -> the upstream's SSE bytes.
OPENAI_STREAMS = {
    "oa-delta-string": _openai_stream({**CHUNK, "choices": [{"index": 0, "delta": "oops", "finish_reason": None}]}),
    "oa-function-string": _openai_stream(_chunk({"tool_calls": [{"index": 0, "id": "call_1", "function": "x"}]})),
    "oa-tool-calls-number": _openai_stream(_chunk({"tool_calls": 5})),
    "oa-choices-number": _openai_stream({**CHUNK, "choices": 5}),
}
ANTHROPIC_STREAMS = {
    "an-block-string": _anthropic_stream(bad=[_event("content_block_start", index=1, content_block="oops")]),
    "an-delta-string": _anthropic_stream(bad=[
        _event("content_block_start", index=1, content_block={"type": "text", "text": ""}),
        _event("content_block_delta", index=1, delta="x")]),
    "an-usage-string": _anthropic_stream(ending=[_event("message_delta", delta={"stop_reason": "end_turn"},
                                                        usage="y"), _event("message_stop")]),
    "an-stop-delta-string": _anthropic_stream(ending=[_event("message_delta", delta="x", usage={"output_tokens": 3}),
                                                      _event("message_stop")]),
}
GEMINI_STREAMS = {
    "ge-candidate-string": [_gemini([GEMINI_TEXT]), _gemini(["x"])],
    "ge-content-string": [_gemini([GEMINI_TEXT]), _gemini([{"content": "x", "index": 0}])],
    "ge-part-string": [_gemini([GEMINI_TEXT]), _gemini([{"content": {"parts": ["x"]}, "index": 0}])],
}
# A stream whose very first event is bad: its error event is all the client reads.
FIRST_EVENT = {"an-message-string": _anthropic_stream(start="x")}
# Complete OpenAI answers, for a Messages client.
OPENAI_ANSWERS = {
    "oa-choice-string": {**_completion(), "choices": ["x"]},
    "oa-choice-null": {**_completion(), "choices": [None]},
    "oa-choices-string": {**_completion(), "choices": "x"},
    "oa-message-string": _completion(message="str"),
    "oa-tool-call-string": _completion(message={"role": "assistant", "content": None, "tool_calls": ["x"]}),
    "oa-tool-calls-string": _completion(message={"role": "assistant", "content": None, "tool_calls": "x"}),
    "oa-function-string-whole": _completion(message={"role": "assistant", "content": None,
                                                     "tool_calls": [{"id": "call_1", "function": "x"}]}),
}
# Complete Gemini answers (any client: the provider translates them).
GEMINI_ANSWERS = {
    "ge-candidate-string-whole": {"candidates": ["x"]},
    "ge-part-string-whole": {"candidates": [{"content": {"parts": ["x"]}, "finishReason": "STOP"}]},
}
# Complete Anthropic answers with the stream's odd values: read around (the block skipped, the usage estimated).
ANTHROPIC_ANSWERS = {
    "an-block-string-whole": {**MESSAGE, "content": ["oops", {"type": "text", "text": "Hello"}],
                              "stop_reason": "end_turn"},
    "an-usage-string-whole": {**MESSAGE, "content": [{"type": "text", "text": "Hello"}], "usage": "y",
                              "stop_reason": "end_turn"},
}


class _WireUpstream(ThreadedApp):
    """OpenAI's `/v1/chat/completions`, Anthropic's `/v1/messages` and Gemini's `/v1beta/models/{model}:{method}`,
    each answering its model's script (an SSE stream, each event in a write of its own, or a JSON body)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._by_body)
        app.router.add_post("/v1/messages", self._by_body)
        app.router.add_post("/v1beta/models/{call}", self._gemini)

    async def _by_body(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, (await request.json())["model"])

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, request.match_info["call"].split(":")[0])

    async def _answer(self, request: web.Request, model: str) -> web.StreamResponse:
        self.calls[model] += 1
        for answers in (OPENAI_ANSWERS, GEMINI_ANSWERS, ANTHROPIC_ANSWERS):
            if model in answers:
                return web.json_response(answers[model])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in {**OPENAI_STREAMS, **ANTHROPIC_STREAMS, **GEMINI_STREAMS, **FIRST_EVENT}[model]:
                await response.write(event)
                await asyncio.sleep(0.01)  # each event read on its own: the client's stream began before the bad one
            await response.write_eof()
        except ConnectionResetError:  # the gateway stopped reading after the bad event, as it should
            pass
        return response


def _policy(port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    timeouts = "{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}"
    providers = {"oa": [*OPENAI_STREAMS, *OPENAI_ANSWERS], "an": [*ANTHROPIC_STREAMS, *FIRST_EVENT, *ANTHROPIC_ANSWERS],
                 "ge": [*GEMINI_STREAMS, *GEMINI_ANSWERS]}
    models = "\n".join(f"  {model}: {{provider: {provider}, model: {model}}}"
                       for provider, names in providers.items() for model in names)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          oa: {{kind: openai, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          an: {{kind: anthropic, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
          ge: {{kind: gemini, base_url: "{url}/v1beta", api_key_env: UP_KEY, timeouts: {timeouts}}}
        models:
        """) + models + "\n"


@pytest.fixture(scope="module")
def wire() -> Iterator[_WireUpstream]:
    with _WireUpstream() as running:
        yield running


@pytest.fixture(scope="module")
def gw(wire: _WireUpstream) -> Iterator[RunningGateway]:
    running = RunningGateway(_policy(wire.port), {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _count_anew(wire: _WireUpstream) -> None:
    wire.calls.clear()


def _messages_client(gw: RunningGateway, retries: int = 2) -> anthropic.Anthropic:
    """The SDK's default retries: a cut connection would be retried, and the upstream called again."""
    return anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=retries, timeout=20)


def _chat_client(gw: RunningGateway, retries: int = 2) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=retries, timeout=20)


def _messages_stream(gw: RunningGateway, model: str) -> tuple[str, anthropic.APIStatusError]:
    """The text a Messages stream delivered before its error, and the error."""
    text: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as caught:  # (a connection error is no APIStatusError)
        with _messages_client(gw).messages.stream(model=model, max_tokens=50, messages=USER) as stream:
            text.extend(stream.text_stream)
    return "".join(text), caught.value


def _chat_stream(gw: RunningGateway, model: str) -> tuple[str, openai.APIError]:
    text: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in _chat_client(gw).chat.completions.create(model=model, messages=USER, stream=True):
            text.extend(choice.delta.content or "" for choice in chunk.choices)
    assert not isinstance(caught.value, openai.APIConnectionError), caught.value
    return "".join(text), caught.value


# -- 1. mid-stream: the stream's error event -------------------------------------------------------------------------


@pytest.mark.parametrize("model", [*OPENAI_STREAMS, *ANTHROPIC_STREAMS, *FIRST_EVENT])
def test_a_messages_stream_ends_with_its_error_event(gw: RunningGateway, wire: _WireUpstream,
                                                     model: str) -> None:
    text, error = _messages_stream(gw, model)
    assert text == ("" if model in FIRST_EVENT else "Hello")  # what came before the bad event, then the error
    assert error.body["error"]["type"] == "api_error", error.body
    assert MALFORMED in error.body["error"]["message"]
    assert wire.calls[model] == 1  # no retry by the SDK: the upstream was called (and billed) once


@pytest.mark.parametrize("model", [*ANTHROPIC_STREAMS, *GEMINI_STREAMS, *FIRST_EVENT])
def test_a_chat_stream_ends_with_its_error_event(gw: RunningGateway, wire: _WireUpstream,
                                                 model: str) -> None:
    text, error = _chat_stream(gw, model)
    assert text == ("" if model in FIRST_EVENT else "Hello")
    assert not isinstance(error, openai.APIStatusError)  # an error event in a 200 stream, not an error reply
    assert MALFORMED in error.message, error.message
    assert wire.calls[model] == 1


# -- 2. a complete answer: a 502 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [*OPENAI_ANSWERS, *GEMINI_ANSWERS])
def test_a_complete_answer_of_the_wrong_shape_is_a_502(gw: RunningGateway, model: str) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        _messages_client(gw, retries=0).messages.create(model=model, max_tokens=50, messages=USER)
    assert caught.value.status_code == 502, caught.value.body
    assert caught.value.body["error"]["type"] == "api_error"


@pytest.mark.parametrize("model", list(ANTHROPIC_ANSWERS))
def test_a_complete_anthropic_answer_is_read_around_its_odd_values(gw: RunningGateway, model: str) -> None:
    """The stream's odd values in a whole answer are skipped (not a 500): both clients get the text."""
    message = _messages_client(gw, retries=0).messages.create(model=model, max_tokens=50, messages=USER)
    chat = _chat_client(gw, retries=0).chat.completions.create(model=model, messages=USER)
    assert [block.text for block in message.content if block.type == "text"] == ["Hello"]
    assert chat.choices[0].message.content == "Hello"


# -- the logs, and the edge's safety net -----------------------------------------------------------------------------


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the server and the gateway logged as a failure: errors, tracebacks, the ASGI server's complaint."""
    return [record.getMessage() for record in caplog.records if record.name.startswith(("gateway", "uvicorn"))
            and (record.levelno >= logging.ERROR or record.exc_info or "Expected ASGI message" in record.getMessage())]


def test_no_bad_shape_logs_a_traceback(gw: RunningGateway, caplog: pytest.LogCaptureFixture) -> None:
    """An upstream's malformed event is the upstream's failure, told to the client: not the gateway's, logged."""
    caplog.set_level(logging.WARNING)
    _messages_stream(gw, "oa-delta-string")
    _messages_stream(gw, "an-block-string")
    _chat_stream(gw, "ge-candidate-string")
    with pytest.raises(anthropic.APIStatusError):
        _messages_client(gw, retries=0).messages.create(model="oa-message-string", max_tokens=50, messages=USER)
    assert _failures(caplog) == []


def test_a_failure_after_the_head_is_the_streams_error_event(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug mid-stream (the framer fails on text): the client reads an internal error event, the log has the
    traceback once, and the server never sees a second response head."""
    def broken(self: MessagesStream, text: str, out: list[bytes]) -> None:
        raise RuntimeError("a framer bug")

    monkeypatch.setattr(MessagesStream, "_text", broken)
    caplog.set_level(logging.WARNING)
    text, error = _messages_stream(gw, "an-usage-string")
    assert text == ""
    assert error.body["error"] == {"type": "api_error", "message": "the gateway failed while streaming the answer"}
    assert _failures(caplog) == ["unhandled error mid-stream"]
