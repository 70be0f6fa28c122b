"""Upstream answers that open with a UTF-8 byte order mark, and stream error events without an `error` key.

1. A BOM (EF BB BF) before an Anthropic or Gemini answer's JSON, or before any upstream's error body: the
   OpenAI-compatible path dropped one before a complete answer already (`tests/test_upstream_bom.py`); the others
   did not. An Anthropic or Gemini answer was a 502 ("invalid JSON"), and an error body's message was lost: the
   client got "rejected the request" without the upstream's reason, and a prompt too long was no
   `context_length_exceeded` (no context fallback). Now one mark is dropped there too. (A stream's first event
   after a BOM was read already, by every provider: the SSE decoder drops the mark, `upstream.sse`.)
2. vLLM (and other OpenAI-compatible servers) write an error mid-stream as `{"object": "error", "message": ...,
   "type": ..., "code": ...}`, with no `error` key, and answer their errors so too. The stream passed it to the
   client as a chunk (the openai SDK then failed on a chunk with no choices, or the client read a 200 stream that
   ended without its answer), and an error answer's message was lost (a prompt too long: a bare 400). Now it is
   the upstream's error, as `{"error": {...}}` is: the stream ends with the gateway's error event.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

BOM = b"\xef\xbb\xbf"
USER = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn", "stop_sequence": None,
           "usage": {"input_tokens": 5, "output_tokens": 1}}
GEMINI = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]}, "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 1, "totalTokenCount": 6}}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
VLLM_ERROR = {"object": "error", "message": "The engine ran out of KV cache blocks", "type": "InternalServerError",
              "param": None, "code": 500}
TOO_LONG = ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
            "(4990 in the messages, 10 in the completion).")


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


def _chat_stream(odd: dict[str, Any]) -> list[bytes]:
    chunks = [{**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}, odd,
              {**CHUNK, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}]
    return [*(b"data: %s\n\n" % _json(chunk) for chunk in chunks), b"data: [DONE]\n\n"]


def _responses_stream() -> list[bytes]:
    """A Responses stream (OpenAI's `event:` lines) that a flat error cuts after its first text."""
    response = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
                "output": []}
    events = [{"type": "response.created", "response": response},
              {"type": "response.output_text.delta", "output_index": 0, "item_id": "msg_1", "content_index": 0,
               "delta": "Hel"}]
    return [*(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), _json(event)) for event in events),
            b"data: %s\n\n" % _json(VLLM_ERROR)]


# model -> (status, JSON body) for a complete answer, or a list of SSE events (each in a write of its own)
SCRIPTS: dict[str, tuple[int, bytes] | list[bytes]] = {
    "an-bom": (200, BOM + _json(MESSAGE)),
    "ge-bom": (200, BOM + _json(GEMINI)),
    "oa-bom-too-long": (400, BOM + _json({"error": {"message": TOO_LONG, "type": "invalid_request_error",
                                                    "code": None}})),
    "oa-bom-refused": (400, BOM + _json({"error": {"message": "temperature must be at most 2"}})),
    "an-bom-too-long": (400, BOM + _json({"type": "error", "error": {
        "type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"}})),
    "ge-bom-too-long": (400, BOM + _json({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                                    "The input token count exceeds the maximum number of tokens"}})),
    "oa-object-error-stream": _chat_stream(VLLM_ERROR),
    "oa-object-error-first": _chat_stream(VLLM_ERROR)[1:],
    "oa-object-error-responses": _responses_stream(),
    # n=2, no [DONE]: the last chunk finishes a choice whose index is no number
    "oa-odd-index-end": [b"data: %s\n\n" % _json({**CHUNK, "choices": [{"index": index, "delta": {"content": "a"},
                                                                        "finish_reason": "stop"}]})
                         for index in (0, [1])],
    "oa-object-error-too-long": (400, _json({**VLLM_ERROR, "message": TOO_LONG, "type": "BadRequestError",
                                             "code": 400})),
    "oa-object-error-refused": (400, _json({**VLLM_ERROR, "message": "best_of must be 1", "type": "BadRequestError",
                                            "code": 400})),
}


class _Upstream(ThreadedApp):
    """OpenAI's chat endpoint, Anthropic's Messages and Gemini's `generateContent`, each answering its model's
    script."""

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
        script = SCRIPTS[model]
        if isinstance(script, tuple):
            return web.Response(status=script[0], body=script[1], content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for event in script:
                await response.write(event)
                await asyncio.sleep(0.005)
            await response.write_eof()
        except ConnectionResetError:  # the gateway stopped reading, as it should after an error event
            pass
        return response


@pytest.fixture(scope="module")
def served() -> Iterator[RunningGateway]:
    with _Upstream() as wire:
        url = f"http://127.0.0.1:{wire.port}"
        timeouts = "{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}"
        models = "\n".join(f"  {model}: {{provider: {model[:2]}, model: {model}}}" for model in SCRIPTS)
        text = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              oa: {{kind: openai, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
              an: {{kind: anthropic, base_url: "{url}/v1", api_key_env: UP_KEY, timeouts: {timeouts}}}
              ge: {{kind: gemini, base_url: "{url}/v1beta", api_key_env: UP_KEY, timeouts: {timeouts}}}
            """) + "models:\n" + models + "\n"
        running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _openai(served: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=10)


@pytest.mark.parametrize("model", ["an-bom", "ge-bom"])
def test_an_answer_after_a_bom_is_the_answer(served: RunningGateway, model: str) -> None:
    completion = _openai(served).chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "Hello"
    assert completion.usage is not None and completion.usage.total_tokens == 6


def test_a_messages_client_reads_a_bom_answer_whole(served: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=served.url, api_key=FULL_KEY, max_retries=0, timeout=10)
    message = client.messages.create(model="an-bom", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert [block.text for block in message.content if block.type == "text"] == ["Hello"]


@pytest.mark.parametrize("model", ["oa-bom-too-long", "an-bom-too-long", "ge-bom-too-long"])
def test_an_error_body_after_a_bom_keeps_its_meaning(served: RunningGateway, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        _openai(served).chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
    assert raised.value.code == "context_length_exceeded", raised.value.message


def test_an_error_message_after_a_bom_reaches_the_client(served: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        _openai(served).chat.completions.create(model="oa-bom-refused", messages=USER)  # type: ignore[arg-type]
    assert "temperature must be at most 2" in raised.value.message


@pytest.mark.parametrize("model", ["oa-object-error-stream", "oa-object-error-first"])
def test_an_object_error_event_ends_the_stream_as_the_upstreams_error(served: RunningGateway, model: str) -> None:
    reply = httpx.post(served.base_url + "/chat/completions", headers=AUTH, timeout=10,
                       json={"model": model, "messages": USER, "stream": True})
    events = [json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")]
    assert not any(event.get("object") == "error" for event in events), reply.text  # never passed as a chunk
    assert events[-1]["error"]["code"] == "upstream_error", reply.text
    assert "ran out of KV cache blocks" in events[-1]["error"]["message"]
    assert "lo" not in [choice["delta"].get("content") for event in events for choice in event.get("choices", [])]


def test_the_sdk_raises_the_object_error_event(served: RunningGateway) -> None:
    stream = _openai(served).chat.completions.create(model="oa-object-error-stream", messages=USER,  # type: ignore
                                                     stream=True)
    with pytest.raises(openai.APIError, match="ran out of KV cache blocks"):
        list(stream)


def test_an_object_error_answer_keeps_its_meaning(served: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        _openai(served).chat.completions.create(model="oa-object-error-too-long", messages=USER)  # type: ignore
    assert raised.value.code == "context_length_exceeded", raised.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        _openai(served).chat.completions.create(model="oa-object-error-refused", messages=USER)  # type: ignore
    assert "best_of must be 1" in refused.value.message


def test_an_object_error_event_ends_a_responses_stream(served: RunningGateway) -> None:
    reply = httpx.post(served.base_url + "/responses", headers=AUTH, timeout=10,
                       json={"model": "oa-object-error-responses", "input": "hi", "stream": True})
    names = [line for line in reply.text.splitlines() if line.startswith("event: ")]
    assert names[-1] == "event: error", reply.text
    assert '"object": "error"' not in reply.text and "ran out of KV cache blocks" in reply.text
    assert '"code":"upstream_error"' in reply.text


def test_a_stream_that_ends_on_an_odd_choice_index_is_the_upstreams_failure(served: RunningGateway) -> None:
    reply = httpx.post(served.base_url + "/chat/completions", headers=AUTH, timeout=10,
                       json={"model": "oa-odd-index-end", "messages": USER, "stream": True, "n": 2})
    assert reply.status_code == 200
    assert '"code":"upstream_error"' in reply.text and "internal_error" not in reply.text, reply.text[-400:]
