"""An upstream 200 whose `choices` is empty is not stored (H49): it was, and served from the cache for the entry's TTL.

A stream without a choice is no answer (not stored: `entry.holds_answer`; live, a lone [DONE] falls back), but a
complete `{"choices": []}` passed `holds_answer` (a list of objects, none) and was replayed to every identical
request. It needs a choice now: not stored (`uncacheable`), and one stored before is read as corrupt (a miss).
"""

from __future__ import annotations

import asyncio
import socket
import textwrap
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.cache.entry import Entry, NotAnAnswer, encode_entry, holds_answer, load_entry, pack_entry
from gateway.schemas.endpoints import Endpoint
from tests.conftest import FULL_KEY, RunningGateway

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


class Upstream:
    """Answers `{"choices": []}` while `empty`, a normal answer after; counts its calls."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.empty = True
        self.calls = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls += 1
        choices = [] if self.empty else [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "Paris."}}]
        return web.json_response({"id": "chatcmpl-e", "object": "chat.completion", "created": 1, "model": "m",
                                  "choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 0,
                                                                "total_tokens": 5}})

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
            """), {"UP_KEY": "sk-up-h49-000000"}).start()
        try:
            yield gw, upstream
        finally:
            gw.stop()


def test_an_answer_without_a_choice_is_not_stored(served: tuple[RunningGateway, Upstream]) -> None:
    gw, upstream = served
    body = {"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
    first = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    assert first.status_code == 200 and first.json()["choices"] == []
    upstream.empty = False  # the upstream answers again
    second = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    # was: x-gateway-cache "hit", choices [] again, no upstream call (and so until the TTL ran out)
    assert second.headers["x-gateway-cache"] == "miss" and second.json()["choices"]
    assert upstream.calls == 2
    metrics = gw.metrics()
    assert 'gateway_cache_stores_total{model="chat",outcome="uncacheable"} 1.0' in metrics
    assert 'gateway_cache_stores_total{model="chat",outcome="stored"} 1.0' in metrics  # the answer with a choice
    third = httpx.post(f"{gw.base_url}/chat/completions", json=body, headers=AUTH, timeout=20)
    assert third.headers["x-gateway-cache"] == "hit" and upstream.calls == 2


@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.COMPLETIONS])
async def test_a_body_without_a_choice_is_no_answer_to_store_nor_to_serve(endpoint: Endpoint) -> None:
    empty = Entry("body", 0, body=b'{"id":"x","object":"text_completion","choices":[]}')
    assert not holds_answer(empty, endpoint)
    with pytest.raises(NotAnAnswer):
        await pack_entry(empty, 1024, 1 << 20, endpoint)
    assert await load_entry(encode_entry(empty, 1024) or b"", endpoint) is None  # stored before: a miss
    one = Entry("body", 0, body=b'{"id":"x","choices":[{"index":0,"text":"a","finish_reason":"stop"}]}')
    assert holds_answer(one, endpoint) and await load_entry(encode_entry(one, 1024) or b"", endpoint) == one
