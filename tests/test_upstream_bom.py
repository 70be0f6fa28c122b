"""A complete JSON answer that an OpenAI-compatible upstream starts with a UTF-8 byte order mark (EF BB BF).

JSON text has no BOM, but RFC 8259 (8.1) lets a parser ignore one, and some servers and proxies write one (a
.NET or PowerShell front, a file served as the answer). It was a 502 ("invalid JSON"); it is now the answer,
passed to the client without the mark. The mark is looked for only once the answer failed to decode, so answers
without one cost nothing more; one mark is dropped, not two, and what follows it must still be JSON.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.errors import UpstreamError
from gateway.providers.base import Call
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.schemas.endpoints import Endpoint
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

BOM = b"\xef\xbb\xbf"
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
CHAT = {"id": "chatcmpl-bom", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello ü"}, "finish_reason": "stop"}],
        "usage": USAGE}
RESPONSE = {"id": "resp_bom", "object": "response", "created_at": 1, "status": "completed", "model": "m",
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}}
EMBEDDINGS = {"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
              "usage": {"prompt_tokens": 1, "total_tokens": 1}}


class _Upstream(ThreadedApp):
    """An OpenAI-compatible upstream in a thread of its own that answers every request with `self.body`, as
    application/json, in one write."""

    def __init__(self) -> None:
        super().__init__()
        self.body = b"{}"

    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=self.body, content_type="application/json")

        for path in ("/v1/chat/completions", "/v1/responses", "/v1/embeddings"):
            app.router.add_post(path, handle)


@pytest.fixture(scope="module")
def bom_upstream() -> Iterator[_Upstream]:
    with _Upstream() as running:
        yield running


@pytest.fixture(scope="module")
def served(bom_upstream: _Upstream) -> Iterator[RunningGateway]:
    text = textwrap.dedent(f"""\
        version: 1
        server: {{host: 127.0.0.1}}
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          bom:
            kind: openai
            base_url: http://127.0.0.1:{bom_upstream.port}/v1
            api_key_env: MOCK_UPSTREAM_KEY
            timeouts: {{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 10}}
        models:
          plain: {{provider: bom, model: m}}
        """)
    running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": "sk"}).start()
    yield running
    running.stop()


def _json(answer: dict[str, Any]) -> bytes:
    return json.dumps(answer, ensure_ascii=False).encode()


INVALID = (  # a mark makes no invalid answer valid:
    BOM + b'{"id": "chatcmpl-broken", "choices": [',  # what follows it is still read as JSON
    BOM + BOM + _json(CHAT),  # one mark, not any number of them
    BOM,
    _json(CHAT)[:1] + BOM + _json(CHAT)[1:],  # a mark anywhere else is no mark
)


def _client(served: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=10)


def test_a_chat_answer_after_a_bom_is_the_answer_and_nothing_else_is(
        bom_upstream: _Upstream, served: RunningGateway) -> None:
    bom_upstream.body = BOM + _json(CHAT)
    completion = _client(served).chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello ü"
    assert completion.usage is not None and completion.usage.total_tokens == 5
    reply = httpx.post(served.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                       json={"model": "plain", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.content[:1] == b"{"  # the mark is not passed on: a strict client's parser refuses it
    assert json.loads(reply.content)["choices"] == CHAT["choices"]
    for body in INVALID:
        bom_upstream.body = body
        with pytest.raises(openai.APIStatusError) as raised:
            _client(served).chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.status_code == 502 and "invalid JSON" in raised.value.message, body


def test_a_responses_answer_after_a_bom_is_the_answer(bom_upstream: _Upstream, served: RunningGateway) -> None:
    bom_upstream.body = BOM + _json(RESPONSE)
    response = _client(served).responses.create(model="plain", input="hi")
    assert response.output_text == "Hello" and response.usage is not None and response.usage.total_tokens == 5


def test_an_embeddings_answer_after_a_bom_is_the_answer(bom_upstream: _Upstream, served: RunningGateway) -> None:
    bom_upstream.body = BOM + _json(EMBEDDINGS)
    embedded = _client(served).embeddings.create(model="plain", input="hi")
    assert embedded.data[0].embedding == [0.5, 0.25]


@pytest.mark.parametrize(("endpoint", "answer"), [(Endpoint.CHAT, CHAT), (Endpoint.RESPONSES, RESPONSE),
                                                  (Endpoint.EMBEDDINGS, EMBEDDINGS)])
def test_the_completion_is_the_answer_without_its_bom(endpoint: Endpoint, answer: dict[str, Any]) -> None:
    provider: Any = SimpleNamespace(name="p", _completion=lambda call, body: completion(provider, call, body))
    completion = OpenAICompatProvider._completion
    call = Call(endpoint, {}, False, "r")
    body = _json(answer)
    assert completion(provider, call, BOM + body).body == body
    assert completion(provider, call, body).body == body
    with pytest.raises(UpstreamError, match="invalid JSON"):
        completion(provider, call, BOM + BOM + body)
