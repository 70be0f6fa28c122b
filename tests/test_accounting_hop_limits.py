"""A request that reaches an alias it did not name (its alias's `context_fallback`, a routing rule, a budget
downgrade) is held to that alias as if it had named it: the key must be allowed to use it (`models`), and the
alias's own `limits` (all callers of the alias together) count it and may refuse it. Before, a key with
`models: [small]` that gets 404 for `large` was answered by `large` through `small`'s context fallback, and
requests reaching an alias by a hop were neither counted against its limits nor refused by them. Real gateway,
mock upstream (its `fault-context-length` model answers OpenAI's context-length 400), the in-process store and a
real Redis (the remote store's path)."""

from __future__ import annotations

import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.mock_upstream import MockUpstream
from tests.support.redis_server import suite_redis_url

SMALL_ONLY = "gw-b9-hop-small-only-key-0000000000000000"
FULL = "gw-b9-hop-full-key-00000000000000000000000"


def store_states(kind: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The policy's `state:` line and its environment: the in-process store, or the suite's Redis under a prefix of
    the test's own (its keys deleted afterwards)."""
    if kind == "memory":
        yield "", {}
        return
    with suite_redis_url() as url:
        prefix = f"gwtest:b9:{uuid.uuid4().hex}:"
        yield f'state: {{backend: redis, url_env: GW_B9_REDIS, key_prefix: "{prefix}"}}\n', {"GW_B9_REDIS": url}
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=prefix + "*"):
                client.delete(key)
        finally:
            client.close()


@pytest.fixture(params=["memory", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, str]]]:
    """(Named first by a test, so that its gateway, stopped before this ends, writes nothing after the clean-up.)"""
    yield from store_states(request.param)


def _policy(upstream: MockUpstream, state: str, keys: str, models: str, rules: str = "") -> str:
    return (f"version: 1\nauth: keys\nkeys:\n{textwrap.indent(keys, '  ')}\nproviders:\n"
            f'  a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}\n'
            f"models:\n{textwrap.indent(models, '  ')}\n{state}{rules}")


def _chat(running: RunningGateway, key: str, alias: str) -> httpx.Response:
    return httpx.post(running.base_url + "/chat/completions", timeout=20, headers={"Authorization": f"Bearer {key}"},
                      json={"model": alias, "messages": [{"role": "user", "content": "hello there"}]})


def test_context_fallback_never_serves_an_alias_the_key_may_not_use(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    running = make_gateway(_policy(
        upstream, "",
        f'- {{name: cheap, tenant: acme, hash: "{hash_key(SMALL_ONLY)}", models: [small]}}\n'
        f'- {{name: full, tenant: acme, hash: "{hash_key(FULL)}"}}',
        "small:\n  targets: [{provider: a, model: fault-context-length}]\n  context_fallback: large\n"
        "large: {provider: a, model: mock-model}"))
    assert _chat(running, SMALL_ONLY, "large").status_code == 404  # the key may not use `large` by name
    response = _chat(running, SMALL_ONLY, "small")
    assert response.status_code == 400, response.text  # `small`'s own answer: the prompt does not fit
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert [r.model for r in upstream.requests] == ["fault-context-length"]  # `large`'s target never asked
    assert "x-gateway-fallback-reason" not in response.headers
    upstream.clear()
    allowed = _chat(running, FULL, "small")  # a key that may use `large` still falls back to it
    assert allowed.status_code == 200, allowed.text
    assert [r.model for r in upstream.requests] == ["fault-context-length", "mock-model"]


def test_a_context_fallback_is_held_to_the_fallback_aliass_own_limits(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """`large: limits: {rpm: 1}`: a request that falls back to `large` counts against its minute, and once that is
    used up, is refused (429 with `Retry-After`) rather than sent to `large`'s upstream."""
    line, env = state
    running = make_gateway(_policy(
        upstream, line, f'- {{name: full, tenant: acme, hash: "{hash_key(FULL)}"}}',
        "small:\n  targets: [{provider: a, model: fault-context-length}]\n  context_fallback: large\n"
        "large: {provider: a, model: mock-model, limits: {rpm: 1}}"), env)
    first = _chat(running, FULL, "small")  # falls back: large's one request of this minute
    assert first.status_code == 200, first.text
    assert _chat(running, FULL, "large").status_code == 429  # counted: large's minute is used up, by name too
    upstream.clear()
    refused = [_chat(running, FULL, "small") for _ in range(3)]
    assert [r.status_code for r in refused] == [429, 429, 429], [r.text for r in refused]
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert refused[0].headers.get("x-should-retry") != "false"  # (small's 400 is final; this refusal is not)
    assert [r.model for r in upstream.requests] == ["fault-context-length"] * 3  # large's upstream never asked


def test_a_rule_hop_is_held_to_the_target_aliass_own_limits(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """A rule sending `small` to `canary` (`canary: limits: {rpm: 1}`): the hop counts against canary's minute and is
    refused once it is used up, whichever way the minute was spent."""
    line, env = state
    running = make_gateway(_policy(
        upstream, line, f'- {{name: full, tenant: acme, hash: "{hash_key(FULL)}"}}',
        "small: {provider: a, model: gpt-4o-mini}\ncanary: {provider: a, model: mock-model, limits: {rpm: 1}}",
        "rules:\n  - {name: to-canary, when: {alias: [small], tenant: [acme]}, alias: canary}\n"), env)
    first = _chat(running, FULL, "small")
    assert first.status_code == 200, first.text
    assert upstream.requests[-1].model == "mock-model"  # the rule applied
    assert _chat(running, FULL, "canary").status_code == 429  # the hop used canary's minute
    upstream.clear()
    statuses = [_chat(running, FULL, "small").status_code for _ in range(3)]
    assert statuses == [429, 429, 429]
    assert not upstream.requests  # canary's upstream never asked past its limit


def test_a_context_fallback_takes_the_fallback_aliass_concurrency_slot_and_gives_it_back(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """`large: limits: {concurrent: 1}`: while a request to `large` runs, a fallback to it is refused; once it ended,
    a fallback takes the slot, and gives it back with its answer (else `large` would refuse until the lease ran
    out)."""
    running = make_gateway(_policy(
        upstream, "", f'- {{name: full, tenant: acme, hash: "{hash_key(FULL)}"}}',
        "small:\n  targets: [{provider: a, model: fault-context-length}]\n  context_fallback: large\n"
        "large: {provider: a, model: fault-slow-first-byte-1500, limits: {concurrent: 1}}"))
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_chat, running, FULL, "large")
        deadline = time.monotonic() + 10
        while not upstream.requests and time.monotonic() < deadline:  # the slow request holds the slot
            time.sleep(0.02)
        refused = _chat(running, FULL, "small")
        assert refused.status_code == 429, refused.text
        assert slow.result().status_code == 200
    assert _chat(running, FULL, "small").status_code == 200  # the fallback took the free slot...
    assert _chat(running, FULL, "large").status_code == 200  # ...and gave it back


def test_a_budget_downgrade_is_held_to_the_cheaper_aliass_own_limits(
    state: tuple[str, dict[str, str]], make_gateway: Callable[..., RunningGateway], upstream: MockUpstream,
) -> None:
    """A key whose budget downgrades it (from its first cent) to `cheap` (`limits: {rpm: 1}`): the downgraded
    requests count against cheap's minute, and are refused once it is used up."""
    line, env = state
    running = make_gateway(_policy(
        upstream, line,
        f'- {{name: full, tenant: acme, hash: "{hash_key(FULL)}", '
        "budget: {usd: 100, downgrade: {at: 0.000001, alias: cheap}}}",
        "chat: {provider: a, model: mock-model}\ncheap: {provider: a, model: gpt-4o-mini, limits: {rpm: 1}}",
        "prices:\n  mock-model: {input_per_mtok: 0, output_per_mtok: 1000}\n"
        "  gpt-4o-mini: {input_per_mtok: 0, output_per_mtok: 1}\n"), env)
    first = _chat(running, FULL, "chat")
    assert first.status_code == 200, first.text
    assert first.headers["x-gateway-budget-downgrade"] == "cheap"
    assert [r.model for r in upstream.requests] == ["gpt-4o-mini"]
    upstream.clear()
    second = _chat(running, FULL, "chat")
    assert second.status_code == 429, second.text  # cheap's minute is used up
    assert int(second.headers["retry-after"]) >= 1
    assert not upstream.requests
