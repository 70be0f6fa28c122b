"""`gateway explain` refuses a request its guards block with the live gateway's own message, word for word.

Before, explain wrote its own ("content policy: guard sec."), without the types found, and named every blocking
guard where the live stage stops at the first `limits` guard that blocks. Each request here goes both ways: to a
real gateway (the mock upstream behind it) for the 400, and through the `Decider` with the same policy text.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.dryrun.decide import Decider, DecisionRequest
from gateway.policy import compile_text
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

SECRET = "AKIAIOSFODNN7EXAMPLQ"


def guarded_policy(upstream_url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
        providers:
          mock: {{kind: openai, base_url: {upstream_url}, api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: fault-echo}}
        guards:
          global:
            sec: {{kind: secrets, places: [input]}}
            deny: {{kind: denylist, terms: [project falcon], action: block, places: [input]}}
            watch: {{kind: secrets, mode: shadow, places: [input]}}
            size: {{kind: limits, max_chars: 120}}
        """)


@pytest.fixture(scope="module")
def policy_text(upstream: MockUpstream) -> str:
    return guarded_policy(upstream.base_url)


@pytest.fixture(scope="module")
def gw(policy_text: str) -> Iterator[RunningGateway]:
    running = RunningGateway(policy_text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
    yield running
    running.stop()


def _body(text: str) -> bytes:
    return json.dumps({"model": "chat", "messages": [{"role": "user", "content": text}]}).encode()


def live_message(gw: RunningGateway, text: str) -> str:
    response = httpx.post(gw.base_url + "/chat/completions", content=_body(text), timeout=20,
                          headers={"Authorization": f"Bearer {FULL_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "content_policy_violation"
    return str(error["message"])


def explained_message(policy_text: str, text: str) -> str:
    async def decide() -> str | None:
        decider = Decider(compile_text(policy_text, "p.yaml", {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}))
        await decider.start()
        try:
            decided = await decider.decide(DecisionRequest(_body(text), credential=FULL_KEY))
        finally:
            await decider.aclose()
        assert decided.blocked and decided.blocked_by == "guards" and decided.status == 400, decided
        return decided.error

    message = asyncio.run(decide())
    assert message is not None
    return message


@pytest.mark.parametrize("text", [
    pytest.param(f"my key is {SECRET}", id="one-guard"),
    pytest.param(f"project falcon, key {SECRET}", id="two-guards"),
    pytest.param(f"project falcon and {SECRET} " + "padding " * 20, id="limit-first"),
])
def test_explain_blocks_with_the_live_message(gw: RunningGateway, policy_text: str, text: str) -> None:
    live = live_message(gw, text)
    assert live.startswith("The request was blocked by the gateway's content policy: guard ")
    assert explained_message(policy_text, text) == live


def test_the_messages_name_what_blocked(policy_text: str) -> None:
    """What the three requests above are refused for (so the comparison is not of three equal strings)."""
    head = "The request was blocked by the gateway's content policy: guard "
    assert explained_message(policy_text, f"my key is {SECRET}") == head + "sec found AWS_ACCESS_KEY."
    assert explained_message(policy_text, f"project falcon, key {SECRET}") == \
        head + "deny, sec found AWS_ACCESS_KEY, DENIED_TERM."
    assert explained_message(policy_text, f"project falcon and {SECRET} " + "padding " * 20) == \
        head + "size found MAX_CHARS."
