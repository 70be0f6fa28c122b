"""A Responses continuation whose stream ends without the upstream's usage is billed the context it continues.

The upstream bills a continuation (`previous_response_id`) the whole chain kept there as its input: the earlier
response's input and output, and the new input. When the usage never comes (the client left before
`response.completed`), the gateway estimates the bill from the request body, which holds only the new input: 9
tokens where the upstream billed 50,000. So the owner record (`pipeline.response_owners`, kept where tenants are
apart) holds the answer's size in tokens, and a continuation's estimated input counts at least that.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import openai
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import UPSTREAM_KEY, RunningGateway
from tests.support.billing import usage_row
from tests.support.mock_upstream import MockUpstream

KEY = "gw-continuation-billing-key-0000000000000"
OTHER = "gw-continuation-billing-other-00000000000"
ADMIN = "admin-continuation-billing"
WORDS = 3000


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with MockUpstream(UPSTREAM_KEY) as mock:
        text = textwrap.dedent(f"""\
            version: 1
            server: {{host: 127.0.0.1, admin_token_env: ADMIN_TOK}}
            auth: keys
            keys:
              - {{name: main, tenant: acme, hash: "{hash_key(KEY)}"}}
              - {{name: other, tenant: globex, hash: "{hash_key(OTHER)}"}}
            accounting: {{always: true}}
            routing: {{breaker: {{enabled: false}}}}
            providers:
              oa: {{kind: openai, base_url: {mock.base_url}, api_key_env: MOCK_UPSTREAM_KEY}}
            models:
              chat: {{targets: [{{provider: oa, model: mock-model, price: {{input_per_mtok: 1, output_per_mtok: 1}}}}]}}
              left: {{targets: [{{provider: oa, model: fault-stall-after-3,
                                 price: {{input_per_mtok: 1, output_per_mtok: 1}}}}]}}
              left-after-stream: {{targets: [{{provider: oa, model: fault-stall-after-3,
                                              price: {{input_per_mtok: 1, output_per_mtok: 1}}}}]}}
            """)
        running = RunningGateway(text, {"MOCK_UPSTREAM_KEY": UPSTREAM_KEY, "ADMIN_TOK": ADMIN}).start()
        yield running
        running.stop()


@pytest.mark.parametrize("first_streamed", [False, True])
def test_a_continuation_the_client_left_is_billed_the_context_it_continues(
        gw: RunningGateway, first_streamed: bool) -> None:
    client = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)
    long_input = " ".join(["word"] * WORDS)
    if first_streamed:  # its size is known at its stream's end: recorded then
        with client.responses.stream(model="chat", input=long_input) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(model="chat", input=long_input)
    assert first.usage is not None and first.usage.input_tokens >= WORDS
    alias = "left-after-stream" if first_streamed else "left"
    stream = client.responses.create(model=alias, input="go on", previous_response_id=first.id, stream=True)
    try:
        for event in stream:  # the upstream stalls after 3 deltas: the client leaves
            if event.type == "response.output_text.delta":
                break
    finally:
        stream.close()
    row = usage_row(gw.url, ADMIN, alias)
    # was the new input alone (3 tokens)
    assert row["prompt_tokens"] >= first.usage.input_tokens + first.usage.output_tokens, row
