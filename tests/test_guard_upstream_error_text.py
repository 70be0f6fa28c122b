"""An upstream's error message past the output guards.

An upstream that fails mid-stream, or answers a complete request with a 4xx or 5xx, may quote the answer's text in
its message (vLLM's "Failed to parse tool call output: ..."). The gateway passed that message on (sanitized: only
configured credentials and host shapes removed), so an AWS key the secrets guard would have redacted reached the
client whole. With an enforcing output guard, the upstream's own words are now withheld (the gateway's text for the
error, its status, type and code kept); with none, the message is passed as before.

The upstream is scripted per model (OpenAI-compatible chat, Responses, Anthropic Messages), the gateway real, the
client httpx (raw bytes: what leaves, in any field).
"""

from __future__ import annotations

import asyncio
import json
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
KEY = "AKIAZ3MQ7XJ4K2PLW9QA"
TEXT = f"Failed to parse tool call output: Here is the key {KEY} and mail jane.doe@mailbox.org done."
WITHHELD = "its message withheld: output guards are on"
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
RESP = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m", "output": []}
ITEM = {"id": "msg_1", "type": "message", "role": "assistant", "status": "in_progress", "content": []}


def _frame(data: dict[str, Any], event: str | None = None) -> bytes:
    return (f"event: {event}\n".encode() if event else b"") + b"data: " + json.dumps(data).encode() + b"\n\n"


def _chat(error: dict[str, Any]) -> list[bytes]:
    deltas = [{"role": "assistant", "content": ""}, *({"content": c} for c in ("Hello ", "there "))]
    return [*(_frame({**CHUNK, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}) for d in deltas),
            _frame(error)]


def _responses() -> list[bytes]:
    events = [{"type": "response.created", "response": RESP},
              {"type": "response.output_item.added", "output_index": 0, "item": ITEM},
              {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_1",
               "delta": "Hello "},
              {"type": "error", "code": "server_error", "message": TEXT, "param": None}]
    return [_frame({**e, "sequence_number": i}, e["type"]) for i, e in enumerate(events)]


def _anthropic() -> list[bytes]:
    events = [{"type": "message_start", "message": {
                  "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": [],
                  "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello "}},
              {"type": "error", "error": {"type": "overloaded_error", "message": TEXT}}]
    return [_frame(e, e["type"]) for e in events]


def _responses_failed() -> list[bytes]:
    failed = {**RESP, "status": "failed", "error": {"code": "server_error", "message": TEXT}}
    events = [{"type": "response.created", "response": RESP}, {"type": "response.failed", "response": failed}]
    return [_frame({**e, "sequence_number": i}, e["type"]) for i, e in enumerate(events)]


# upstream model -> (status, JSON body) or SSE frames
ANSWERS: dict[str, Any] = {
    "responses-failed": _responses_failed(),
    "failed-whole": (200, {**RESP, "status": "failed", "error": {"code": "server_error", "message": TEXT}}),
    "chat-nested": _chat({"error": {"message": TEXT, "type": "server_error", "code": 500}}),
    "chat-flat": _chat({"object": "error", "message": TEXT, "type": "BadRequestError", "code": 400}),
    "responses": _responses(),
    "anthropic": _anthropic(),
    "whole-500": (500, {"error": {"message": TEXT, "type": "server_error", "code": None}}),
    "whole-400": (400, {"object": "error", "message": TEXT, "type": "BadRequestError", "code": 400}),
    "whole-200": (200, {"error": {"message": TEXT, "type": "server_error"}}),
}
OPENAI = [name for name in ANSWERS if name != "anthropic"]


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            answer = ANSWERS[(await request.json())["model"]]
            if isinstance(answer, tuple):
                return web.json_response(answer[1], status=answer[0])
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for frame in answer:
                await response.write(frame)
                await asyncio.sleep(0.002)
            await response.write_eof()
            return response

        for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
            app.router.add_post(path, handle)


def _policy(port: int) -> str:
    # `g-<model>`: output guards that redact; `r-<model>`: one that only records; `o-<model>`: none
    models = "".join(f"  {p}-{m}: {{provider: {'ant' if m == 'anthropic' else 'up'}, model: {m}}}\n"
                     for m in ANSWERS for p in ("g", "o", "r"))
    guarded = "".join(f"    g-{m}: {{pii: {{kind: pii, places: [output], action: redact}}, "
                      f"secrets: {{kind: secrets, places: [output], action: redact}}}}\n" for m in ANSWERS)
    recorded = "".join(f"    r-{m}: {{secrets: {{kind: secrets, places: [output], action: record}}}}\n"
                       for m in ANSWERS)
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          up: {{kind: openai, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY}}
          ant: {{kind: anthropic, base_url: "http://127.0.0.1:{port}/v1", api_key_env: UP_KEY}}
        guards:
          models:
        """) + guarded + recorded + "models:\n" + models


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        running = RunningGateway(_policy(upstream.port), {"UP_KEY": UPSTREAM_KEY}).start()
        yield running
        running.stop()


def _post(gw: RunningGateway, path: str, alias: str, stream: bool) -> httpx.Response:
    messages = [{"role": "user", "content": "hi"}]
    body: dict[str, Any] = {"model": alias, "stream": stream}
    if path == "/v1/responses":
        body["input"] = "hi"
    else:
        body["messages"] = messages
    if path == "/v1/messages":
        body["max_tokens"] = 50
    return httpx.post(gw.url + path, headers=AUTH, json=body, timeout=30)


STREAMS = [("/v1/chat/completions", "chat-nested"), ("/v1/chat/completions", "chat-flat"),
           ("/v1/responses", "responses"), ("/v1/messages", "anthropic"), ("/v1/chat/completions", "anthropic")]


@pytest.mark.parametrize(("path", "model"), STREAMS)
def test_mid_stream_error_withheld_under_output_guards(gw: RunningGateway, path: str, model: str) -> None:
    text = _post(gw, path, f"g-{model}", True).text
    assert "Hello" in text  # the stream had begun
    assert KEY not in text and "tool call output" not in text
    assert WITHHELD in text
    assert ("is overloaded" if model == "anthropic" else "failed mid-stream") in text


@pytest.mark.parametrize(("path", "model"), STREAMS)
@pytest.mark.parametrize("prefix", ["o", "r"])
def test_mid_stream_error_passed_without_enforcing_guards(gw: RunningGateway, path: str, model: str,
                                                          prefix: str) -> None:
    """No output guard, or one that only records: the upstream's message as before (sanitized)."""
    text = _post(gw, path, f"{prefix}-{model}", True).text
    assert "Failed to parse tool call output" in text and KEY in text
    assert WITHHELD not in text


@pytest.mark.parametrize(("model", "status", "kind", "stream"), [
    ("whole-500", 502, "upstream_error", False), ("whole-500", 502, "upstream_error", True),
    ("whole-400", 400, "invalid_request_error", False), ("whole-400", 400, "invalid_request_error", True),
    ("whole-200", 502, "upstream_error", False),  # (a JSON 200 to a stream request is the gateway's own error)
])
def test_complete_answer_error_withheld(gw: RunningGateway, model: str, status: int, kind: str, stream: bool) -> None:
    """An upstream's error answer (a 4xx or 5xx, a 200 that is an error; streamed or not: the error comes before any
    chunk) keeps its status and type, without the upstream's words."""
    response = _post(gw, "/v1/chat/completions", f"g-{model}", stream)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == kind
    assert KEY not in response.text and "tool call output" not in response.text
    assert error["message"].endswith(f"({WITHHELD})")
    plain = _post(gw, "/v1/chat/completions", f"o-{model}", stream)
    assert plain.status_code == status and KEY in plain.json()["error"]["message"]


@pytest.mark.parametrize(("model", "stream"), [("responses-failed", True), ("failed-whole", False)])
def test_a_failed_responses_answers_error_is_withheld_under_output_guards(gw: RunningGateway, model: str,
                                                                          stream: bool) -> None:
    """A Responses answer that failed carries the upstream's error in the answer itself (`response.failed`'s
    response, a complete answer's `error`): its message is the gateway's under an enforcing output guard."""
    guarded = _post(gw, "/v1/responses", f"g-{model}", stream)
    assert guarded.status_code == 200 and "server_error" in guarded.text
    assert KEY not in guarded.text and "tool call output" not in guarded.text and WITHHELD in guarded.text
    plain = _post(gw, "/v1/responses", f"o-{model}", stream)
    assert KEY in plain.text and WITHHELD not in plain.text
