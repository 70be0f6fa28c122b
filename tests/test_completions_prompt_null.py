"""`prompt: null` on /v1/completions: the OpenAI API allows it (nullable; the model then reads `<|endoftext|>`, a
document's start). The gateway refused it with a 400; it forwards it now, counts it as no prompt tokens, and the
guards and the caches (exact and semantic) take it without failing.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway, free_port
from tests.support.mock_upstream import MockUpstream

HEADERS = {"Authorization": f"Bearer {FULL_KEY}"}
TEXT = "Once upon a time"


class Recorder:
    """An OpenAI-compatible completions upstream that takes any prompt (null too), records each body, and reports
    no usage (so the gateway bills its own count of the prompt)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        base = {"id": "cmpl-rec", "object": "text_completion", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            choice = {"index": 0, "text": TEXT, "logprobs": None, "finish_reason": "stop"}
            return web.json_response({**base, "choices": [choice]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text, reason in ((TEXT, None), ("", "stop")):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            await response.write(f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    def start(self) -> Recorder:
        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/completions", self._answer)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    running = Recorder().start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def gw(recorder: Recorder, upstream: MockUpstream) -> Iterator[RunningGateway]:
    policy = textwrap.dedent(f"""\
        version: 1
        server: {{access_log: true}}
        auth: keys
        keys:
          - {{name: main, tenant: acme, hash: "{hash_key(FULL_KEY)}", limits: {{tpm: 100000}}}}
        providers:
          rec: {{kind: openai, base_url: {recorder.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          mock: {{kind: openai, base_url: {upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        prices:
          base-model: {{input_per_mtok: 1, output_per_mtok: 2}}
          text-embedding-3-small: {{input_per_mtok: 1, output_per_mtok: 1}}
        models:
          plain: {{provider: rec, model: base-model}}
          guarded: {{provider: rec, model: base-model, cache: {{}}}}
          similar: {{provider: rec, model: base-model, cache: {{semantic: {{embeddings: embed, threshold: 0.8}}}}}}
          embed: {{provider: mock, model: text-embedding-3-small}}
        tenants:
          acme:
            budget: {{usd: 10, period: day, mode: hard}}
        guards:
          models:
            guarded:
              pii: {{kind: pii, engine: patterns}}
              secrets: {{kind: secrets}}
              injection: {{kind: injection}}
              deny: {{kind: denylist, terms: [project falcon]}}
              size: {{kind: limits, max_chars: 1000, max_messages: 4, max_tokens: 1000}}
        """)
    running = RunningGateway(policy, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _complete(gw: RunningGateway, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": None, "max_tokens": 5, "temperature": 0, **extra}  # (temperature 0: cached)
    with httpx.stream("POST", gw.base_url + "/completions", headers=HEADERS, json=body, timeout=30) as response:
        response.read()
    return response


def test_a_null_prompt_is_forwarded_and_counted_as_no_tokens(
    gw: RunningGateway, recorder: Recorder, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("INFO", logger="gateway.access"):
        response = _complete(gw, "plain")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == TEXT
    assert "prompt" in recorder.bodies[-1] and recorder.bodies[-1]["prompt"] is None
    (record,) = [r.fields for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    assert record["tokens_estimated"] is True and record["prompt_tokens"] == 0, record


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["guarded", "similar"])
def test_a_null_prompt_passes_the_guards_and_the_caches(
    gw: RunningGateway, recorder: Recorder, model: str, stream: bool,
) -> None:
    for _ in range(2):
        response = _complete(gw, model, stream=stream)
        assert response.status_code == 200, response.text
        assert TEXT in response.text
    assert response.headers["x-gateway-cache"] == "hit"  # the second time, the answer stored
    assert recorder.bodies[-1]["prompt"] is None
