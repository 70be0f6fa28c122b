"""A routing rule on the prompt's size (`prompt_tokens_over`/`_under`) has a large prompt counted in a thread, as
`/v1/messages/count_tokens` and the usage count do past 64 KiB: counted on the event loop, a ~4 MB prompt held
every other request of the process for as long as tiktoken took (seconds). The measure: a ticker task on the
gateway's own loop, and its largest gap while such a request is routed; compared with what counting that prompt
takes here, so that a slow machine does not fail it. Real gateway, mock upstream."""

from __future__ import annotations

import asyncio
import random
import textwrap
import time
from collections.abc import Callable

import httpx
import pytest

from gateway.accounting.prompt import estimate_prompt
from gateway.auth.keys import hash_key
from gateway.telemetry.tokens import TokenCounter
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream

KEY = "gw-b9-rule-tokens-key-00000000000000000000"


def _prompt() -> str:
    """About 4.6 MB of varied words (tiktoken's slow case: no long repeats to merge)."""
    rng = random.Random(7)
    words = ("alpha", "beta", "gamma", "delta", "lorem", "ipsum", "zeta", "omega", "kappa", "sigma")
    return " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(600_000))


@pytest.mark.parametrize("weighed_by", ["rule", "tpm"])
def test_a_large_prompt_is_counted_off_the_loop(
    make_gateway: Callable[..., RunningGateway], upstream: MockUpstream, weighed_by: str,
) -> None:
    """`rule`: a routing rule on the prompt's size; `tpm`: a tokens-per-minute limit, which reserves the prompt's
    estimate before the call (the accounting stage counted it on the loop too)."""
    limits = ", limits: {tpm: 100000000}" if weighed_by == "tpm" else ""
    rule = "rules:\n  - {name: long-prompts, when: {alias: [chat], prompt_tokens_over: 100000}, alias: long}\n"
    running = make_gateway(textwrap.dedent(f"""\
        version: 1
        server: {{max_body_bytes: 16777216}}
        auth: keys
        keys:
          - {{name: k, tenant: acme, hash: "{hash_key(KEY)}"{limits}}}
        providers:
          a: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: a, model: gpt-4o-mini}}
          long: {{provider: a, model: mock-model}}
        """) + (rule if weighed_by == "rule" else ""), {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY})
    body = {"model": "chat", "messages": [{"role": "user", "content": _prompt()}]}
    counter = TokenCounter()
    counter.load(["gpt-4o-mini"])
    started = time.perf_counter()
    estimate_prompt(counter, body, "gpt-4o-mini")
    counting = time.perf_counter() - started  # what the count holds a loop for, on this machine

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
    if weighed_by == "rule":
        assert upstream.requests[-1].model == "mock-model"  # the rule counted the prompt, and applied
    else:
        assert response.headers["x-ratelimit-limit-tokens"] == "100000000"  # the limit reserved the prompt
        assert int(response.headers["x-ratelimit-remaining-tokens"]) < 100000000 - 1_000_000
    assert max(gaps) < counting / 2, (max(gaps), counting)
