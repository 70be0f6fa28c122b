"""A stream an output guard blocks still gives its client the usage it is billed.

A guard with `action: block` ends a stream at once. The upstream's usage often comes after its finish chunk (a
paced upstream sends it 200 ms later), and that chunk is never read: the gateway bills its own estimate. A Chat
Completions client that asked for usage (`stream_options.include_usage`) got no usage chunk then
(`get_final_completion()`'s usage was None), and a Responses client's `response.incomplete` had `usage: null`,
while a Messages client got the estimate. Through a real gateway, a paced upstream and the openai SDK's stream
helpers: each client is shown the estimate, and the ledger (`GET /admin/usage`), the access log
(`tokens_estimated: true`) and the metrics record those same figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.billing import access_line, usage_row
from tests.support.threaded_app import ThreadedApp

KEY = "gw-blocked-usage-key-000000000000000000000"
ADMIN = "admin-blocked-usage"
SECRET = "AKIAIOSFODNN7EXAMPLQ"  # an AWS access key id: the secrets guard blocks it
WORDS = f"my key is {SECRET} and more words here to pad it out a bit".split(" ")
UPSTREAM_USAGE = {"prompt_tokens": 11, "completion_tokens": 17, "total_tokens": 28}
LATE_S = 0.2  # the usage comes this long after the finish: the block does not wait for it


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Paced(ThreadedApp):
    """An OpenAI-compatible upstream that streams a word at a time and sends its usage late."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        try:
            await reply.write(_chunk({"role": "assistant", "content": ""}))
            for i, word in enumerate(WORDS):
                await reply.write(_chunk({"content": (" " if i else "") + word}))
                await asyncio.sleep(0.01)
            await reply.write(_chunk({}, "stop"))
            await asyncio.sleep(LATE_S)
            usage = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                     "usage": UPSTREAM_USAGE}
            await reply.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
            await reply.write_eof()
        except ConnectionError:  # the gateway ended the blocked stream: it closed the connection
            pass
        return reply

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        reply = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await reply.prepare(request)
        number = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal number
            data = {"type": kind, "sequence_number": number, **fields}
            number += 1
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

        base = {"id": "resp_1", "object": "response", "created_at": 1, "status": "in_progress", "model": "m",
                "output": [], "usage": None}
        item = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        place = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        try:
            await reply.write(event("response.created", response=base))
            await reply.write(event("response.output_item.added", output_index=0, item=item))
            await reply.write(event("response.content_part.added", **place,
                                    part={"type": "output_text", "text": "", "annotations": []}))
            for i, word in enumerate(WORDS):
                await reply.write(event("response.output_text.delta", **place, delta=(" " if i else "") + word))
                await asyncio.sleep(0.01)
            text = " ".join(WORDS)
            await reply.write(event("response.output_text.done", **place, text=text))
            done = {**item, "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
            await reply.write(event("response.output_item.done", output_index=0, item=done))
            await asyncio.sleep(LATE_S)
            usage = {"input_tokens": 11, "output_tokens": 17, "total_tokens": 28,
                     "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
            await reply.write(event("response.completed", response={**base, "status": "completed",
                                                                    "output": [done], "usage": usage}))
            await reply.write_eof()
        except ConnectionError:
            pass
        return reply


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Paced() as upstream:
        target = "{provider: paced, model: m, price: {input_per_mtok: 1000, output_per_mtok: 2000}}"
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK, access_log: true}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 1000}}}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              paced: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: K}}
            models:
              chat-usage: {{targets: [{target}]}}
              chat-quiet: {{targets: [{target}]}}
              resp-usage: {{targets: [{target}]}}
            guards:
              global:
                secrets: {{kind: secrets, places: [output], action: block}}
            """)
        running = RunningGateway(text, {"K": "x", "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


def _client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


def _metric(gw: RunningGateway, alias: str, kind: str) -> float:
    prefix = f'gateway_tokens_total{{kind="{kind}",model="{alias}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in gw.metrics().splitlines() if line.startswith(prefix))


def _billed(gw: RunningGateway, caplog: pytest.LogCaptureFixture, alias: str, prompt: int, completion: int) -> None:
    """The ledger, the access log (marked estimated) and the metrics: the figures the client was shown."""
    row = usage_row(gw.url, ADMIN, alias)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion), row
    line = access_line(caplog, alias)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (prompt, completion), line
    assert line["tokens_estimated"] is True, line
    assert (_metric(gw, alias, "prompt"), _metric(gw, alias, "completion")) == (prompt, completion)


def test_a_blocked_chat_stream_gives_the_estimate_to_a_client_that_asked_for_usage(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    with _client(gw).chat.completions.stream(model="chat-usage", messages=[{"role": "user", "content": "hi"}],
                                             stream_options={"include_usage": True}) as stream:
        chunks = [event.chunk for event in stream if event.type == "chunk"]
        with pytest.raises(openai.ContentFilterFinishReasonError) as blocked:
            stream.get_final_completion()
    completion = blocked.value.completion
    assert completion is not None and completion.choices[0].finish_reason == "content_filter"
    assert SECRET not in (completion.choices[0].message.content or "")
    usage = completion.usage
    assert usage is not None  # was None: the upstream's usage chunk came after the block
    assert usage != openai.types.CompletionUsage(**UPSTREAM_USAGE)  # the gateway's estimate: the upstream's never came
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert chunks[-1].usage == usage and not chunks[-1].choices  # OpenAI's usage-only last chunk
    assert chunks[-1].id == "c1" and chunks[-1].model == chunks[0].model
    _billed(gw, caplog, "chat-usage", usage.prompt_tokens, usage.completion_tokens)


def test_a_blocked_chat_stream_shows_no_usage_to_a_client_that_did_not_ask(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    chunks = list(_client(gw).chat.completions.create(model="chat-quiet", stream=True,
                                                      messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert all(chunk.usage is None for chunk in chunks)
    line = access_line(caplog, "chat-quiet")  # billed the estimate all the same
    assert line["tokens_estimated"] is True and line["prompt_tokens"] > 0, line


def test_a_blocked_responses_stream_ends_with_the_estimate_as_its_usage(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.access")
    with _client(gw).responses.stream(model="resp-usage", input="hi") as stream:
        events = list(stream)
    last = events[-1]
    assert last.type == "response.incomplete", [event.type for event in events]
    response = last.response
    assert response.incomplete_details is not None and response.incomplete_details.reason == "content_filter"
    assert SECRET not in json.dumps(response.model_dump(mode="json"))
    usage = response.usage
    assert usage is not None  # was null: `response.created`'s
    assert (usage.input_tokens, usage.output_tokens) != (11, 17)  # the gateway's estimate: the upstream's never came
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0
    _billed(gw, caplog, "resp-usage", usage.input_tokens, usage.output_tokens)
