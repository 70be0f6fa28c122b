"""A budget's downgrade to an alias none of whose targets serves the request's endpoint leaves the request on the
alias asked for, as a downgrade the key may not use does.

It was taken anyway (`gpt-4o` downgraded to an Anthropic model, the usual cost saver): once the mark was passed,
every Responses (or embeddings) request to an alias that serves it got a permanent 400 `unsupported_endpoint`
("route this model to a provider that does"), which no SDK retries (H57).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import openai
import pytest
from aiohttp import web

from gateway.auth.keys import hash_key
from tests.conftest import RunningGateway
from tests.support.threaded_app import ThreadedApp

KEY = "gw-downgrade-endpoint-key-000000000000000"


class _Upstream(ThreadedApp):
    def routes(self, app: web.Application) -> None:
        async def handle(request: web.Request) -> web.Response:
            return web.json_response({
                "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "m",
                "output": [{"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
                "error": None, "incomplete_details": None, "tools": [], "tool_choice": "auto",
                "parallel_tool_calls": True, "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}})

        app.router.add_post("/v1/responses", handle)


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with _Upstream() as upstream:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1}}
            auth: keys
            keys:
              - {{name: k, tenant: acme, hash: "{hash_key(KEY)}"}}
            providers:
              up: {{kind: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key_env: UP_KEY}}
              an: {{kind: anthropic, base_url: "http://127.0.0.1:9/v1", api_key_env: UP_KEY}}
            models:
              primary:
                targets: [{{provider: up, model: m, price: {{input_per_mtok: 1000, output_per_mtok: 1000}}}}]
                budget: {{usd: 100, downgrade: {{at: 0.0001, alias: cheap}}}}
              cheap:
                targets: [{{provider: an, model: claude-x, price: {{input_per_mtok: 1, output_per_mtok: 1}}}}]
            """)
        running = RunningGateway(text, {"UP_KEY": "sk-up-downgrade"}).start()
        yield running
        running.stop()


def test_a_responses_request_past_the_downgrade_mark_is_still_served(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=20)
    for _ in range(3):  # past the mark after the first; the downgrade alias cannot serve /v1/responses
        answer = client.responses.create(model="primary", input="hi", max_output_tokens=16)
        assert answer.output_text == "hi"
