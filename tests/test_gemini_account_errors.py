"""Gemini's answers that refuse the gateway's account or key, and the errors of its streamed requests, through a
running gateway, the Gemini and OpenAI mocks (tests/support) and the official `openai` SDK.

Google refuses an account it will not serve with statuses a client's error has: a 402 `RESOURCE_EXHAUSTED` for a
prepaid account out of credit ("Your prepayment credit balance is depleted"), a 400 `FAILED_PRECONDITION` for the
gateway's network location ("User location is not supported for the API use.") or a free tier not served in its
country. The 402 was a 502 that routing read as the client's 4xx, the 400s the client's `invalid_request_error`: no
fallback to the alias's next target, a success for the target's breaker. They are the gateway's credential failing
(`CredentialsRejected`, as Anthropic's "credit balance is too low"): the next target at once, a breaker failure, and
with none left a 502 naming the account's state, not Google's words. A 402 from any upstream is the account's too.

"API Key not found. Please pass a valid API key." names no key error in its message: only its
`details[].reason` (google.rpc.ErrorInfo's API_KEY_INVALID) says so, which was not read. And the error of a streamed
request (`streamGenerateContent?alt=sse`) comes wrapped in a one-element array, `[{"error": {...}}]`, which was not
decoded: its message, its `RetryInfo` wait, a context window's overflow and a bad key were all lost.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from gateway.errors import CredentialsRejected
from gateway.providers.account_state import gemini_account_refusal
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_gemini import ACCOUNT_FAULTS, MockGemini
from tests.support.mock_upstream import MockUpstream

GEMINI_KEY = "AIzaSyGeminiAccountErrors0123456789abcdef"
REPLY = MockUpstream(None).reply_text
STATES = {
    "fault-prepay-depleted": "(HTTP 402): its prepaid credit is depleted",
    "fault-location": "(HTTP 400): the API is not served to the gateway's location",
    "fault-free-tier": "(HTTP 400): its free tier is not available in the gateway's country",
}
# Each: an alias that falls back from that Gemini model to the OpenAI mock.
FALLING = [*ACCOUNT_FAULTS, "fault-wrapped-prepay-depleted", "fault-wrapped-location", "fault-wrapped-key-not-found",
           "fault-status-402"]


@pytest.fixture(scope="module")
def gemini() -> Iterator[MockGemini]:
    with MockGemini(GEMINI_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[MockUpstream]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        yield mock


def _policy(gemini: MockGemini, openai_upstream: MockUpstream, breaker: str, models: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {breaker}}}
        providers:
          gemini: {{kind: gemini, base_url: {gemini.base_url}, api_key_env: GEMINI_KEY}}
          openai: {{kind: openai, base_url: {openai_upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
        """) + models


def _start(text: str) -> RunningGateway:
    return RunningGateway(text, {"GEMINI_KEY": GEMINI_KEY, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()


@pytest.fixture(scope="module")
def gateway(gemini: MockGemini, openai_upstream: MockUpstream) -> Iterator[RunningGateway]:
    """Breakers off: every test tries its target, in whatever order the tests run."""
    fallbacks = "".join(f"  fb-{name}:\n    targets: [{{provider: gemini, model: {name}}}, "
                        "{provider: openai, model: mock-model}]\n" for name in FALLING)
    alone = "".join(f"  {name}: {{provider: gemini, model: {name}}}\n" for name in (
        *ACCOUNT_FAULTS, "fault-wrapped-key-not-found", "fault-wrapped-status-429", "fault-wrapped-status-400",
        "fault-wrapped-context-length"))
    openai_402 = "  openai-402:\n    targets: [{provider: openai, model: fault-status-402}, " \
                 "{provider: openai, model: mock-model}]\n"
    running = _start(_policy(gemini, openai_upstream, "{enabled: false}", fallbacks + alone + openai_402))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def breaking(gemini: MockGemini, openai_upstream: MockUpstream) -> Iterator[RunningGateway]:
    """Breakers that open after two failures."""
    tripping = "  tripping:\n    targets: [{provider: gemini, model: fault-location}, " \
               "{provider: openai, model: mock-model}]\n"
    running = _start(_policy(gemini, openai_upstream, "{failures: 2, cooldown_s: 300}", tripping))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as sdk:
        yield sdk


def _answer(client: openai.OpenAI, model: str, stream: bool) -> str:
    messages: Any = [{"role": "user", "content": "hi"}]
    if stream:
        return "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=messages, stream=True) if chunk.choices)
    return client.chat.completions.create(model=model, messages=messages).choices[0].message.content or ""


def _metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(gateway.metrics()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# -- the account's states, and a key Google did not find: the next target -------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("fault", FALLING)
def test_an_account_or_key_gemini_refuses_falls_back_to_the_next_target(
        fault: str, stream: bool, client: openai.OpenAI, gemini: MockGemini, openai_upstream: MockUpstream) -> None:
    gemini.clear()
    openai_upstream.clear()
    raw = client.chat.completions.with_raw_response.create(
        model=f"fb-{fault}", messages=[{"role": "user", "content": "hi"}], stream=stream)
    assert raw.headers["x-gateway-fallback-reason"] == "credentials"  # was none: the client's 400, or a 502
    answer = raw.parse()
    text = ("".join(c.choices[0].delta.content or "" for c in answer if c.choices) if stream
            else answer.choices[0].message.content)  # type: ignore[union-attr]
    assert text == REPLY
    assert [r.model for r in gemini.requests] == [fault]  # tried once: not retried on the same account
    assert len(openai_upstream.requests) == 1


@pytest.mark.parametrize("fault", list(STATES))
def test_with_no_target_left_the_client_gets_a_502_naming_the_accounts_state(
        fault: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        _answer(client, fault, stream=False)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    message = str(caught.value)
    assert f"upstream `gemini` refused the gateway's account {STATES[fault]}" in message
    assert "ai.studio" not in message and "your country" not in message  # Google's words to the account's owner
    assert GEMINI_KEY not in message and GEMINI_KEY[:16] not in message


@pytest.mark.parametrize("fault", ["fault-key-not-found", "fault-wrapped-key-not-found"])
@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_a_key_google_did_not_find_is_the_gateways_credential(fault: str, stream: bool,
                                                              client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        _answer(client, fault, stream=stream)
    assert caught.value.status_code == 502  # was a 400 `invalid_request_error`, "API Key not found" to the tenant
    assert "rejected the gateway's credentials" in str(caught.value)
    assert "API Key not found" not in str(caught.value)


def test_the_refusal_counts_against_the_targets_breaker(breaking: RunningGateway, gemini: MockGemini) -> None:
    target = "gemini/fault-location"
    gemini.clear()
    with openai.OpenAI(base_url=breaking.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        for _ in range(3):
            assert _answer(client, "tripping", stream=False) == REPLY
    assert _metric(breaking, "gateway_upstream_attempts_total", target=target, outcome="credentials") == 2
    assert _metric(breaking, "gateway_breaker_state", target=target) == 2  # open: was closed (a "success")
    assert len(gemini.requests) == 2  # the third request skipped the open breaker


def test_an_openai_compatible_upstreams_402_is_the_gateways_account(client: openai.OpenAI,
                                                                   openai_upstream: MockUpstream) -> None:
    openai_upstream.clear()
    raw = client.chat.completions.with_raw_response.create(model="openai-402",
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-gateway-fallback-reason"] == "credentials"
    assert raw.parse().choices[0].message.content == REPLY
    assert [r.model for r in openai_upstream.requests] == ["fault-status-402", "mock-model"]


# -- a streamed request's error, wrapped in an array ----------------------------------------------------------------


def test_a_wrapped_429_keeps_its_message_and_its_wait(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        _answer(client, "fault-wrapped-status-429", stream=True)
    assert caught.value.response.headers["retry-after"] == "7"  # the body's RetryInfo: was no wait at all
    assert caught.value.response.headers["retry-after-ms"] == "7000"
    message = str(caught.value)
    assert "Mock failure" in message  # was "upstream `gemini` is rate limited" and nothing more
    assert "10.0.0.5" not in message and "sk-upstream-test" not in message  # scrubbed as ever


def test_a_wrapped_400_keeps_its_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _answer(client, "fault-wrapped-status-400", stream=True)
    assert "Mock failure" in str(caught.value)


def test_a_wrapped_context_overflow_is_one(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _answer(client, "fault-wrapped-context-length", stream=True)
    assert caught.value.code == "context_length_exceeded"  # was a plain 400: no `context_fallback` either


# -- what is read as the account's, and what is not -----------------------------------------------------------------


@pytest.mark.parametrize(("status", "message"), [
    (400, "File abc is not in an ACTIVE state and usage is not allowed."),  # FAILED_PRECONDITION: the client's file
    (400, "Invalid value at 'generation_config.temperature' (TYPE_FLOAT)"),
    (400, ""),
    (429, "You exceeded your current quota, please check your plan and billing details."),  # rate limited, as ever
    (403, "User location is not supported for the API use."),  # (a 403 is the credentials' already)
])
def test_gemini_account_refusal_leaves_other_answers_alone(status: int, message: str) -> None:
    assert gemini_account_refusal("gemini", status, message) is None


def test_gemini_account_refusal_names_the_state() -> None:
    status, _, message, _ = ACCOUNT_FAULTS["fault-free-tier"]
    error = gemini_account_refusal("gemini", status, message)
    assert isinstance(error, CredentialsRejected)
    assert error.message == ("upstream `gemini` refused the gateway's account (HTTP 400): its free tier is not "
                             "available in the gateway's country (billing is not enabled)")
