"""Upstream credentials and internal addresses never reach a client, on the paths that forward the upstream's own
bytes too; and a policy cannot hold a credential inline, in a header or in the query.

The end-to-end tests run the project's mock upstreams (tests/support/) with a few extra answers, each an error
that travels inside what the gateway forwards as it is: a Responses answer with `"status": "failed"`, the
stream's `response.failed` event, an `error` event, a 200 chat answer holding `{"error": ...}`. Each echoes the
gateway's own credential, an internal IP:port and internal host names, as a careless upstream does. The key is
shaped like no known key (no `sk-`, shorter than an opaque token), so only its removal by value, from the
environment variable the policy names, can take it out.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web

from gateway.errors import UpstreamError
from gateway.policy import PolicyError, compile_text
from gateway.providers.base import Call
from gateway.providers.gemini import GeminiProvider
from gateway.providers.openai_compat import OpenAICompatProvider
from gateway.providers.scrub import scrub_strings, scrubbed_error
from gateway.providers.streaming import ResponsesEvents
from gateway.sanitize import remove_secrets, sanitize_upstream_message
from gateway.schemas.endpoints import Endpoint
from gateway.schemas.events import DONE, Chunk, StreamError, UsageReport
from gateway.upstream.client import ConnectionGate
from tests.conftest import FULL_KEY, RunningGateway
from tests.support.mock_gemini import MockGemini, gemini_error
from tests.support.mock_upstream import ECHO_DETAIL, MockUpstream, responses_answer, sse

KEY = "plain-upstream-credential-42"  # not key-shaped: only the configured value can remove it
GEMINI_KEY = "gemini-credential-value-42"
INTERNAL = "10.0.0.5:8080"
LEAKS = (KEY, GEMINI_KEY, "10.0.0.5", "vllm-0.vllm-headless", "vllm-gpu-7", "gpu-worker-17", "example.com", "fd00::1")
CLEAN_FAILURE = "The model ran out of capacity; retry later."
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


def leak(key: str) -> str:
    """What the careless upstream says: the key it was sent, internal host names and addresses."""
    return ECHO_DETAIL.format(key=key) + f" Last tried {INTERNAL} with Bearer {key}."


def assert_clean(text: str) -> None:
    found = [secret for secret in LEAKS if secret in text]
    assert not found, (found, text)


# -- the mock upstreams, with errors inside what the gateway forwards -------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _stream(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in events:
        await response.write(event)
    await response.write_eof()
    return response


def _event(kind: str, sequence: int, **fields: Any) -> bytes:
    return f"event: {kind}\n".encode() + sse({"type": kind, "sequence_number": sequence, **fields})


def failed_response(body: dict[str, Any], message: str) -> dict[str, Any]:
    """The mock's Responses answer, failed as OpenAI reports it: status, an `error` object, no output."""
    answer = responses_answer({**body, "stream": False}, ["unused"], 1)
    assert isinstance(answer, dict)
    return {**answer, "status": "failed", "output": [], "error": {"code": "server_error", "message": message}}


class LeakyUpstream(MockUpstream):
    """The mock OpenAI upstream, plus (by model name) errors carried in a 200 answer or in the Responses stream:

    `leak-failed` a failed Responses answer (or a stream ending in `response.failed`) echoing `leak()`;
    `clean-failed` the same with a harmless message; `leak-error-event` / `leak-nested-error-event` the stream's
    `error` event, its message at the top or under `error`; `leak-error-body` a 200 chat answer `{"error": ...}`.
    Everything else is the mock's own behaviour (its authentication included)."""

    def _route(self, build: Any) -> Handler:
        handle = super()._route(build)

        async def route(request: web.Request) -> web.StreamResponse:
            body = await request.json()  # read again: aiohttp keeps the body the mock's middleware read
            model = body.get("model") if isinstance(body, dict) else None
            if not isinstance(model, str) or not model.startswith(("leak-", "clean-")):
                return await handle(request)
            message = leak(request.headers.get("Authorization", "").removeprefix("Bearer "))
            if model == "clean-failed":
                message = CLEAN_FAILURE
            if model == "leak-error-body":
                return web.json_response({"error": {"message": message, "type": "server_error", "param": None,
                                                    "code": None}})
            failed = failed_response(body, message)
            if not body.get("stream"):
                return web.json_response(failed)
            pending = {**failed, "status": "in_progress", "error": None, "usage": None}
            events = [_event("response.created", 0, response=pending),
                      _event("response.in_progress", 1, response=pending)]
            if model == "leak-error-event":
                events.append(_event("error", 2, code="server_error", message=message, param=None))
            elif model == "leak-nested-error-event":
                events.append(_event("error", 2, error={"type": "server_error", "code": None, "message": message}))
            else:
                events.append(_event("response.failed", 2, response=failed))
            return await _stream(request, events)

        return route


class LeakyGemini(MockGemini):
    """The mock Gemini API; model `leak-key` fails with an error that echoes its `x-goog-api-key`."""

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["call"].startswith("leak-key:"):
            return gemini_error(500, leak(request.headers.get("x-goog-api-key", "")))
        return await super()._generate(request)


def leaky_policy(openai_url: str, gemini_url: str) -> str:
    models = ("leak-failed", "clean-failed", "leak-error-event", "leak-nested-error-event", "leak-error-body")
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{_hash(FULL_KEY)}"}}
        providers:
          leaky: {{kind: openai, base_url: {openai_url}, api_key_env: LEAKY_KEY}}
          gemini: {{kind: gemini, base_url: {gemini_url}, api_key_env: LEAKY_GEMINI_KEY}}
        models:
          gemini-leak-key: {{provider: gemini, model: leak-key}}
        """) + "".join(f"  {model}: {{provider: leaky, model: {model}}}\n" for model in models)


def _hash(key: str) -> str:
    from gateway.auth.keys import hash_key

    return hash_key(key)


@pytest.fixture(scope="module")
def leaky() -> Iterator[RunningGateway]:
    with LeakyUpstream(api_key=KEY) as upstream, LeakyGemini(GEMINI_KEY) as gemini:
        running = RunningGateway(leaky_policy(upstream.base_url, gemini.base_url),
                                 {"LEAKY_KEY": KEY, "LEAKY_GEMINI_KEY": GEMINI_KEY}).start()
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture
def client(leaky: RunningGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=leaky.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def raw_stream(gateway: RunningGateway, path: str, body: dict[str, Any]) -> list[str]:
    """The `data:` payloads the client receives, as text (the closing `[DONE]` of a chat stream left out, and the
    `event:` line of a Responses event)."""
    with httpx.stream("POST", gateway.base_url + path, headers=AUTH, json=body, timeout=15) as response:
        assert response.status_code == 200
        text = response.read().decode()
    return [event.rpartition("\n")[2].removeprefix("data: ") for event in text.split("\n\n")
            if event and event != "data: [DONE]"]


# -- Responses API: a failed answer, streamed and not -----------------------------------------------------------


def test_a_failed_responses_answer_is_scrubbed_and_kept(client: openai.OpenAI) -> None:
    raw = client.responses.with_raw_response.create(model="leak-failed", input="hi")
    assert_clean(raw.text)
    answer = raw.parse()
    assert answer.status == "failed" and answer.id == "resp_mock1" and answer.output == []
    assert answer.error is not None and answer.error.code == "server_error"
    assert "Incorrect API key provided" in answer.error.message  # the useful part stays
    assert "[redacted]" in answer.error.message and "[host]" in answer.error.message
    assert answer.usage is not None and answer.usage.input_tokens == 1  # the rest of the body as it was


def test_a_response_failed_event_is_scrubbed_and_kept(client: openai.OpenAI, leaky: RunningGateway) -> None:
    events = list(client.responses.create(model="leak-failed", input="hi", stream=True))
    assert [event.type for event in events] == ["response.created", "response.in_progress", "response.failed"]
    failed = events[-1]
    assert failed.type == "response.failed" and failed.sequence_number == 2
    error = failed.response.error
    assert error is not None and error.code == "server_error" and failed.response.status == "failed"
    assert "Incorrect API key provided" in error.message and "[redacted]" in error.message
    assert_clean(error.message)
    payloads = raw_stream(leaky, "/responses", {"model": "leak-failed", "input": "hi", "stream": True})
    assert_clean("\n".join(payloads))
    assert json.loads(payloads[-1])["response"]["error"]["message"] == error.message


def test_a_clean_response_failed_event_keeps_its_bytes(leaky: RunningGateway) -> None:
    """Nothing to scrub: the event the client gets is the upstream's, byte for byte (never re-encoded)."""
    payloads = raw_stream(leaky, "/responses", {"model": "clean-failed", "input": "hi", "stream": True})
    failed = failed_response({"model": "clean-failed", "input": "hi"}, CLEAN_FAILURE)
    upstream_bytes = sse({"type": "response.failed", "sequence_number": 2, "response": failed}).decode()
    sent = json.loads(payloads[-1])
    assert sent["response"]["error"]["message"] == CLEAN_FAILURE
    assert "data: " + payloads[-1] + "\n\n" == upstream_bytes.replace(
        str(failed["created_at"]), str(sent["response"]["created_at"]))  # (the mock stamps the time per answer)
    answer = httpx.post(leaky.base_url + "/responses", headers=AUTH, json={"model": "clean-failed", "input": "hi"},
                        timeout=15)
    assert answer.json()["error"] == {"code": "server_error", "message": CLEAN_FAILURE}
    assert '"status": "failed"' in answer.text  # the mock's spacing: not re-encoded


@pytest.mark.parametrize("model", ["leak-error-event", "leak-nested-error-event"])
def test_a_responses_error_event_is_scrubbed(leaky: RunningGateway, model: str) -> None:
    payloads = raw_stream(leaky, "/responses", {"model": model, "input": "hi", "stream": True})
    assert_clean("\n".join(payloads))
    error = json.loads(payloads[-1])["error"]
    assert "Incorrect API key provided" in error["message"], error  # the nested message is read, scrubbed


def test_a_chat_answer_holding_an_error_object_is_scrubbed(leaky: RunningGateway) -> None:
    """A 200 that is an error object is the upstream's failure (a 502, retried and fallen back from, never cached or
    billed: it was passed on as an answer), its message scrubbed."""
    response = httpx.post(leaky.base_url + "/chat/completions", headers=AUTH, timeout=15,
                          json={"model": "leak-error-body", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502, response.text
    assert_clean(response.text)
    assert "answered 200 with an error: Incorrect API key provided" in response.json()["error"]["message"]


def test_a_gemini_error_echoing_its_key_header_is_scrubbed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gemini-leak-key", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert_clean(caught.value.response.text)
    assert "Incorrect API key provided" in caught.value.response.text


# -- the scrub itself: only what changes is re-encoded ----------------------------------------------------------


class _Host:
    name = "up"

    def release(self) -> None:
        pass

    def sanitize(self, message: object) -> str:
        return sanitize_upstream_message(message, secrets=(KEY,))

    def unsecret(self, text: str) -> str:
        return remove_secrets(text, (KEY,))


def test_responses_events_keep_their_bytes_unless_an_error_needs_scrubbing() -> None:
    events = ResponsesEvents(_Host())
    delta = b'{"type":"response.output_text.delta","delta":"at 10.0.0.5 with ' + KEY.encode() + b'"}'
    assert [e.payload for e in events.feed(delta) if isinstance(e, Chunk)] == [delta]  # content is not an error
    usage = b'"usage":{"input_tokens":3,"output_tokens":2,"total_tokens":5}'
    clean = b'{"type":"response.failed","response":{"status":"failed","error":{"code":"x","message":"busy"},' + \
        usage + b'}}'
    chunk, report, done = events.feed(clean)  # (the response's last event: the stream ends there)
    assert isinstance(chunk, Chunk) and chunk.payload is clean and isinstance(report, UsageReport) and done is DONE
    dirty = clean.replace(b"busy", b"key " + KEY.encode() + b" at " + INTERNAL.encode())
    chunk, report, done = events.feed(dirty)
    assert isinstance(chunk, Chunk) and isinstance(report, UsageReport) and report.usage.total_tokens == 5
    sent = json.loads(chunk.payload)
    assert sent["response"]["error"] == {"code": "x", "message": "key [redacted] at [address]"}
    assert sent["response"]["usage"]["total_tokens"] == 5 and sent["type"] == "response.failed"
    (error,) = events.feed(b'{"type":"error","error":{"message":"bad ' + KEY.encode() + b'"}}')
    assert isinstance(error, StreamError) and KEY not in error.error.message and "bad [redacted]" in error.error.message


def test_scrubbed_error_scrubs_the_error_and_takes_only_credentials_from_the_rest() -> None:
    sanitize = _Host().sanitize
    unsecret = partial(remove_secrets, secrets=[KEY])
    body = json.dumps({"id": "x", "error": {"message": "no", "code": 5, "inner": {"detail": [f"via {INTERNAL}"]}},
                       "note": f"via {INTERNAL}", "detail": f"key {KEY}"}).encode()
    out = json.loads(scrubbed_error(body, sanitize, unsecret))
    assert out["error"] == {"message": "no", "code": 5, "inner": {"detail": ["via [address]"]}}
    assert out["note"] == f"via {INTERNAL}"  # beside the error: only the credentials go
    assert out["detail"] == "key [redacted]"
    for same in (b'{"error":null}', b'{"error":{"message":"no"}}', b'{"finish_reason":"error"}', b'{"error":3}'):
        assert scrubbed_error(same, sanitize, unsecret) is same
    assert json.loads(scrubbed_error(b'{"error":"key ' + KEY.encode() + b'"}', sanitize, unsecret)) == {
        "error": "key [redacted]"}
    nested: Any = "deep"
    for _ in range(20):
        nested = [nested]
    value = {"error": nested}
    assert scrub_strings(value, sanitize)  # an upstream controls the nesting: what is too deep goes
    assert "deep" not in json.dumps(value)
    many: dict[str, Any] = {"error": {"message": f"at {INTERNAL}", "details": [f"via {INTERNAL}"] * 1000}}
    assert scrub_strings(many, sanitize)  # and the size: past the first strings, every one goes
    assert many["error"]["message"] == "at [address]" and many["error"]["details"][0] == "via [address]"
    assert many["error"]["details"][-1] == "" and INTERNAL not in json.dumps(many)


# -- policies: credentials never inline ----------------------------------------------------------------------------

POLICY = """\
version: 1
auth: none
providers:
  up:
    kind: {kind}
    base_url: https://api.example.com/v1
{extra}
models:
  chat: {{provider: up, model: m}}
"""


def policy_issues(kind: str, extra: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        compile_text(POLICY.format(kind=kind, extra=extra), "p.yaml", {})
    return [str(issue) for issue in caught.value.issues]


@pytest.mark.parametrize(
    ("kind", "extra", "expected"),
    [
        ("gemini", "    headers: {x-goog-api-key: AIzaInline}", "p.yaml:7: providers.up.headers.x-goog-api-key: "),
        ("openai", "    headers: {Cookie: session=abc}", "p.yaml:7: providers.up.headers.Cookie: "),
        ("azure", "    headers:\n      x-ms-client-name: gw\n      Ocp-Apim-Subscription-Key: abc123",
         "p.yaml:9: providers.up.headers.Ocp-Apim-Subscription-Key: "),
        ("openai", "    headers: {X-Client-Secret: abc}", "p.yaml:7: providers.up.headers.X-Client-Secret: "),
        ("openai", "    headers: {X_Functions_Key: abc}", "p.yaml:7: providers.up.headers.X_Functions_Key: "),
        ("openai", "    headers: {X-Upstream: Bearer abc}", "p.yaml:7: providers.up.headers.X-Upstream: "),
        # the provider's own key header, whatever it is called, is a secret
        ("openai", "    api_key_header: X-Portal\n    headers: {x-portal: abc}",
         "p.yaml:8: providers.up.headers.x-portal: "),
        ("anthropic", "    headers: {X-Api-Key: abc}", "p.yaml:7: providers.up.headers.X-Api-Key: "),
    ],
)
def test_an_inline_secret_header_is_refused_where_it_is(kind: str, extra: str, expected: str) -> None:
    found = policy_issues(kind, extra)
    assert any(issue.startswith(expected + "put secrets in headers_env") for issue in found), found


@pytest.mark.parametrize(
    ("kind", "param", "line"),
    [("gemini", "key", 9), ("openai", "api_key", 9), ("openai", "access_token", 9), ("azure", "sig", 9),
     ("openai", "apiKey", 9), ("openai", "X-Secret", 9)],
)
def test_an_inline_secret_query_parameter_is_refused_where_it_is(kind: str, param: str, line: int) -> None:
    found = policy_issues(kind, f"    query:\n      alt: sse\n      {param}: AIzaSyInlineValue")
    expected = f"p.yaml:{line}: providers.up.query.{param}: put secrets in environment variables, not inline"
    assert [issue for issue in found if issue.startswith(expected)], found
    assert not any(".query.alt" in issue for issue in found)
    if kind == "gemini":
        assert any("api_key_env sends `x-goog-api-key`" in issue for issue in found), found


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("openai", "    headers: {X-Beta: '1', Cache-Control: no-store, OpenAI-Organization: org-1, X-Keep: a}"),
        ("azure", "    headers: {x-ms-client-name: llm-gateway}\n    query: {api-version: '2024-10-21'}"),
        ("gemini", "    query: {alt: sse, keyword: x}"),
        ("anthropic", "    headers: {anthropic-beta: prompt-caching-2024-07-31}"),
    ],
)
def test_ordinary_headers_and_query_parameters_stay_allowed(kind: str, extra: str) -> None:
    compile_text(POLICY.format(kind=kind, extra=extra), "p.yaml", {})


def test_the_key_header_of_every_kind_is_a_scrubbed_secret() -> None:
    extra = "    api_key_env: G_KEY\n    headers_env: {Cookie: G_COOKIE, X-Other: G_OTHER}"
    policy = compile_text(POLICY.format(kind="gemini", extra=extra), "p.yaml",
                          {"G_KEY": GEMINI_KEY, "G_COOKIE": "session=cookie-value-1", "G_OTHER": "other-value-1"})
    config = policy.providers["up"]
    assert config.headers["x-goog-api-key"] == GEMINI_KEY
    assert set(config.secrets) == {GEMINI_KEY, "session=cookie-value-1", "other-value-1"}
    provider = GeminiProvider(config, ConnectionGate("up", 1, 1.0, None))
    message = provider.sanitize(f"bad key {GEMINI_KEY} (cookie session=cookie-value-1) at {INTERNAL}, other-value-1")
    assert message == "bad key [redacted] (cookie [redacted]) at [address], [redacted]"


@pytest.mark.parametrize("read_choices", [False, True])
@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES])
def test_a_complete_answer_keeps_its_bytes_unless_its_error_needs_scrubbing(endpoint: Endpoint,
                                                                             read_choices: bool) -> None:
    """Whether a stage reads the answer's text or not (two decoders), and for every endpoint."""
    extra = "    api_key_env: UP_KEY"
    config = compile_text(POLICY.format(kind="openai", extra=extra), "p.yaml", {"UP_KEY": KEY}).providers["up"]
    provider = OpenAICompatProvider(config, ConnectionGate("up", 1, 1.0, None))
    call = Call(endpoint, {}, False, "req-1", read_choices=read_choices)
    clean = b'{"id":"a","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    assert provider._completion(call, clean).body is clean
    failed = b'{"id":"a","error":{"message":"key ' + KEY.encode() + b' at ' + INTERNAL.encode() + b'"},"usage":null}'
    if endpoint is not Endpoint.RESPONSES:  # a 200 that is an error: the upstream's failure, scrubbed
        with pytest.raises(UpstreamError) as caught:
            provider._completion(call, failed)
        assert caught.value.message == "upstream `up` answered 200 with an error: key [redacted] at [address]"
        return
    answer = provider._completion(call, failed)
    assert json.loads(answer.body) == {"id": "a", "error": {"message": "key [redacted] at [address]"}, "usage": None}
