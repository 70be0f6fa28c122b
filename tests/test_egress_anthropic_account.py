"""Anthropic's 400s that refuse the gateway's account, through a running gateway reached by the official `openai` SDK.

Anthropic answers an account out of credit ("Your credit balance is too low to access the Anthropic API..."), one
past its spend limit ("You have reached your specified API usage limits...") and a disabled organization ("This
organization has been disabled.") with HTTP 400 `invalid_request_error`. The gateway read them as the client's
fault: no fallback to the alias's next target, a success for the target's breaker, and every tenant told that its
request was invalid until someone topped the account up. They are now the gateway's credential failing
(`CredentialsRejected`, as Gemini's 400 for a bad key): routing goes to the next target at once, the breaker counts a
failure, and with no target left the client gets a 502 naming the account's state, never Anthropic's own words. A
400 that is the request's fault still reaches the client as its 400, with no fallback.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import hash_key
from gateway.errors import CredentialsRejected
from gateway.providers.account_state import anthropic_account_refusal
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic, anthropic_error
from tests.support.mock_upstream import _RECORD, MockUpstream, _send

ANTHROPIC_KEY = "sk-ant-egress-account"
REPLY = MockUpstream(None).reply_text
# Anthropic's words, as its API sends them (anthropics/claude-code#4684, #19028, #2127).
NO_CREDIT = ("Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
             "purchase credits.")
USAGE_LIMIT = "You have reached your specified API usage limits. You will regain access on 2026-04-01 at 00:00 UTC."
DISABLED = "This organization has been disabled."
REFUSALS = {"no-credit": NO_CREDIT, "usage-limit": USAGE_LIMIT, "disabled": DISABLED,
            "bad-request": "messages.0.content: Input should be a valid list"}  # (the last: the request's fault)


class RefusingAnthropic(MockAnthropic):
    """The Anthropic mock, answering a model named after a key of `REFUSALS` (and any suffix) with that 400."""

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_RECORD].json
        model = str(body.get("model")) if isinstance(body, dict) else ""
        for name, message in REFUSALS.items():
            if model.startswith(name):
                return await _send(request, anthropic_error(400, message))
        return await super()._messages(request)


@pytest.fixture(scope="module")
def claude() -> Iterator[RefusingAnthropic]:
    with RefusingAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def openai_upstream() -> Iterator[MockUpstream]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gateway(claude: RefusingAnthropic, openai_upstream: MockUpstream) -> Iterator[RunningGateway]:
    fallbacks = "".join(f"  {name}:\n    targets: [{{provider: anthropic, model: {name}}}, "
                        "{provider: openai, model: mock-model}]\n" for name in REFUSALS)
    text = textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{failures: 2, cooldown_s: 300}}}}
        providers:
          anthropic: {{kind: anthropic, base_url: {claude.base_url}, api_key_env: ANTHROPIC_KEY}}
          openai: {{kind: openai, base_url: {openai_upstream.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          alone: {{provider: anthropic, model: no-credit-alone}}
          tripping:
            targets: [{{provider: anthropic, model: no-credit-tripping}}, {{provider: openai, model: mock-model}}]
        """) + fallbacks
    running = RunningGateway(text, {"ANTHROPIC_KEY": ANTHROPIC_KEY, "MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
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


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
@pytest.mark.parametrize("state", ["no-credit", "usage-limit", "disabled"])
def test_an_anthropic_account_it_cannot_serve_falls_back_to_the_next_target(
        state: str, stream: bool, client: openai.OpenAI, claude: RefusingAnthropic,
        openai_upstream: MockUpstream) -> None:
    claude.clear()
    openai_upstream.clear()
    assert _answer(client, state, stream) == REPLY  # was Anthropic's 400, as the client's `invalid_request_error`
    assert [r.json["model"] for r in claude.requests] == [state]  # tried once: not retried on the same account
    assert len(openai_upstream.requests) == 1


def test_a_400_for_the_request_itself_is_still_the_clients(client: openai.OpenAI,
                                                            openai_upstream: MockUpstream) -> None:
    openai_upstream.clear()
    with pytest.raises(openai.BadRequestError) as caught:
        _answer(client, "bad-request", stream=False)
    assert "Input should be a valid list" in str(caught.value)
    assert openai_upstream.requests == []


def test_with_no_target_left_the_client_gets_a_502_naming_the_accounts_state(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        _answer(client, "alone", stream=False)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    message = str(caught.value)
    assert "refused the gateway's account" in message and "credit balance is too low" in message
    assert "Plans & Billing" not in message  # Anthropic's words to the account's owner are not the tenant's


def test_the_refusal_counts_against_the_targets_breaker(gateway: RunningGateway, client: openai.OpenAI,
                                                        claude: RefusingAnthropic) -> None:
    target = "anthropic/no-credit-tripping"
    claude.clear()
    for _ in range(3):
        assert _answer(client, "tripping", stream=False) == REPLY
    assert _metric(gateway, "gateway_upstream_attempts_total", target=target, outcome="credentials") == 2
    assert _metric(gateway, "gateway_breaker_state", target=target) == 2  # open: was closed (a "success")
    assert len(claude.requests) == 2  # the third request skipped the open breaker


@pytest.mark.parametrize(("message", "state"), [
    (NO_CREDIT, "its credit balance is too low"),
    (USAGE_LIMIT, "its API usage limit is reached"),
    (DISABLED, "its organization is disabled"),
])
def test_anthropic_account_refusal_names_the_state(message: str, state: str) -> None:
    error = anthropic_account_refusal("claude", 400, message)
    assert isinstance(error, CredentialsRejected)
    assert error.message == f"upstream `claude` refused the gateway's account (HTTP 400): {state}"


@pytest.mark.parametrize(("status", "message"), [
    (400, "messages.0.content: Input should be a valid list"),
    (400, "prompt is too long: 210000 tokens > 200000 maximum"),
    (400, ""),
    (429, NO_CREDIT),  # only the 400 is read so: another status keeps its own mapping
])
def test_anthropic_account_refusal_leaves_other_answers_alone(status: int, message: str) -> None:
    assert anthropic_account_refusal("claude", status, message) is None
