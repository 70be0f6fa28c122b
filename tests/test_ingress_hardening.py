"""Two promises of the ingresses that held for one attempt only, or for one turn only.

An overloaded upstream is Anthropic's 529 `overloaded_error` to a Messages client (the SDK's `OverloadedError`) and
a 503 `upstream_overloaded` to a Chat Completions one, also when the alias retried it or fell back to another
overloaded target (`routing.attempts.aggregate`). And a Responses request that continues a conversation kept at the
upstream (`previous_response_id`, `conversation`) is refused before anything is sent when the alias's input guards
pseudonymize: pseudonyms are numbered per request, so the earlier turns' `<EMAIL_ADDRESS_1>` is another person.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from gateway.auth.keys import hash_key
from gateway.errors import GatewayError, UpstreamError, UpstreamOverloaded
from gateway.policy.compiled import RetryPolicy, Target
from gateway.routing.attempts import aggregate
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_anthropic import MockAnthropic
from tests.support.mock_upstream import MockUpstream

ANTHROPIC_KEY = "sk-ant-hardening"
HI = [{"role": "user", "content": "hi"}]


def hardening_policy(openai_url: str, anthropic_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        routing: {{breaker: {{enabled: false}}}}
        providers:
          openai: {{kind: openai, base_url: {openai_url}, api_key_env: MOCK_UPSTREAM_KEY}}
          claude: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
          claude2: {{kind: anthropic, base_url: {anthropic_url}, api_key_env: ANTHROPIC_KEY}}
        models:
          claude-529-retried: {{provider: claude, model: fault-status-529, retry: {{attempts: 1, backoff_s: 0.01}}}}
          claude-529-pair:
            targets:
              - {{provider: claude, model: fault-status-529, retry: {{attempts: 0}}}}
              - {{provider: claude2, model: fault-status-529, retry: {{attempts: 0}}}}
          claude-529-then-500:
            targets:
              - {{provider: claude, model: fault-status-529, retry: {{attempts: 0}}}}
              - {{provider: claude2, model: fault-status-500, retry: {{attempts: 0}}}}
          resp-pseudo: {{provider: openai, model: fault-echo}}
          resp-pseudo-entity: {{provider: openai, model: fault-echo}}
          resp-redact: {{provider: openai, model: fault-echo}}
          resp-shadow: {{provider: openai, model: fault-echo}}
          resp-plain: {{provider: openai, model: fault-echo}}
        guards:
          models:
            resp-pseudo:
              pii: {{kind: pii, places: [input], action: pseudonymize, entities: {{EMAIL_ADDRESS: {{}}}}}}
            resp-pseudo-entity:
              pii: {{kind: pii, places: [input], entities: {{EMAIL_ADDRESS: {{action: pseudonymize}}}}}}
            resp-redact:
              pii: {{kind: pii, places: [input], entities: {{EMAIL_ADDRESS: {{}}}}}}
            resp-shadow:
              pii: {{kind: pii, mode: shadow, places: [input], action: pseudonymize,
                     entities: {{EMAIL_ADDRESS: {{}}}}}}
        """)


@pytest.fixture(scope="module")
def claude_mock() -> Iterator[MockAnthropic]:
    with MockAnthropic(ANTHROPIC_KEY) as mock:
        yield mock


@pytest.fixture(scope="module")
def gw(upstream: MockUpstream, claude_mock: MockAnthropic) -> Iterator[RunningGateway]:
    running = RunningGateway(hardening_policy(upstream.base_url, claude_mock.base_url),
                             {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ANTHROPIC_KEY": ANTHROPIC_KEY}).start()
    yield running
    running.stop()


@pytest.fixture
def ant(gw: RunningGateway, claude_mock: MockAnthropic) -> Iterator[anthropic.Anthropic]:
    claude_mock.clear()
    with anthropic.Anthropic(base_url=gw.url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


@pytest.fixture
def oai(gw: RunningGateway, upstream: MockUpstream) -> Iterator[openai.OpenAI]:
    upstream.clear()
    with openai.OpenAI(base_url=gw.base_url, api_key=FULL_KEY, max_retries=0, timeout=15) as client:
        yield client


def _ask(client: anthropic.Anthropic, alias: str, stream: bool) -> None:
    if stream:
        with client.messages.stream(model=alias, max_tokens=10, messages=HI) as events:  # type: ignore[arg-type]
            events.get_final_message()
    else:
        client.messages.create(model=alias, max_tokens=10, messages=HI)  # type: ignore[arg-type]


# -- an overloaded upstream, retried or fallen back from ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("alias", ["claude-529-retried", "claude-529-pair"])
def test_overloaded_on_every_attempt_is_anthropics_529(alias: str, stream: bool, ant: anthropic.Anthropic,
                                                       claude_mock: MockAnthropic) -> None:
    with pytest.raises(anthropic.OverloadedError) as caught:
        _ask(ant, alias, stream)
    assert caught.value.status_code == 529
    body: Any = caught.value.body
    assert body["error"]["type"] == "overloaded_error"
    assert "all 2 attempts" in body["error"]["message"]  # the attempts are named, as any aggregate's
    assert len(claude_mock.requests) == 2


@pytest.mark.parametrize("alias", ["claude-529-retried", "claude-529-pair"])
def test_overloaded_on_every_attempt_is_a_503_on_chat(alias: str, gw: RunningGateway) -> None:
    r = httpx.post(gw.base_url + "/chat/completions", headers={"Authorization": f"Bearer {FULL_KEY}"}, timeout=15,
                   json={"model": alias, "messages": HI})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "upstream_overloaded"


def test_an_overload_beside_another_failure_is_still_a_502(ant: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        _ask(ant, "claude-529-then-500", stream=False)
    assert caught.value.status_code == 502


def test_the_aggregate_overload_tells_the_smallest_retry_after() -> None:
    retry = RetryPolicy(0, 0.1, 1, 1)
    a, b = (Target(n, n, "m", 1, retry, None) for n in ("a", "b"))

    def one(*errors: tuple[Target, GatewayError, str]) -> GatewayError:
        return aggregate("x", list(errors))

    hinted = one((a, UpstreamOverloaded("o", headers={"Retry-After": "9"}), "server_error"),
                 (b, UpstreamOverloaded("o", headers={"Retry-After": "3"}), "server_error"))
    assert isinstance(hinted, UpstreamOverloaded) and hinted.status == 503 and hinted.headers["Retry-After"] == "3"
    assert "a: o; b: o" in hinted.message
    bare = one((a, UpstreamOverloaded("o"), "server_error"), (b, UpstreamOverloaded("o"), "server_error"))
    assert isinstance(bare, UpstreamOverloaded) and "Retry-After" not in bare.headers
    mixed = one((a, UpstreamOverloaded("o"), "server_error"), (b, UpstreamError("e"), "server_error"))
    assert mixed.status == 502 and not isinstance(mixed, UpstreamOverloaded)


# -- a Responses conversation kept at the upstream, under pseudonymizing guards -------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("alias", ["resp-pseudo", "resp-pseudo-entity"])
@pytest.mark.parametrize(("param", "value"), [("previous_response_id", "resp_123"), ("conversation", "conv_123")])
def test_a_chained_turn_is_refused_when_pseudonymizing(param: str, value: str, alias: str, stream: bool,
                                                        oai: openai.OpenAI, upstream: MockUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=alias, input="and also bob@example.org", stream=stream,  # type: ignore[call-overload]
                             **{param: value})
    error: Any = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert "pseudonym" in error["message"] and "whole conversation" in error["message"]
    assert upstream.requests == []  # refused before anything was sent


@pytest.mark.parametrize("alias", ["resp-redact", "resp-shadow", "resp-plain"])
def test_a_chained_turn_is_served_without_a_pseudonymizing_guard(alias: str, oai: openai.OpenAI,
                                                                 upstream: MockUpstream) -> None:
    answer = oai.responses.create(model=alias, input="hello there", previous_response_id="resp_123")
    assert answer.output_text
    assert upstream.requests[-1].json["previous_response_id"] == "resp_123"


def test_a_whole_history_is_served_when_pseudonymizing(oai: openai.OpenAI, upstream: MockUpstream) -> None:
    answer = oai.responses.create(model="resp-pseudo", store=False, input=[
        {"role": "user", "content": "Invite alice@example.com"},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "and also bob@example.org"}])
    assert answer.output_text
    sent = str(upstream.requests[-1].json["input"])
    assert "<EMAIL_ADDRESS_1>" in sent and "<EMAIL_ADDRESS_2>" in sent and "alice" not in sent
