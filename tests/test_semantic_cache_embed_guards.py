"""The semantic cache's embeddings call meets the embeddings alias's input guards, and a denied request meets no cache.

`faq` caches semantically through the `embed` alias; `embed`'s policy says an e-mail address never reaches its
upstream (input pii guard, redact) and neither does a project's code name (deny list, block). A chat prompt for
`faq` that those guards would rewrite or block is not embedded at all (its answer is still cached exactly), as
the same text sent to `/v1/embeddings` on `embed` would be redacted or refused; a tenant whose guards let it through
has it embedded, as its own embeddings requests would. A request a `deny` rule refuses is neither looked up nor
embedded: the router refuses it.
"""
from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.auth.keys import hash_key
from gateway.cache.service import ResponseCache
from tests.conftest import FULL_KEY, OTHER_TENANT_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

AUTH = {"Authorization": f"Bearer {FULL_KEY}"}  # tenant acme: embed's guards apply
BETA = {"Authorization": f"Bearer {OTHER_TENANT_KEY}"}  # tenant beta: its own `pii` turns embed's off
EMAIL = "jane.doe@mailbox.org"

GUARDS = """\
    guards:
      models:
        embed:
          pii: {kind: pii, places: [input], entities: {EMAIL_ADDRESS: {}}}
          codenames: {kind: denylist, places: [input], terms: ["project nightingale"]}
      tenants:
        beta:
          pii: {kind: pii, mode: off}
    """


def policy(url: str, guards: str = GUARDS) -> str:
    return textwrap.dedent(f"""\
        version: 1
        auth: keys
        keys:
          - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
          - {{name: other, tenant: beta, hash: "{hash_key(OTHER_TENANT_KEY)}"}}
        providers:
          local: {{kind: openai, base_url: {url}, api_key_env: MOCK_UPSTREAM_KEY}}
          external: {{kind: openai, base_url: {url}, api_key_env: MOCK_UPSTREAM_KEY, headers: {{X-Which: external}}}}
        models:
          faq: {{provider: local, model: mock-model, cache: {{semantic: {{embeddings: embed, threshold: 0.9}}}}}}
          embed: {{provider: external, model: text-embedding-3-small}}
        rules:
          - {{name: no-contractors, when: {{header: {{X-Contractor: ["*"]}}}},
             deny: "contractors may not use this model"}}
        """) + textwrap.dedent(guards)


def start(guards: str = GUARDS) -> Iterator[tuple[RunningGateway, MockUpstream]]:
    with MockUpstream(api_key=UPSTREAM_KEY) as up:
        running = RunningGateway(policy(up.base_url, guards), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY}).start()
        try:
            yield running, up
        finally:
            running.stop()


@pytest.fixture
def gw() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    yield from start()


@pytest.fixture
def unguarded() -> Iterator[tuple[RunningGateway, MockUpstream]]:
    yield from start("")


def embedded_inputs(up: MockUpstream) -> list[str]:
    return [r.json["input"] for r in up.requests if r.path.endswith("/embeddings")]


def ask(running: RunningGateway, text: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    body = {"model": "faq", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    return httpx.post(f"{running.base_url}/chat/completions", json=body, headers=headers, timeout=20)


def vectors(running: RunningGateway) -> int:
    """How many prompts the `faq` alias's semantic index holds in this process."""
    (cache,) = [s for s in running.gateway.runtime.services if isinstance(s, ResponseCache)]
    return len(cache.indexes["faq"])


def stored_vectors(running: RunningGateway, expected: int) -> int:
    """The index's size once the miss's answer was written (in a task of its own, after the answer left)."""
    deadline = time.monotonic() + 5
    while vectors(running) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return vectors(running)


def metric(running: RunningGateway, pattern: str) -> float:
    found = re.search(rf"^{pattern} (\S+)$", running.metrics(), re.M)
    return float(found.group(1)) if found else 0.0


# A skip, not an error: `gateway_cache_errors_total` never counts it (docs/cache.md).
GUARDED_SKIPS = r'gateway_cache_semantic_skips_total\{model="faq",reason="guarded"\}'


def test_the_embeddings_alias_guard_holds_for_its_own_requests(gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    r = httpx.post(f"{running.base_url}/embeddings", json={"model": "embed", "input": f"write to {EMAIL}"},
                   headers=AUTH, timeout=20)
    assert r.status_code == 200
    assert EMAIL not in embedded_inputs(up)[-1]  # redacted: the policy keeps addresses from that upstream


def test_a_prompt_the_embeddings_alias_would_redact_is_not_embedded(gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    prompt = f"Please write to {EMAIL}"
    r = ask(running, prompt)
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
    assert embedded_inputs(up) == [], f"`embed`'s upstream received the prompt: {embedded_inputs(up)}"
    assert metric(running, GUARDED_SKIPS) == 1
    assert "gateway_cache_errors_total{" not in running.metrics()
    # the answer is still cached exactly (the request's own guard session is untouched), without a vector
    again = ask(running, prompt)
    assert again.status_code == 200 and again.headers["x-gateway-cache"] == "hit"
    assert vectors(running) == 0
    assert embedded_inputs(up) == []


def test_a_prompt_the_embeddings_alias_would_block_is_not_embedded(gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    r = ask(running, "What is the launch date of Project Nightingale?")
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"  # `faq` itself has no such guard
    assert embedded_inputs(up) == []
    assert ask(running, "What is the launch date of Project Nightingale?").headers["x-gateway-cache"] == "hit"
    assert vectors(running) == 0
    assert metric(running, GUARDED_SKIPS) == 1


def test_the_guards_are_those_of_the_requests_tenant(gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    # beta's own `pii` (off) replaces embed's: its embeddings requests carry addresses, and so do its lookups
    direct = httpx.post(f"{running.base_url}/embeddings", json={"model": "embed", "input": f"write to {EMAIL}"},
                        headers=BETA, timeout=20)
    assert direct.status_code == 200 and EMAIL in embedded_inputs(up)[-1]
    up.clear()
    r = ask(running, f"Please write to {EMAIL}", BETA)
    assert r.status_code == 200
    assert embedded_inputs(up) == [f"Please write to {EMAIL}"]
    assert stored_vectors(running, 1) == 1
    # while beta's code-name guard is still embed's
    assert ask(running, "Is Project Nightingale late?", BETA).status_code == 200
    assert embedded_inputs(up) == [f"Please write to {EMAIL}"]
    assert metric(running, GUARDED_SKIPS) == 1


def test_a_prompt_the_guards_let_through_is_embedded(gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    r = ask(running, "What are your opening hours?")
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
    assert embedded_inputs(up) == ["What are your opening hours?"]
    assert stored_vectors(running, 1) == 1
    assert metric(running, GUARDED_SKIPS) == 0


def test_without_guards_the_prompt_is_embedded(unguarded: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = unguarded
    r = ask(running, f"Please write to {EMAIL}")
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
    assert embedded_inputs(up) == [f"Please write to {EMAIL}"]
    assert stored_vectors(running, 1) == 1


def test_a_request_a_deny_rule_refuses_is_neither_looked_up_nor_embedded(
        gw: tuple[RunningGateway, MockUpstream]) -> None:
    running, up = gw
    exact_lookups = r'gateway_cache_lookup_seconds_count\{kind="exact"\}'
    before = metric(running, exact_lookups)
    r = httpx.post(f"{running.base_url}/chat/completions", headers={**AUTH, "X-Contractor": "1"}, timeout=20,
                   json={"model": "faq", "temperature": 0,
                         "messages": [{"role": "user", "content": "our secret roadmap for Q3"}]})
    assert r.status_code == 400 and "contractors" in r.text  # refused by the policy's deny rule
    assert not any(r.path.endswith("/chat/completions") for r in up.requests)
    assert embedded_inputs(up) == [], f"a denied request's prompt was embedded upstream: {embedded_inputs(up)}"
    assert metric(running, exact_lookups) == before
    assert metric(running, r'gateway_cache_lookups_total\{model="faq",result="bypass"\}') == 1


def test_the_dry_run_shows_a_denied_request_meeting_no_cache() -> None:
    """`gateway route` (the `Decider`) decides the cache as the stage does: a request a deny rule refuses is not
    looked up."""
    import asyncio

    import msgspec

    from gateway.dryrun.decide import Decider, DecisionRequest
    from gateway.policy import compile_text

    decider = Decider(compile_text(policy("http://127.0.0.1:9/v1", ""), "p.yaml", {"MOCK_UPSTREAM_KEY": "x"}))
    body = msgspec.json.encode({"model": "faq", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]})
    denied = asyncio.run(decider.decide(DecisionRequest(body, credential=FULL_KEY,
                                                        headers=[(b"x-contractor", b"1")])))
    assert denied.blocked and denied.cache is not None and not denied.cache.lookup and denied.cache.reason == "deny"
    allowed = asyncio.run(decider.decide(DecisionRequest(body, credential=FULL_KEY)))
    assert not allowed.blocked and allowed.cache is not None and allowed.cache.lookup and allowed.cache.semantic
