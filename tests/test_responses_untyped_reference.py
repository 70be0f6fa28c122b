"""An item reference with no `type` is refused as one with it, where callers may belong to different tenants.

OpenAI resolves an item reference (`{"type": "item_reference", "id": ...}`) against the provider account's stored
items, whichever tenant's response made them, so under `auth: keys` with several tenants the gateway refuses it
(`pipeline.response_owners`). OpenAI's schema makes that `type` optional (its default is `item_reference`) and
nullable, and the SDK's `ItemReference` sends `{"id": ...}` alone: such an item is the same reference and must be
refused the same way, never forwarded. A message may leave its `type` out too: it carries a `role` and its
`content`, and goes on as it came.
"""

from __future__ import annotations

import textwrap

import httpx
import openai
import pytest

from tests.conftest import FULL_KEY, OTHER_TENANT_KEY, RunningGateway
from tests.support.mock_upstream import MockUpstream


def _client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0, timeout=20)


def _forwarded(upstream: MockUpstream) -> list[dict]:
    return [r.json for r in upstream.requests if r.path.endswith("/responses")]


def test_an_item_reference_without_its_type_is_refused_and_never_forwarded(
        make_gateway, upstream: MockUpstream) -> None:
    gateway = make_gateway()
    acme, globex = _client(gateway, FULL_KEY), _client(gateway, OTHER_TENANT_KEY)
    item_id = acme.responses.create(model="chat", input="acme's secret").output[0].id
    sent = len(_forwarded(upstream))
    untyped = ({"id": item_id}, {"id": item_id, "type": None})
    for item in untyped:  # the SDK's `ItemReference`, with its optional `type` left out or null
        with pytest.raises(openai.BadRequestError) as refused:
            globex.responses.create(model="chat", input=[{"role": "user", "content": "hi"}, item])  # type: ignore[list-item]
        error = refused.value.response.json()["error"]
        assert error["code"] == "unsupported_parameter" and error["param"] == "input[1]", error
    for item in untyped:  # raw HTTP, and the tenant that made it alike: the gateway cannot tell whose item it is
        answer = httpx.post(gateway.base_url + "/responses", headers={"Authorization": f"Bearer {FULL_KEY}"},
                            json={"model": "chat", "input": [item]}, timeout=20)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "input[0]"
    assert len(_forwarded(upstream)) == sent  # never reached the provider's account
    # messages with no `type`, and items sent back whole with their ids, go on as they came
    made = acme.responses.create(model="chat", input="hello")
    whole = [{"role": "user", "content": "hello"}, made.output[0].model_dump(exclude_none=True),
             {"role": "user", "content": [{"type": "input_text", "text": "and?"}]}]
    acme.responses.create(model="chat", input=whole)  # type: ignore[arg-type]
    assert _forwarded(upstream)[-1]["input"] == whole


def test_a_null_type_is_accepted_where_nothing_is_kept_apart(make_gateway, upstream: MockUpstream) -> None:
    """`type: null` is what OpenAI's schema allows an item reference: ingress no longer answers 400 for it, and with
    one tenant (nothing to keep apart) the item goes on as it came."""
    single = make_gateway(textwrap.dedent(f"""\
        version: 1
        auth: none
        providers:
          mock: {{kind: openai, base_url: "{upstream.base_url}", api_key_env: MOCK_UPSTREAM_KEY}}
        models:
          chat: {{provider: mock, model: mock-model}}
        """))
    answer = httpx.post(single.base_url + "/responses", json={"model": "chat", "input": [
        {"type": None, "id": "msg_mock1"}]}, timeout=20)
    assert answer.status_code == 200, answer.text
    assert _forwarded(upstream)[-1]["input"] == [{"type": None, "id": "msg_mock1"}]
    bad = httpx.post(single.base_url + "/responses", json={"model": "chat", "input": [{"type": 5, "id": "x"}]},
                     timeout=20)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0].type"
