"""An Anthropic or Gemini upstream whose usage holds counts that are no counts (a string, a negative number) is billed
at the gateway's own count, as an answer without usage is (and as an OpenAI-shaped answer with negative counts is):
the translations read such a count as 0, which made a valid usage of nothing, and the answer cost nothing.

Through a real gateway against a small upstream of each kind (`ThreadedApp`) that answers with the usage its model
name picks, complete or streamed; prices, and a budget on the key so that every answer goes through the bill.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.threaded_app import ThreadedApp

KEY = "gw-invalid-usage-key-0000000000000000000000"
TEXT = "hello there, this is a short answer of some words"
ANTHROPIC = {"string": {"input_tokens": "a", "output_tokens": 7}, "negative": {"input_tokens": -5, "output_tokens": -9},
             "valid": {"input_tokens": 12, "output_tokens": 7}}
GEMINI = {"string": {"promptTokenCount": "a", "candidatesTokenCount": 7},
          "negative": {"promptTokenCount": 12, "candidatesTokenCount": -100},
          "valid": {"promptTokenCount": 12, "candidatesTokenCount": 7, "totalTokenCount": 19}}


class Upstreams(ThreadedApp):
    """Anthropic's `/v1/messages` and Gemini's `generateContent` / `streamGenerateContent`, usage by model name."""

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1beta/models/{call}", self._generate)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        usage = ANTHROPIC[body["model"]]
        message = {"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                   "stop_reason": "end_turn", "stop_sequence": None, "content": [{"type": "text", "text": TEXT}],
                   "usage": usage}
        if not body.get("stream"):
            return web.json_response(message)
        started = {**message, "content": [], "stop_reason": None,
                   "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1}}
        events = [("message_start", {"message": started}),
                  ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                  ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TEXT}}),
                  ("content_block_stop", {"index": 0}),
                  ("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": usage["output_tokens"]}}),
                  ("message_stop", {})]
        return await _sse(request, [f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"
                                    for kind, data in events])

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": TEXT}]}, "finishReason": "STOP",
                                  "index": 0}], "usageMetadata": GEMINI[model], "modelVersion": model}
        if method == "generateContent":
            return web.json_response(answer)
        return await _sse(request, [f"data: {json.dumps(answer)}\r\n\r\n"])


async def _sse(request: web.Request, events: list[str]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(event.encode())
    await response.write_eof()
    return response


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with Upstreams() as upstreams:
        price = "{input_per_mtok: 1000000, output_per_mtok: 1000000}"
        models = "".join(f"  {kind}-{name}: {{provider: {kind}, model: {name}}}\n"
                         for kind in ("ant", "gem") for name in ANTHROPIC)
        prices = "".join(f"  {kind}/{name}: {price}\n" for kind in ("ant", "gem") for name in ANTHROPIC)
        policy = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}", budget: {{usd: 100000}}}}
            providers:
              ant: {{kind: anthropic, base_url: "http://127.0.0.1:{upstreams.port}/v1", api_key_env: ANT_KEY}}
              gem: {{kind: gemini, base_url: "http://127.0.0.1:{upstreams.port}/v1beta", api_key_env: GEM_KEY}}
            """) + "models:\n" + models + "prices:\n" + prices
        running = RunningGateway(policy, {"ANT_KEY": "sk-ant-test", "GEM_KEY": "gemini-test"}).start()
        yield running
        running.stop()


def _cost(gw: RunningGateway, alias: str, stream: bool) -> float:
    body: dict[str, Any] = {"model": alias, "max_tokens": 50, "stream": stream,
                            "messages": [{"role": "user", "content": "hello, how are you today?"}]}
    if not stream:
        answer = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                            json=body, timeout=20)
        assert answer.status_code == 200, answer.text
        assert TEXT in answer.text
        return float(answer.headers["x-gateway-cost-usd"])
    before = _spent(gw)
    with httpx.stream("POST", gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json=body, timeout=20) as answer:
        assert answer.status_code == 200
        assert "hello there" in answer.read().decode()
    for _ in range(50):  # (settled as the stream ends: just after its last bytes)
        spent = _spent(gw) - before
        if spent:
            return spent
        time.sleep(0.1)
    return 0.0


def _spent(gw: RunningGateway) -> float:
    """The key's spend so far, from its budget's remaining dollars (streams carry no cost header), waited for: a
    stream's bill is settled as it ends, just after its last bytes."""
    for _ in range(50):
        for line in gw.metrics().splitlines():
            if line.startswith('gateway_budget_remaining_usd{name="main",scope="key"}'):
                return 100000 - float(line.rsplit(" ", 1)[1])
        time.sleep(0.1)
    raise AssertionError("no budget gauge")


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
@pytest.mark.parametrize("kind", ["ant", "gem"])
def test_invalid_counts_are_billed_at_the_gateways_own_count(gw: RunningGateway, kind: str, stream: bool) -> None:
    valid = _cost(gw, f"{kind}-valid", stream)
    assert valid == pytest.approx(19.0)  # 12 + 7 tokens at $1 each: the upstream's own figures
    for name in ("string", "negative"):
        cost = _cost(gw, f"{kind}-{name}", stream)
        assert cost >= 10, (name, cost)  # the prompt's and the answer's estimate (about 20 tokens), never 0
