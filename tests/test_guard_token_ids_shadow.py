"""An input guard in shadow mode, or whose action is `record`, lets a prompt sent as token ids through, unread; an
enforcing one that could block or rewrite refuses it with a 400 naming the field.

Shadow mode "decides and records but changes nothing" (docs/guards.md): a guard turned on in shadow refused every
client that sends token arrays (LangChain's `OpenAIEmbeddings` does by default) on `/v1/embeddings` and
`/v1/completions` (H58).
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator

import httpx
import pytest

from gateway.auth.keys import hash_key
from tests.conftest import FULL_KEY, RunningGateway

POLICY = textwrap.dedent(f"""\
    version: 1
    auth: keys
    keys:
      - {{name: full, tenant: acme, hash: "{hash_key(FULL_KEY)}"}}
    providers:
      demo: {{kind: demo}}
    models:
      plain: {{provider: demo, model: demo-1}}
      shadowed: {{provider: demo, model: demo-1}}
      recorded: {{provider: demo, model: demo-1}}
      enforced: {{provider: demo, model: demo-1}}
    guards:
      models:
        shadowed:
          pii: {{kind: pii, action: redact, mode: shadow}}
        recorded:
          pii: {{kind: pii, action: record}}
        enforced:
          pii: {{kind: pii, action: redact}}
    """)
AUTH = {"Authorization": f"Bearer {FULL_KEY}"}


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    running = RunningGateway(POLICY, {}).start()
    yield running
    running.stop()


@pytest.mark.parametrize("alias", ["plain", "shadowed", "recorded"])
@pytest.mark.parametrize(("path", "field", "tokens"), [
    ("/embeddings", "input", [[9906, 1917], [15339]]),  # what LangChain's OpenAIEmbeddings sends
    ("/completions", "prompt", [9906, 1917]),
])
def test_guards_that_change_nothing_do_not_refuse_token_ids(gateway: RunningGateway, alias: str, path: str,
                                                            field: str, tokens: list[object]) -> None:
    response = httpx.post(gateway.base_url + path, headers=AUTH, json={"model": alias, field: tokens})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "field", "tokens"), [("/embeddings", "input", [[9906, 1917]]),
                                                      ("/completions", "prompt", [9906, 1917])])
def test_an_enforcing_guard_refuses_token_ids_naming_the_field(gateway: RunningGateway, path: str, field: str,
                                                              tokens: list[object]) -> None:
    response = httpx.post(gateway.base_url + path, headers=AUTH, json={"model": "enforced", field: tokens})
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text
