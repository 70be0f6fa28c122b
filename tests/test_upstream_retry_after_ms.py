"""An upstream's `retry-after-ms`, passed on beside `Retry-After`, and read for the gateway's own retry wait.

OpenAI (and Azure OpenAI) send `retry-after-ms` beside `retry-after` on a 429; the openai and anthropic SDKs read it
first. The gateway read only `Retry-After`: a client was told whole seconds at best (a 250 ms wait became "wait 1 s"),
nothing at all when the upstream sent only the finer header, and the gateway's own retry of the target waited the
rounded-up second too. Now the upstream's wait is read from `retry-after-ms` first (a non-negative decimal number of
milliseconds, strictly read, as `Retry-After` is), passed on in both headers (whole seconds rounded up, and
milliseconds), both capped at a day, and the retry's back-off waits the finer value.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from gateway.providers.openai_compat import status_error
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

USER = [{"role": "user", "content": "hi"}]
COMPLETION = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class _Upstream(ThreadedApp):
    """OpenAI's chat endpoint and Anthropic's Messages: each model answers its script's statuses in turn (the last
    one again after), with the script's headers; `seen` keeps when each request came."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.seen: dict[str, list[float]] = {}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/messages", self._answer)
        app.router.add_post("/v1beta/models/{call}", self._answer)

    async def _answer(self, request: web.Request) -> web.Response:
        model = request.match_info["call"].split(":")[0] if "call" in request.match_info else (
            await request.json())["model"]
        seen = self.seen.setdefault(model, [])
        seen.append(time.monotonic())
        script = self.scripts[model]
        status, headers = script[min(len(seen), len(script)) - 1]
        headers = dict(headers)  # (the script's own is read again by the next request)
        if status == 200:
            return web.Response(body=json.dumps(COMPLETION), content_type="application/json")
        if "delay" in headers:  # Google's 429: its wait in the body alone (`RetryInfo.retryDelay`)
            body: dict[str, Any] = {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "quota",
                                              "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                                           "retryDelay": headers.pop("delay")}]}}
        elif request.path.endswith("/messages"):
            kind = "overloaded_error" if status == 529 else "rate_limit_error"
            body = {"type": "error", "error": {"type": kind, "message": "slow down"}}
        else:
            body = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
        return web.Response(status=status, body=json.dumps(body), content_type="application/json", headers=headers)


@pytest.fixture(scope="module")
def wire() -> Iterator[_Upstream]:
    with _Upstream() as running:
        yield running


@pytest.fixture(scope="module")
def served(wire: _Upstream) -> Iterator[RunningGateway]:
    url = f"http://127.0.0.1:{wire.port}/v1"
    timeouts = "{connect_s: 2, first_byte_s: 5, idle_s: 5, total_s: 20}"
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          oa: {{kind: openai, base_url: "{url}", api_key_env: UP_KEY, timeouts: {timeouts}}}
          an: {{kind: anthropic, base_url: "{url}", api_key_env: UP_KEY, timeouts: {timeouts}}}
          ge: {{kind: gemini, base_url: "http://127.0.0.1:{wire.port}/v1beta", api_key_env: UP_KEY,
               timeouts: {timeouts}}}
        models:
          fine: {{provider: oa, model: fine}}
          ms-only: {{provider: oa, model: ms-only}}
          absurd: {{provider: oa, model: absurd}}
          garbage: {{provider: oa, model: garbage}}
          server: {{provider: oa, model: server}}
          an-limited: {{provider: an, model: an-limited}}
          an-overloaded: {{provider: an, model: an-overloaded}}
          ge-limited: {{provider: ge, model: ge-limited}}
          retried:
            targets: [{{provider: oa, model: retried, retry: {{attempts: 1, retry_after_max_s: 5}}}}]
        """)
    running = RunningGateway(text, {"UP_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _openai(served: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=FULL_KEY, max_retries=0, timeout=10)


def _refused(served: RunningGateway, model: str) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as raised:
        _openai(served).chat.completions.create(model=model, messages=USER)  # type: ignore[arg-type]
    return raised.value


def test_a_429s_retry_after_ms_reaches_the_client_beside_its_retry_after(
        wire: _Upstream, served: RunningGateway) -> None:
    wire.scripts["fine"] = [(429, {"retry-after-ms": "1500", "retry-after": "2"})]
    error = _refused(served, "fine")
    assert error.status_code == 429
    assert error.response.headers["retry-after-ms"] == "1500" and error.response.headers["retry-after"] == "2"
    # only the finer header: the client is told both (whole seconds rounded up)
    wire.scripts["ms-only"] = [(429, {"retry-after-ms": "250"})]
    error = _refused(served, "ms-only")
    assert error.response.headers["retry-after-ms"] == "250" and error.response.headers["retry-after"] == "1"


def test_the_wait_passed_on_is_bounded_and_strictly_read(wire: _Upstream, served: RunningGateway) -> None:
    wire.scripts["absurd"] = [(429, {"retry-after-ms": "9" * 40})]
    error = _refused(served, "absurd")
    assert error.response.headers["retry-after-ms"] == "86400000" and error.response.headers["retry-after"] == "86400"
    for value in ("-5", "1e3", "NaN", "inf", "²", "12 ms", "0x10", ""):  # no wait at all: the Retry-After beside it
        wire.scripts["garbage"] = [(429, {"retry-after-ms": value, "retry-after": "3"})]
        error = _refused(served, "garbage")
        assert error.response.headers.get("retry-after-ms") == "3000", value
        assert error.response.headers["retry-after"] == "3", value


def test_a_503s_wait_reaches_the_client_in_both_headers(wire: _Upstream, served: RunningGateway) -> None:
    wire.scripts["server"] = [(503, {"retry-after-ms": "700"})]
    error = _refused(served, "server")
    assert error.status_code == 502  # the upstream's failure, with its wait
    assert error.response.headers["retry-after-ms"] == "700" and error.response.headers["retry-after"] == "1"


def test_anthropic_waits_reach_a_messages_client(wire: _Upstream, served: RunningGateway) -> None:
    client = anthropic.Anthropic(base_url=served.url, api_key=FULL_KEY, max_retries=0, timeout=10)
    wire.scripts["an-limited"] = [(429, {"retry-after-ms": "1200", "retry-after": "2"})]
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="an-limited", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert limited.value.response.headers["retry-after-ms"] == "1200"
    assert limited.value.response.headers["retry-after"] == "2"
    wire.scripts["an-overloaded"] = [(529, {"retry-after-ms": "400"})]
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        client.messages.create(model="an-overloaded", max_tokens=5, messages=USER)  # type: ignore[arg-type]
    assert overloaded.value.status_code == 529
    assert overloaded.value.response.headers["retry-after-ms"] == "400"
    assert overloaded.value.response.headers["retry-after"] == "1"


def test_a_gemini_retry_delay_with_a_fraction_is_passed_on_as_it_is(wire: _Upstream, served: RunningGateway) -> None:
    wire.scripts["ge-limited"] = [(429, {"delay": "1.5s"})]
    error = _refused(served, "ge-limited")
    assert error.status_code == 429
    assert error.response.headers["retry-after-ms"] == "1500" and error.response.headers["retry-after"] == "2"


def test_the_gateways_own_retry_waits_the_finer_value(wire: _Upstream, served: RunningGateway) -> None:
    wire.scripts["retried"] = [(429, {"retry-after-ms": "100", "retry-after": "1"}), (200, {})]
    reply = httpx.post(served.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"},
                       json={"model": "retried", "messages": USER}, timeout=10)
    assert reply.status_code == 200, reply.text
    first, second = wire.seen["retried"][-2:]
    assert 0.1 <= second - first < 0.9, second - first  # 100 ms asked; the rounded-up second was waited before


def test_upstream_wait_reads_the_finer_header_first() -> None:
    from gateway.upstream.retry_after import upstream_wait, wait_headers

    assert upstream_wait({"retry-after-ms": "1500", "Retry-After": "2"}) == 1.5
    assert upstream_wait({"Retry-After": "2"}) == 2.0
    assert upstream_wait({"retry-after-ms": " 12.5 "}) == 0.0125
    assert upstream_wait({"retry-after-ms": "1" * 30}) == float("inf")
    assert upstream_wait({"retry-after-ms": "1.", "Retry-After": "x"}) is None
    assert upstream_wait({}) is None
    assert wait_headers(0.0125) == {"Retry-After": "1", "retry-after-ms": "13"}
    assert wait_headers(float("inf")) == {"Retry-After": "86400", "retry-after-ms": "86400000"}
    assert status_error("p", 429, "", 0.25).headers == {"Retry-After": "1", "retry-after-ms": "250"}
    assert status_error("p", 429, "", "3").headers == {"Retry-After": "3", "retry-after-ms": "3000"}
