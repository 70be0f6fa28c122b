"""An upstream that reports its usage as `{"total_tokens": N}` alone (Voyage AI's `/v1/embeddings` shape), or with
counts that fall short of its total, is billed the gateway's estimate, as an answer without usage is.

The gateway read `prompt_tokens` (absent: 0), found the usage usable, and settled $0 against the key's budget and
the cost counters (H58).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, UPSTREAM_KEY, RunningGateway
from tests.support.threaded_app import ThreadedApp

INPUTS = ["word " * 1000] * 3  # about 3,000 tokens


class Upstream(ThreadedApp):
    usage: Any = None

    def routes(self, app: web.Application) -> None:
        async def embeddings(request: web.Request) -> web.Response:
            body = await request.json()
            answer: dict[str, Any] = {"object": "list", "model": body["model"], "data": [
                {"object": "embedding", "index": i, "embedding": [0.5, -0.25]} for i in range(len(body["input"]))]}
            if self.usage is not None:
                answer["usage"] = self.usage
            return web.json_response(answer)
        app.router.add_post("/v1/embeddings", embeddings)


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Upstream, RunningGateway]]:
    with Upstream() as upstream:
        policy = textwrap.dedent(f"""\
            version: 1
            auth: keys
            keys:
              - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}", budget: {{usd: 10, period: day}}}}
            providers:
              voyage: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY}}
            prices:
              voyage-3: {{input_per_mtok: 60, output_per_mtok: 0}}
            models:
              emb: {{provider: voyage, model: voyage-3}}
            """)
        running = RunningGateway(policy, {"UP_KEY": UPSTREAM_KEY}).start()
        yield upstream, running
        running.stop()


def _cost(gateway: RunningGateway, usage: Any, upstream: Upstream) -> float:
    upstream.usage = usage
    response = httpx.post(gateway.base_url + "/embeddings", headers={"Authorization": f"Bearer {FULL_KEY}"},
                          json={"model": "emb", "input": INPUTS, "encoding_format": "float"})
    assert response.status_code == 200
    return float(response.headers["x-gateway-cost-usd"])


def test_total_tokens_only_usage_is_billed(setup: tuple[Upstream, RunningGateway]) -> None:
    upstream, gateway = setup
    estimated = _cost(gateway, None, upstream)  # no usage at all: the gateway's estimate, ~3,000 tokens
    reported = _cost(gateway, {"prompt_tokens": 3000, "total_tokens": 3000}, upstream)
    assert estimated > 0.15 and reported == pytest.approx(0.18)
    total_only = _cost(gateway, {"total_tokens": 3000}, upstream)  # Voyage AI's usage object
    assert total_only == pytest.approx(estimated), f"3,000 embedded tokens billed ${total_only}"
    assert _cost(gateway, {"prompt_tokens": 0, "total_tokens": 3000}, upstream) == pytest.approx(estimated)


def test_a_total_that_counts_the_reasoning_beside_the_completion_is_believed() -> None:
    """xAI reports reasoning tokens beside the completion's (`total = prompt + completion + reasoning`): its counts add
    up, and are not estimated away."""
    from gateway.schemas.openai import CompletionTokensDetails, Usage

    assert Usage(32, 9, 135, completion_tokens_details=CompletionTokensDetails(reasoning_tokens=94)).usable()
    assert Usage(32, 9, 41).usable() and Usage(32, 9).usable()
    assert not Usage(0, 0, 3000).usable() and not Usage(32, 9, 136).usable()
