"""`gateway explain` lists the limits that apply to a request. A rule that sends a request to another alias with
`limits` of its own has the request counted against those too (`accounting.hops`): the dry run listed only the
caller's and the alias asked for's, and called a request that the rule's alias refuses outright (more tokens than
its whole tpm window) sent. Now it lists that alias's limits, with the rule that brings the request there, and
refuses it as the live gateway does (a real gateway and mock upstream answer the same request 429)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Callable
from typing import Any

import httpx

from gateway.auth.keys import hash_key
from gateway.dryrun.decide import Decider, DecisionRequest
from gateway.dryrun.decisions import AppliedLimit, Decisions
from gateway.dryrun.render import render
from gateway.policy import compile_text
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b14-hop-limits-key-0000000000000000000"


def _policy(url: str) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: k, tenant: acme, hash: "{hash_key(KEY)}"}}
        providers:
          a: {{kind: openai, base_url: "{url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: gpt-4o-mini, limits: {{rpm: 600}}}}
          long: {{provider: a, model: mock-model, limits: {{rpm: 100, tpm: 1000}}}}
        rules:
          - {{name: to-long, when: {{alias: [chat], header: {{x-long: ["yes"]}}}}, alias: long}}
        """)


def _body(max_tokens: int) -> dict[str, Any]:
    return {"model": "chat", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello there"}]}


def _decide(text: str, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> Decisions:
    async def decide() -> Decisions:
        decider = Decider(compile_text(text, "p.yaml", {"MOCK_UPSTREAM_KEY": "x"}))
        await decider.start()
        try:
            return await decider.decide(DecisionRequest(json.dumps(body).encode(), credential=KEY, headers=headers))
        finally:
            await decider.aclose()

    return asyncio.run(decide())


def test_explain_lists_the_limits_of_the_alias_a_rule_sends_the_request_to() -> None:
    text = _policy("http://127.0.0.1:9/v1")
    moved = _decide(text, _body(100), [(b"x-long", b"yes")])
    assert moved.route is not None and moved.route.route == "long"
    assert moved.limits is not None
    assert [(limit.scope, limit.name) for limit in moved.limits.limits] == [("alias", "chat"), ("alias", "long")]
    assert moved.limits.limits == (
        AppliedLimit(scope="alias", name="chat", rpm=600),
        AppliedLimit(scope="alias", name="long", rpm=100, tpm=1000, by_rule="to-long"),
    )
    assert moved.limits.tokens == 100  # reserved on `long`'s tpm window: its max_tokens (no tokenizer: no prompt)
    assert not moved.blocked
    line = next(line for line in render(moved, "p.yaml") if line.startswith("limits:"))
    assert line == "limits:   alias chat: rpm 600; alias long (by rule to-long): rpm 100, tpm 1000"

    stayed = _decide(text, _body(100), [])  # no rule applies: only the alias asked for's
    assert stayed.limits is not None and stayed.limits.limits == (AppliedLimit(scope="alias", name="chat", rpm=600),)
    assert stayed.limits.tokens == 0  # no tpm window to reserve on


def test_a_request_more_than_the_rule_alias_tpm_is_refused_offline_as_live(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    text = _policy(upstream.base_url)
    decided = _decide(text, _body(5000), [(b"x-long", b"yes")])
    assert decided.blocked and decided.status == 429 and decided.blocked_by == "limits"
    assert decided.limits is not None and decided.limits.refused == "tpm of alias long"

    running = make_gateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    sent = len(upstream.requests)
    response = httpx.post(running.base_url + "/chat/completions", json=_body(5000), timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "x-long": "yes"})
    assert response.status_code == 429, response.text[:500]
    assert len(upstream.requests) == sent  # refused before any upstream
    fits = httpx.post(running.base_url + "/chat/completions", json=_body(100), timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "x-long": "yes"})
    assert fits.status_code == 200, fits.text[:500]
    assert upstream.requests[-1].model == "mock-model"
