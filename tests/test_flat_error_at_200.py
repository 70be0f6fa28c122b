"""A 200 answer that is the flat OpenAI-compatible error (vLLM before 0.10 and other servers) is the upstream's failure.

Some OpenAI-compatible servers write an error flat, `{"object": "error", "message": ..., "type": ..., "code": ...}`,
with no `error` key, and a few answer one with a 200. Mid-stream it was read already (`ResponsesEventScrubPeek`,
`openai_chunks`). A complete answer was passed to the client byte for byte (chat, completions, embeddings,
Responses: the upstream's key and internal URL echoed in the message included), and the Anthropic ingress, which
translates a chat answer, made of it an empty successful Message. Now it is treated as a 200 holding
`{"error": {...}}` is: a 502 whose message is scrubbed, never the upstream's body. On the Responses endpoint a
`{"error": {...}}` answer is a failed Response, passed on scrubbed; a flat error is no Response at all (its `object`
is not `response`), so it is the 502 there too, as it is inside a Responses stream. The same code serves
`kind: azure`.
"""

from __future__ import annotations

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
from gateway.errors import UpstreamError
from gateway.policy import compile_text
from gateway.providers.base import Call
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.schemas.endpoints import Endpoint
from gateway.upstream.client import ConnectionGate
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

SECRET = "sk-upstream-test-LONGSECRET123"
INTERNAL = "http://10.1.2.3:8000/x"
LEAKS = (SECRET, "LONGSECRET123", "10.1.2.3")
MESSAGE = f"bad key {SECRET} at {INTERNAL}"
FLAT = {"object": "error", "message": MESSAGE, "type": "BadRequestError", "param": None, "code": 400}
NESTED = {"error": {"message": MESSAGE, "type": "BadRequestError", "param": None, "code": 400}}
USER = [{"role": "user", "content": "hi"}]


class _Upstream(ThreadedApp):
    """OpenAI's four endpoints, and Azure's deployments: model `flat` answers `FLAT` with a 200, `nested` `NESTED`."""

    def routes(self, app: web.Application) -> None:
        for path in ("chat/completions", "completions", "embeddings", "responses"):
            app.router.add_post(f"/v1/{path}", self._answer)
            app.router.add_post(f"/openai/deployments/{{deployment}}/{path}", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        model = request.match_info.get("deployment") or (await request.json())["model"]
        return web.json_response(FLAT if model == "flat" else NESTED)


@pytest.fixture(scope="module")
def served() -> Iterator[RunningGateway]:
    with _Upstream() as wire:
        url = f"http://127.0.0.1:{wire.port}"
        text = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
            providers:
              oa: {{kind: openai, base_url: "{url}/v1", api_key_env: UP_KEY}}
              az: {{kind: azure, base_url: "{url}", api_key_env: UP_KEY}}
            models:
              oa-flat: {{provider: oa, model: flat}}
              oa-nested: {{provider: oa, model: nested}}
              az-flat: {{provider: az, model: flat}}
              az-nested: {{provider: az, model: nested}}
            """)
        running = RunningGateway(text, {"UP_KEY": SECRET}).start()
        yield running
        running.stop()


def _client(served: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=15)


def _call(client: openai.OpenAI, endpoint: str, model: str) -> Any:
    if endpoint == "chat":
        return client.chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
    if endpoint == "completions":
        return client.completions.create(model=model, prompt="hi")
    if endpoint == "embeddings":
        return client.embeddings.create(model=model, input="hi")
    return client.responses.create(model=model, input="hi")


def _assert_clean(response: httpx.Response) -> None:
    seen = response.text + "\n" + "\n".join(f"{name}: {value}" for name, value in response.headers.items())
    found = [leak for leak in LEAKS if leak in seen]
    assert not found, (found, seen)


@pytest.mark.parametrize(("endpoint", "provider"), [
    *((endpoint, provider) for endpoint in ("chat", "completions", "embeddings") for provider in ("oa", "az")),
    ("responses", "oa"),  # (`kind: azure` serves no /v1/responses)
])
def test_a_flat_error_at_200_is_the_upstreams_failure_scrubbed(served: RunningGateway, endpoint: str,
                                                               provider: str) -> None:
    client = _client(served)
    with pytest.raises(openai.APIStatusError) as flat:
        _call(client, endpoint, f"{provider}-flat")
    _assert_clean(flat.value.response)
    assert flat.value.status_code == 502, flat.value.response.text
    assert '"object":"error"' not in flat.value.response.text.replace(" ", "")  # not the upstream's body
    assert "answered 200 with an error: bad key [redacted]" in flat.value.message, flat.value.message
    if endpoint == "responses":  # `{"error": ...}` is a failed Response there, passed on scrubbed (module doc)
        return
    with pytest.raises(openai.APIStatusError) as nested:  # the status `{"error": {...}}` at 200 gets
        _call(client, endpoint, f"{provider}-nested")
    assert flat.value.status_code == nested.value.status_code
    assert flat.value.message == nested.value.message


@pytest.mark.parametrize("provider", ["oa", "az"])
def test_a_messages_client_gets_the_error_not_an_empty_message(served: RunningGateway, provider: str) -> None:
    client = anthropic.Anthropic(base_url=served.url, api_key=FULL_KEY, max_retries=0, timeout=15)
    with pytest.raises(anthropic.APIStatusError) as flat:
        client.messages.create(model=f"{provider}-flat", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    _assert_clean(flat.value.response)
    with pytest.raises(anthropic.APIStatusError) as nested:
        client.messages.create(model=f"{provider}-nested", max_tokens=10, messages=USER)  # type: ignore[arg-type]
    assert type(flat.value) is type(nested.value)
    assert flat.value.status_code == nested.value.status_code == 502
    assert "bad key [redacted]" in flat.value.message


POLICY = """\
version: 1
auth: none
providers:
  up: {kind: openai, base_url: "https://api.example.com/v1", api_key_env: UP_KEY}
models:
  chat: {provider: up, model: m}
"""


@pytest.mark.parametrize("read_choices", [False, True])
@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_every_peek_reads_the_flat_error(endpoint: Endpoint, read_choices: bool) -> None:
    """Whether a stage reads the answer's text or not (two decoders, the second the fallback of the first), and for
    every endpoint; an answer's own `object` keeps its bytes, an unusual one too."""
    config = compile_text(POLICY, "p.yaml", {"UP_KEY": SECRET}).providers["up"]
    provider = OpenAICompatProvider(config, ConnectionGate("up", 1, 1.0, None))
    call = Call(endpoint, {}, False, "req-1", read_choices=read_choices)
    for flat in (FLAT, {**FLAT, "choices": [{"index": [0]}]}, {"object": "error", "message": 5}):
        with pytest.raises(UpstreamError) as caught:
            provider._completion(call, json.dumps(flat).encode())
        assert caught.value.status == 502
        assert caught.value.message.startswith("upstream `up` answered 200 with an error: ")
        assert not [leak for leak in LEAKS if leak in caught.value.message], caught.value.message
    for kind in (b'"chat.completion"', b'"response"', b'"list"', b'{"odd":1}', b"null"):
        answer = b'{"object":' + kind + b',"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,' \
            b'"total_tokens":2}}'
        assert provider._completion(call, answer).body is answer
