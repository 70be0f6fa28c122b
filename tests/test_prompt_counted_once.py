"""A routing rule on the prompt's size is matched by three stages of one request: the guard stage (whose guards run:
those of the alias the rule sends it to), the cache stage (the rule is part of the cache key) and the router. Each
counted a ~4 MB prompt itself, the first two on the event loop (seconds each, every other request of the process
waiting), so a request was counted up to three times. Now it is counted once, by the first stage that needs it, in a
thread past 64 KiB, and the others read that count. Measured: a ticker task on the gateway's own loop (its largest
gap, compared with what counting that prompt takes here) and the rule's counts of that prompt. Real gateway, mock
upstream; the count is observed by wrapping the rule's counting function (it still counts)."""

from __future__ import annotations

import asyncio
import random
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import gateway.routing.rules as rules
from gateway.accounting.prompt import estimate_prompt
from gateway.auth.keys import hash_key
from gateway.schemas.endpoints import Endpoint
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b14-prompt-once-key-000000000000000000"
_GUARDS = """\
    guards:
      models:
        long:
          words: {kind: denylist, places: [output], topics: {b14_topic: [zqxjzqxj]}}
    """
_RULE = """\
    rules:
      - {name: long-prompts, when: {alias: [chat], prompt_tokens_over: 100000}, alias: long}
    """


def _prompt() -> str:
    """About 4.6 MB of varied words (tiktoken's slow case: no long repeats to merge)."""
    rng = random.Random(14)
    words = ("alpha", "beta", "gamma", "delta", "lorem", "ipsum", "zeta", "omega", "kappa", "sigma")
    return " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(600_000))


def _policy(url: str, stages: str) -> str:
    cache = ", cache: {}" if "cache" in stages else ""
    return textwrap.dedent(f"""\
        version: 1
        server: {{max_body_bytes: 16777216}}
        auth: keys
        keys:
          - {{name: k, tenant: acme, hash: "{hash_key(KEY)}"}}
        providers:
          a: {{kind: openai, base_url: "{url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: gpt-4o-mini{cache}}}
          long: {{provider: a, model: mock-model}}
        """) + textwrap.dedent(_RULE) + (textwrap.dedent(_GUARDS) if "guards" in stages else "")


@pytest.mark.parametrize("stages", ["guards", "cache", "guards+cache"])
def test_a_large_prompt_is_counted_once_and_off_the_loop(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, monkeypatch: pytest.MonkeyPatch,
    stages: str,
) -> None:
    """`guards`: the rule's alias has guards of its own (the guard stage matches the rule to pick them); `cache`: the
    alias asked for caches (the cache stage matches the rule for its key); both: the two stages, then the router."""
    running = make_gateway(_policy(upstream.base_url, stages), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    body = {"model": "chat", "temperature": 0, "messages": [{"role": "user", "content": _prompt()}]}
    counter = TokenCounter()
    counter.load(["gpt-4o-mini"])
    started = time.perf_counter()
    estimate_prompt(counter, body, "gpt-4o-mini")
    counting = time.perf_counter() - started  # what the count holds a loop for, on this machine

    counted: list[int] = []  # the rule's counts of this prompt (the only one past 1 MB)
    lock = threading.Lock()
    real = rules.estimate_prompt

    def counting_estimate(tokens: TokenCounter, counted_body: dict[str, Any], model: str | None,
                          endpoint: Endpoint | None = None) -> int:
        found = real(tokens, counted_body, model, endpoint)
        if found > 500_000:
            with lock:
                counted.append(found)
        return found

    monkeypatch.setattr(rules, "estimate_prompt", counting_estimate)

    loop = running.server.servers[0].get_loop()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.run_coroutine_threadsafe(tick(), loop)
    try:
        response = httpx.post(running.base_url + "/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"})
    finally:
        loop.call_soon_threadsafe(stop.set)
        ticker.result(10)
    assert response.status_code == 200, response.text[:500]
    assert upstream.requests[-1].model == "mock-model"  # the rule counted the prompt, and applied
    if "cache" in stages:
        assert response.headers["x-gateway-cache"] == "miss"
    assert max(gaps) < counting / 2, (max(gaps), counting)
    assert len(counted) == 1, counted  # one count for every stage that matched the rule
